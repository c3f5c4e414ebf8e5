"""What reading another library's ViT checkpoint takes, whatever the library: keys renamed by a
table, the parameters vitlab's ViT does not compute refused by name, the variant found by width,
and the class names taken where the file has them.

Each library's layout is a module of its own: `timm_layout.py`, `hf_layout.py`. Whatever vitlab
cannot compute exactly raises CheckpointError naming the field: nothing is loaded approximately.
"""

from __future__ import annotations

import functools
import re

from ..config import VARIANTS, ModelConfig, family
from ..errors import CheckpointError

# Parameters of what vitlab's ViT does not compute, by the name they have in a file.
_UNREPRESENTABLE = {
    ".q_norm.": "query-key normalisation (qk_norm)",
    ".k_norm.": "query-key normalisation (qk_norm)",
    "patch_embed.norm.": "a norm in the patch embedding",
    "mask_token": "a mask token (masked image modelling)",
    "decoder.": "a masked-image-modelling decoder",
}


@functools.cache
def _pattern(prefix: str) -> re.Pattern:
    return re.compile(re.escape(prefix).replace(r"\{\}", r"(\d+)") + "(.*)", re.DOTALL)


def rename_keys(
    state: dict, table: list[tuple[str, str]], name: str, reverse: bool = False
) -> dict:
    """`state` with every key renamed by `table` of (their key prefix, ours), "{}" standing for a
    number (theirs -> ours, or back); a key no rule matches is refused."""
    out, unknown = {}, []
    for key, value in state.items():
        for theirs, ours in table:
            source, target = (ours, theirs) if reverse else (theirs, ours)
            match = _pattern(source).fullmatch(key)
            if match:
                out[target.format(*match.groups()[:-1]) + match.groups()[-1]] = value
                break
        else:
            unknown.append(key)
    if unknown:
        more = f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""
        raise CheckpointError(
            f"{name}: unexpected keys {', '.join(sorted(unknown)[:3])}{more}: vitlab's ViT has no "
            "such parameters"
        )
    return out


def refuse_unrepresentable(state: dict, name: str) -> None:
    """Raise CheckpointError naming the first parameter of something vitlab's ViT does not compute
    (register tokens, layer scale, a norm other than LayerNorm, ...)."""
    for key in state:
        for marker, what in _UNREPRESENTABLE.items():
            if marker in key:
                raise CheckpointError(
                    f"{name}: {key} is {what}, which vitlab's ViT does not compute"
                )
    for key in [k for k in state if re.fullmatch(r".*(norm1|layernorm_before)\.weight", k)]:
        if key.removesuffix("weight") + "bias" not in state:
            raise CheckpointError(
                f"{name}: {key} has no bias: a norm other than LayerNorm (e.g. RMSNorm), which "
                "vitlab does not compute"
            )


def nearest_variant(width: int, patch: int, hybrid: bool) -> ModelConfig | None:
    """The variant of this width (and patch size, where one has it), or None: what names the model
    and, for a timm state dict, gives the heads its weights do not say."""
    same_width = [
        v
        for v in VARIANTS.values()
        if v.hidden_size == width and v.is_hybrid == hybrid and v.name != "testing"
    ]
    return next(
        (v for v in same_width if v.patch_size == patch), same_width[0] if same_width else None
    )


def family_variant(kind: str, width: int, patch: int) -> ModelConfig:
    """The variant of family `kind` ("vit", "dinov2", ...: config.family) of this width and patch
    size, else of this width, else the family's first: what names a model read from a file."""
    ours = [
        v
        for v in VARIANTS.values()
        if family(v.name) == kind and v.name != "testing" and not v.is_hybrid
    ]
    same = [v for v in ours if v.hidden_size == width]
    return next((v for v in same if v.patch_size == patch), (same or ours)[0])


def label_names(names, num_classes: int) -> list[str] | None:
    """Class names from a list or an {index: name} mapping, or None unless there is one a class (a
    mapping of more, e.g. the labels of a CLIP config beside its projection, names no class)."""
    if isinstance(names, dict):
        names = [names.get(str(i), names.get(i)) for i in range(len(names))]
    return (
        list(names)
        if isinstance(names, (list, tuple)) and len(names) == num_classes and None not in names
        else None
    )

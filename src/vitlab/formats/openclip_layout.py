"""CLIP's image towers as OpenAI and OpenCLIP release them, read into vitlab's layout.

OpenCLIP's `open_clip_pytorch_model.bin` and `open_clip_model.safetensors`, and the state dict of
OpenAI's `ViT-B-16.pt` (`torch.jit.load(path).state_dict()`; the file itself is a TorchScript
archive), hold both towers: the image tower under `visual.` (`conv1`, `class_embedding`,
`positional_embedding`, `ln_pre`, `transformer.resblocks.N.{ln_1, attn.in_proj_*, attn.out_proj,
ln_2, mlp.c_fc, mlp.c_proj}`, `ln_post`, and `proj`, the projection into the joint embedding,
which becomes vitlab's head with a zero bias), the text tower's keys beside it (ignored). The
conversion is timm's `_convert_openai_clip`. Every CLIP's LayerNorm has torch's eps 1e-5, its
images are fed as CLIP's `clip/clip.py` feeds them; the file does not say its GELU: a `clip-*`
(QuickGELU) or `openclip-*` (exact GELU) variant must. QuickGELU is OpenAI's and that of the weights
open_clip pairs with a `-quickgelu` model (its DFN, MetaCLIP and LAION-400M releases: read them as
`clip-*`); the exact GELU that of its others, such as the LAION-2B towers `openclip-*` names.
"""

from __future__ import annotations

import torch

from ..config import ModelConfig, family, get_config
from ..errors import CheckpointError
from .interop import rename_keys
from .timm_layout import from_timm

# (their key prefix under "visual.", timm's), "{}" standing for a block's number
_CLIP_KEYS = [
    ("conv1.weight", "patch_embed.proj.weight"),
    ("class_embedding", "cls_token"),
    ("positional_embedding", "pos_embed"),
    ("ln_pre.", "norm_pre."),
    ("transformer.resblocks.{}.ln_1.", "blocks.{}.norm1."),
    ("transformer.resblocks.{}.attn.in_proj_", "blocks.{}.attn.qkv."),
    ("transformer.resblocks.{}.attn.out_proj.", "blocks.{}.attn.proj."),
    ("transformer.resblocks.{}.ln_2.", "blocks.{}.norm2."),
    ("transformer.resblocks.{}.mlp.c_fc.", "blocks.{}.mlp.fc1."),
    ("transformer.resblocks.{}.mlp.c_proj.", "blocks.{}.mlp.fc2."),
    ("ln_post.", "norm."),
    ("proj", "head.weight"),
]
_CLIP_FAMILIES = ("clip", "openclip")


def is_layout(state: dict) -> bool:
    """A CLIP state dict of OpenAI's or OpenCLIP's own image tower (not OpenCLIP's timm trunks)."""
    return "visual.class_embedding" in state


def from_original(state: dict[str, torch.Tensor], name: str, variant: ModelConfig | None):
    """(ModelConfig, vitlab state dict, the name of its position rule in `checkpoints.RESAMPLERS`)
    of a CLIP image tower in timm's keys (`timm_state`). `variant` (the variant the user named, or
    the model the file is loaded into) must be a CLIP variant: it gives the GELU form and the
    attention heads, which the weights do not say."""
    if variant is None or family(variant.name) not in _CLIP_FAMILIES:
        given = f"; {variant.name} is not one" if variant is not None else ""
        raise CheckpointError(
            f"{name}: a CLIP state dict does not say its GELU: pass --model_type clip-B/16 (or "
            f"another clip-* variant: OpenAI's QuickGELU) or openclip-B/16 (openclip-*: OpenCLIP's "
            f"exact GELU){given}"
        )
    config, state, _ = from_timm(state, name, None, variant)
    table = get_config(variant.name)  # how the family feeds images, whatever the model overrides
    config = config.replace(gelu=variant.gelu, layer_norm_eps=1e-5, **table.preprocessing())
    return config, state, "openclip"


def timm_state(state: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """The image tower's tensors in timm's keys and shapes: the class token (1, 1, D), the position
    table (1, rows, D), the projection (D, E) as a head (E, D) with a zero bias."""
    visual = {k.removeprefix("visual."): v for k, v in state.items() if k.startswith("visual.")}
    for key, rank in (("class_embedding", 1), ("positional_embedding", 2), ("proj", 2)):
        if key in visual and visual[key].ndim != rank:
            raise CheckpointError(
                f"{name}: visual.{key} has shape {tuple(visual[key].shape)}, not the {rank}-D "
                "tensor of a CLIP image tower"
            )
    state = rename_keys(visual, _CLIP_KEYS, name)
    if "cls_token" in state:
        state["cls_token"] = state["cls_token"].reshape(1, 1, -1)
    if "pos_embed" in state:
        state["pos_embed"] = state["pos_embed"].unsqueeze(0)
    if "head.weight" in state:
        head = state["head.weight"].T.contiguous()
        state.update({"head.weight": head, "head.bias": head.new_zeros(head.shape[0])})
    return state

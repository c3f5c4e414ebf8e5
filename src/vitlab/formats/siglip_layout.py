"""big_vision's two-tower image-text checkpoints (SigLIP's `webli_en_b16_224_63724782.npz`, ...):
the image tower read into vitlab's layout.

Such a file holds the image tower under `params/img/`: big_vision's ViT (`embedding`,
`pos_embedding`, the blocks one key each as `Transformer/encoderblock_N/...` or stacked as
`Transformer/encoderblock/...`, `Transformer/encoder_norm`), SigLIP's attention pooling
`MAPHead_0/{probe, MultiHeadDotProductAttention_0, LayerNorm_0, MlpBlock_0}` and, where the tower
projects, a `head`. The text tower (`params/txt/`) and the loss's temperature and bias (`params/t`,
`params/b`) are not read. The arrays say the whole shape, the attention heads too (a query kernel
is (D, heads, head_dim)); big_vision computes as flax does (the tanh GELU, LayerNorm eps 1e-6) and
feeds SigLIP images squashed to the model's size, bilinear, in [-1, 1]. The conversion is timm's
`_load_weights` (its big_vision branch). Block by block the layout is big_vision's plain ViT,
which `official_layout.py` reads; this module adds the pooling head and what the file says of its
model.
"""

from __future__ import annotations

import math
import re
import zipfile
from pathlib import Path

import numpy as np
import torch

from ..config import VARIANTS, ModelConfig, get_config
from ..errors import CheckpointError, ConfigError
from ..model import VisionTransformer
from .interop import family_variant
from .official_layout import OfficialArrays, normalise_keys, official_state, read_npz

IMAGE_TOWER = "params/img/"
# How big_vision feeds SigLIP's images: squashed to the model's size, bilinear, in [-1, 1]
# (SigLIP_demo.ipynb: resize(RES)|value_range(-1, 1); pp/ops_image.py: get_resize's "bilinear").
# timm's and transformers' copies of the weights say bicubic, as the siglip variants do.
BIG_VISION_IMAGES = {**VARIANTS["siglip-B/16"].preprocessing(), "interpolation": "bilinear"}


def is_two_tower(path: Path) -> bool:
    """A zip archive with arrays under `params/img/`: big_vision's image-text file."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(n.startswith(IMAGE_TOWER) for n in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def read_siglip(
    path: Path, variant: str | ModelConfig | None
) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(ModelConfig, vitlab state dict) of the image tower of a big_vision two-tower file. A
    variant the user named is checked against the file (its size also bounds what is read); the
    model the file is loaded into is checked by the caller."""
    name = str(path)
    named = _named(variant, name) if isinstance(variant, str) else None
    arrays = read_npz(path, named, prefix=IMAGE_TOWER)
    depth = _depth(arrays, name)
    arrays = normalise_keys(arrays, depth, prefix=IMAGE_TOWER)
    try:
        config = _config(arrays, name, named, depth)
    except ConfigError as e:  # a model no ViT can be (empty arrays)
        raise CheckpointError(f"{name}: {e}") from None
    tower = OfficialArrays(arrays, name, config)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in VisionTransformer(config).state_dict().items()}
    state, _ = official_state(tower, shapes, keep_head="head/kernel" in arrays)
    if config.classifier == "map":
        state.update(_map_head(tower))
    tower.check_all_taken()
    return config, state


def _named(model_type: str, name: str) -> ModelConfig:
    try:
        return get_config(model_type)
    except ConfigError as e:
        raise CheckpointError(f"{name}: --model_type: {e}") from None


def _depth(arrays: dict[str, np.ndarray], name: str) -> int:
    """Blocks of the tower: the stacked axis, or the numbered blocks."""
    stacked = arrays.get(IMAGE_TOWER + "Transformer/encoderblock/LayerNorm_0/scale")
    if stacked is not None:
        return stacked.shape[0]
    blocks = [re.match(IMAGE_TOWER + r"Transformer/encoderblock_(\d+)/", k) for k in arrays]
    if not any(blocks):
        raise CheckpointError(
            f"{name}: no {IMAGE_TOWER}Transformer/encoderblock: not big_vision's ViT image tower"
        )
    return 1 + max(int(b[1]) for b in blocks if b)


def _config(
    arrays: dict[str, np.ndarray], name: str, named: ModelConfig | None, depth: int
) -> ModelConfig:
    """The model the image tower's arrays describe (keys normalised to the official layout)."""
    first = "Transformer/encoderblock_0/"
    kernel, table, query, fc1 = (
        _need(arrays, key, ndim, name)
        for key, ndim in (
            ("embedding/kernel", 4),  # (patch, patch, 3, D)
            ("Transformer/posembed_input/pos_embedding", 3),  # (1, grid * grid, D)
            (first + "MultiHeadDotProductAttention_1/query/kernel", 3),  # (D, heads, head_dim)
            (first + "MlpBlock_3/Dense_0/kernel", 2),  # (D, mlp_dim)
        )
    )
    patch, width, heads = kernel.shape[0], kernel.shape[-1], query.shape[1]
    grid = math.isqrt(table.shape[1])
    if kernel.shape[:3] != (patch, patch, 3) or grid * grid != table.shape[1]:
        raise CheckpointError(
            f"{name}: patch embedding {kernel.shape} and position table {table.shape}: vitlab "
            "computes square patches of RGB images on a square grid"
        )
    if not heads or query.shape != (width, heads, width // heads) or table.shape[-1] != width:
        raise CheckpointError(
            f"{name}: a query kernel {query.shape} and a position table {table.shape} in a model "
            f"of width {width}: not one ViT"
        )
    if named is not None and (named.hidden_size, named.num_heads) != (width, heads):
        raise CheckpointError(
            f"{name}: hidden_size {width} with {heads} heads, and --model_type {named.name} has "
            f"{named.hidden_size} with {named.num_heads}"
        )
    pre_logits, head = arrays.get("pre_logits/bias"), arrays.get("head/bias")
    return ModelConfig(
        name=(named or family_variant("siglip", width, patch)).name,
        patch_size=patch,
        hidden_size=width,
        depth=depth,
        num_heads=heads,
        mlp_dim=fc1.shape[1],
        dropout_rate=0.0,
        classifier="map" if "MAPHead_0/probe" in arrays else "gap",
        representation_size=pre_logits.shape[-1] if pre_logits is not None else None,
        num_classes=head.shape[-1] if head is not None else 1,  # a placeholder for no head
        img_size=grid * patch,
        gelu="tanh",
        layer_norm_eps=1e-6,
        **BIG_VISION_IMAGES,
    )


def _need(arrays: dict[str, np.ndarray], key: str, ndim: int, name: str) -> np.ndarray:
    if key not in arrays or arrays[key].ndim != ndim:
        raise CheckpointError(
            f"{name}: no {ndim}-D array for {key} (in the official layout): not big_vision's ViT "
            "image tower"
        )
    return arrays[key]


def _map_head(tower: OfficialArrays) -> dict[str, torch.Tensor]:
    """vitlab's `attn_pool` of big_vision's MAPHead: the probe as the latent query, the key and
    value kernels fused, flax's (in, out) kernels transposed."""
    D, head = tower.config.hidden_size, "MAPHead_0/"
    attention = head + "MultiHeadDotProductAttention_0/"

    def take(key: str, numel: int, shape: tuple[int, ...]) -> torch.Tensor:
        array = tower.take(key)
        if array.size != numel:
            raise CheckpointError(
                f"{tower.name}: {key} has shape {array.shape}, a width of {D} needs {numel} numbers"
            )
        return torch.from_numpy(np.ascontiguousarray(array.reshape(shape)))

    def dense(key: str, inputs: int, out: int) -> dict[str, torch.Tensor]:
        """A flax kernel (inputs..., out...) and its bias as a linear layer's weight and bias."""
        return {
            "weight": take(key + "/kernel", inputs * out, (inputs, out)).T.contiguous(),
            "bias": take(key + "/bias", out, (out,)),
        }

    mlp = tower.config.mlp_dim
    q, k, v, out = (dense(attention + n, D, D) for n in ("query", "key", "value", "out"))
    layers = {
        "q": q,
        "kv": {p: torch.cat([k[p], v[p]]) for p in ("weight", "bias")},
        "proj": out,
        "norm": {
            "weight": take(head + "LayerNorm_0/scale", D, (D,)),
            "bias": take(head + "LayerNorm_0/bias", D, (D,)),
        },
        "mlp.fc1": dense(head + "MlpBlock_0/Dense_0", D, mlp),
        "mlp.fc2": dense(head + "MlpBlock_0/Dense_1", mlp, D),
    }
    state = {f"attn_pool.{m}.{p}": t for m, params in layers.items() for p, t in params.items()}
    state["attn_pool.latent"] = take(head + "probe", D, (1, 1, D))
    return state

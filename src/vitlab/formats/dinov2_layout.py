"""Meta's DINOv2 checkpoints, read into vitlab's layout, and DINOv2's own rule for resampling their
position table to another grid.

The torch hub files of facebookresearch/dinov2 (`dinov2_vitb14_pretrain.pth`,
`dinov2_vitb14_reg4_pretrain.pth`, ...) hold `DinoVisionTransformer`'s state dict: timm's names
(`patch_embed.proj`, `blocks.N.{norm1, attn.qkv, attn.proj, ls1.gamma, norm2, mlp.fc1, mlp.fc2,
ls2.gamma}`, `norm`) beside `cls_token`, a `pos_embed` of 37 x 37 patches (518 px) with the class
token's row, `mask_token` (iBOT's masked patches, unused at inference: dropped) and, with
registers, `register_tokens`; giant's SwiGLU MLP is `mlp.w12` and `mlp.w3`. Meta adds the
positions before it inserts the registers, so a file with registers has its class token's row
folded into the class token and no rows for the prefix tokens (vitlab's pos_embed_prefix=False),
as timm's `_convert_dinov2` converts it. What the weights compute is Meta's whatever the user
names: the exact GELU, LayerNorm eps 1e-6, images fed as DINOv2's evaluation feeds them. The hub
files have no head: a feature extractor, fine-tuned with a head of the task's classes.
"""

from __future__ import annotations

import functools
import math
import re

import torch
import torch.nn.functional as F

from ..config import VARIANTS, ModelConfig
from ..errors import CheckpointError
from .interop import family_variant
from .timm_layout import from_timm

# What every DinoVisionTransformer computes (dinov2/models/vision_transformer.py: nn.GELU,
# LayerNorm eps 1e-6) and how its evaluation feeds images (the dinov2 variants')
DINOV2_FUNCTION = dict(gelu="exact", layer_norm_eps=1e-6, **VARIANTS["dinov2-B/14"].preprocessing())


def is_layout(state: dict) -> bool:
    """A state dict of Meta's DinoVisionTransformer: timm's keys and Meta's mask token (timm's
    `checkpoint_filter_fn` tells it so too)."""
    return "mask_token" in state and "patch_embed.proj.weight" in state


def from_original(state: dict[str, torch.Tensor], name: str, variant: ModelConfig | None):
    """(ModelConfig, vitlab state dict, the name of its position rule in `checkpoints.RESAMPLERS`)
    of Meta's state dict in timm's keys (`timm_state`). `variant` (the variant the user named, or
    the model the file is loaded into) gives the attention heads, which the weights do not say;
    else the DINOv2 variant of the file's width."""
    registers = "reg_token" in state
    width = state["pos_embed"].shape[-1] if "pos_embed" in state else 0
    patch = state["patch_embed.proj.weight"].shape[-1]
    base = variant or family_variant("dinov2-reg" if registers else "dinov2", width, patch)
    if variant is None and base.hidden_size != width:
        raise CheckpointError(
            f"{name}: a DINOv2 model of width {width} is no vitlab variant's and the weights do "
            "not say its attention heads; pass the variant with --model_type"
        )
    # The position table's layout stated as timm's model_args, not guessed from its rows
    config, state, _ = from_timm(state, name, {"model_args": {"no_embed_class": registers}}, base)
    return config.replace(**DINOV2_FUNCTION), state, "dinov2-reg" if registers else "dinov2"


def timm_state(state: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """Meta's state dict in timm's keys: the mask token dropped, with registers the class token's
    position row folded into the class token, the SwiGLU's w12 and w3 named fc1 and fc2."""
    state = {k: v for k, v in state.items() if k != "mask_token"}
    if {"register_tokens", "cls_token", "pos_embed"} <= state.keys():
        pos_embed, cls_token = state.pop("pos_embed"), state.pop("cls_token")
        if pos_embed.ndim != 3 or cls_token.shape != pos_embed[:, :1].shape:
            raise CheckpointError(
                f"{name}: cls_token {tuple(cls_token.shape)} and pos_embed "
                f"{tuple(pos_embed.shape)} are not a class token and its position table"
            )
        # Meta: (cls + row 0) beside the registers, which get no position
        state.update(
            reg_token=state.pop("register_tokens"),
            cls_token=cls_token + pos_embed[:, :1],
            pos_embed=pos_embed[:, 1:],
        )
    return {re.sub(r"(?<=\.mlp\.)(w12|w3)(?=\.)", _swiglu_name, k): v for k, v in state.items()}


def _swiglu_name(match: re.Match) -> str:
    """timm's name of a layer of Meta's SwiGLU: w12 (to both halves) is fc1, w3 (out) fc2."""
    return {"w12": "fc1", "w3": "fc2"}[match[1]]


def resample_positions(
    pos_embed: torch.Tensor, prefix: int, grid: int, offset: float = 0.1, antialias: bool = False
) -> torch.Tensor:
    """DINOv2's `DinoVisionTransformer.interpolate_pos_encoding` (facebookresearch/dinov2,
    dinov2/models/vision_transformer.py): the `prefix` rows kept apart, the grid resized bicubic in
    float32, corners not aligned. The hub models without registers ask for the scale factor
    (grid + 0.1) / old (its `interpolate_offset`, which F.interpolate uses to place the samples:
    not grid / old) without antialiasing; those with registers for the size, antialiased
    (`dinov2_vit*14_reg`: interpolate_offset 0, interpolate_antialias True)."""
    head, table = pos_embed[:, :prefix], pos_embed[:, prefix:]
    old = math.isqrt(table.shape[1])
    table = table.float().reshape(1, old, old, -1).permute(0, 3, 1, 2)  # (1, D, old, old)
    sizing = {"scale_factor": ((grid + offset) / old,) * 2} if offset else {"size": (grid, grid)}
    table = F.interpolate(table, mode="bicubic", antialias=antialias, **sizing)
    table = table.permute(0, 2, 3, 1).reshape(1, grid * grid, -1).to(pos_embed.dtype)
    return torch.cat([head, table], dim=1)


# DINOv2 with registers: the size, antialiased
resample_positions_registers = functools.partial(resample_positions, offset=0.0, antialias=True)

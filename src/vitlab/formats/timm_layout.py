"""timm's ViT checkpoints, read into vitlab's layout and written from it.

A `VisionTransformer` state dict (`model.state_dict()` saved with safetensors or torch.save, or a
`save_for_hf` folder with its config.json) has vitlab's block names and fused qkv, with
`patch_embed.proj`, `fc_norm` (the norm after average pooling) and the hybrid's ResNetV2 under
`patch_embed.backbone`. The weights do not say the GELU form, the LayerNorm eps or the heads: timm's
defaults (exact GELU, eps 1e-6) unless config.json's model_args say otherwise; the heads from the
caller, model_args, or the variant table by width. A file without a classifier (num_classes=0)
gives a state without `head.*`, its config a placeholder head of 1 class.
"""

from __future__ import annotations

import functools
import math
import re

import torch

from ..config import VARIANTS, ModelConfig
from ..errors import CheckpointError, ExportError
from .interop import (
    check_normalisation,
    label_names,
    nearest_variant,
    refuse_unrepresentable,
    rename_keys,
)

# (their key prefix, ours), "{}" standing for a number; every key of a file must match one.
_TIMM_KEYS = [
    ("patch_embed.proj.", "patch_embed."),
    ("patch_embed.backbone.stem.conv.", "stem.conv_root."),
    ("patch_embed.backbone.stem.norm.", "stem.gn_root."),
    ("patch_embed.backbone.stages.{}.blocks.{}.downsample.conv.", "stem.stages.{}.{}.conv_proj."),
    ("patch_embed.backbone.stages.{}.blocks.{}.downsample.norm.", "stem.stages.{}.{}.gn_proj."),
    ("patch_embed.backbone.stages.{}.blocks.{}.conv{}.", "stem.stages.{}.{}.conv{}."),
    ("patch_embed.backbone.stages.{}.blocks.{}.norm{}.", "stem.stages.{}.{}.gn{}."),
    ("cls_token", "cls_token"),
    ("pos_embed", "pos_embed"),
    ("norm.weight", "norm.weight"),
    ("norm.bias", "norm.bias"),
    ("head.weight", "head.weight"),
    ("head.bias", "head.bias"),  # a linear head only
] + [
    (f"blocks.{{}}.{m}.", f"blocks.{{}}.{m}.")
    for m in ("norm1", "norm2", "attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
]

# timm's names of the sizes in vitlab's variant table, and its hybrids: (stages, width) -> (name,
# depth, heads).
_TIMM_SIZES = {192: "tiny", 384: "small", 768: "base", 1024: "large", 1280: "huge"}
_TIMM_HYBRIDS = {
    ((3, 4, 9), 768): ("vit_base_r50_s16_224", 12, 12),
    ((2, 2, 2, 2), 384): ("vit_small_r26_s32_224", 12, 6),
    ((2, 2, 2, 2), 768): ("vit_base_r26_s32_224", 12, 12),
    ((3, 4, 6, 3), 1024): ("vit_large_r50_s32_224", 24, 16),
}


def _stem(state: dict) -> tuple[tuple[int, ...], int]:
    """(units per stage, width factor) of a hybrid stem in vitlab's keys; ((), 1) for none."""
    units = {}
    for key in state:
        match = re.fullmatch(r"stem\.stages\.(\d+)\.(\d+)\.conv1\.weight", key)
        if match:
            units[int(match[1])] = max(units.get(int(match[1]), 0), int(match[2]) + 1)
    root = state.get("stem.conv_root.weight")
    return tuple(units[s] for s in sorted(units)), (root.shape[0] // 64 if root is not None else 1)


def _grid(pos_rows: int, prefix: int, name: str, field: str) -> int:
    grid = math.isqrt(pos_rows - prefix)
    if prefix and math.isqrt(pos_rows) ** 2 == pos_rows and grid * grid != pos_rows - prefix:
        raise CheckpointError(
            f"{name}: {field} has no row for the class token (timm's no_embed_class), which "
            "vitlab does not compute"
        )
    if grid * grid != pos_rows - prefix:
        raise CheckpointError(
            f"{name}: {field} of {pos_rows - prefix} patches is not a square grid (a rectangular "
            "image), which vitlab does not compute"
        )
    return grid


def timm_keys(state: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """A timm state dict in vitlab's keys (fc_norm as `norm`, a missing qkv bias as zeros, which
    computes the same)."""
    refuse_unrepresentable(state, name)
    state = {("norm." + k[8:] if k.startswith("fc_norm.") else k): v for k, v in state.items()}
    state = rename_keys(state, _TIMM_KEYS, name)
    for key in [k for k in state if k.endswith(".attn.qkv.weight")]:
        state.setdefault(
            key.replace("weight", "bias"), torch.zeros(state[key].shape[0], dtype=state[key].dtype)
        )
    return state


def from_timm(
    state: dict[str, torch.Tensor],
    name: str,
    config_json: dict | None = None,
    heads: int | None = None,
    default_heads: int | None = None,
):
    """(ModelConfig, vitlab state dict, class names or None) of a timm ViT state dict and its
    config.json, if any. The attention heads: `heads` if given (a variant the user named), else
    config.json's, else the variant table's for the width, else `default_heads`."""
    config_json = config_json or {}
    args, pretrained = config_json.get("model_args") or {}, config_json.get("pretrained_cfg") or {}
    check_normalisation(
        pretrained.get("mean"),
        pretrained.get("std"),
        "config.json's pretrained_cfg mean and std",
        name,
    )
    fc_norm = "fc_norm.weight" in state
    state = timm_keys(state, name)
    patch, layers, width_factor = _patches(state, name)
    pool = _check_pooling(state, config_json, fc_norm, name)
    act = _check_layers(args, name)
    width = state["pos_embed"].shape[-1]
    base = nearest_variant(width, patch, bool(layers))
    heads = _heads(heads, args.get("num_heads"), base, default_heads, width, name)
    grid = _grid(state["pos_embed"].shape[1], int("cls_token" in state), name, "pos_embed")
    config = ModelConfig(
        name=base.name if base else "B/16",
        patch_size=patch,
        hidden_size=width,
        depth=_depth(state),
        num_heads=heads,
        mlp_dim=state["blocks.0.mlp.fc1.weight"].shape[0],
        dropout_rate=0.0,
        classifier="token" if "cls_token" in state else "gap",
        final_norm="after_pool" if fc_norm and pool == "avg" else "before_pool",
        resnet_layers=layers,
        resnet_width_factor=width_factor,
        stem_norm="timm" if layers else "flax",
        num_classes=state["head.weight"].shape[0] if "head.weight" in state else 1,
        img_size=grid * patch,
        gelu="tanh" if act == "gelu_tanh" else "exact",
    )
    return config, state, label_names(config_json.get("label_names"), config.num_classes)


def _patches(state: dict, name: str) -> tuple[int, tuple[int, ...], int]:
    """(patch size, the hybrid stem's units per stage, its width factor) of a state in vitlab's
    keys; refused if it is no ViT or its patches are not square."""
    if (
        "pos_embed" not in state
        or "patch_embed.weight" not in state
        or "blocks.0.mlp.fc1.weight" not in state
    ):
        raise CheckpointError(
            f"{name}: no pos_embed, patch_embed or blocks.0: not a timm ViT state dict"
        )
    kernel = state["patch_embed.weight"].shape[-2:]
    if kernel[0] != kernel[1]:
        raise CheckpointError(
            f"{name}: patch_embed.proj has rectangular patches {tuple(kernel)}, which vitlab does "
            "not compute"
        )
    layers, width_factor = _stem(state)
    return kernel[0] * (4 * 2 ** (len(layers) - 1) if layers else 1), layers, width_factor


def _check_pooling(state: dict, config_json: dict, fc_norm: bool, name: str) -> str:
    """The pooling ("token" or "avg"): the only one vitlab computes with, or without, a class
    token; refused where config.json or an fc_norm beside a class token says another."""
    args = config_json.get("model_args") or {}
    pool = "token" if "cls_token" in state else "avg"
    if config_json.get("global_pool", args.get("global_pool", pool)) != pool:
        raise CheckpointError(
            f"{name}: global_pool {config_json.get('global_pool', args.get('global_pool'))!r} in "
            f"a model {'with' if pool == 'token' else 'without'} a class token: vitlab pools the "
            "class token, or averages the patch tokens of a model without one"
        )
    if (
        fc_norm
        and pool == "token"
        and "global_pool" not in config_json
        and "global_pool" not in args
    ):
        raise CheckpointError(
            f"{name}: fc_norm beside a class token, most likely average pooling beside it "
            "(global_pool 'avg'), which vitlab does not compute"
        )
    return pool


def _check_layers(args: dict, name: str) -> str:
    """model_args' act_layer ("gelu" or "gelu_tanh"), refused with a norm other than LayerNorm."""
    act = args.get("act_layer", "gelu")
    if act not in ("gelu", "gelu_tanh") or args.get("norm_layer", "layernorm") != "layernorm":
        field = "act_layer" if act not in ("gelu", "gelu_tanh") else "norm_layer"
        raise CheckpointError(
            f"{name}: model_args {field} {args[field]!r}: vitlab computes LayerNorm and GELU "
            "(exact or tanh) only"
        )
    return act


def _heads(
    given: int | None,
    in_file: int | None,
    base: ModelConfig | None,
    default: int | None,
    width: int,
    name: str,
) -> int:
    if given and in_file and given != in_file:
        raise CheckpointError(
            f"{name}: config.json says num_heads {in_file}, {given} were asked for"
        )
    heads = given or in_file or (base.num_heads if base else None) or default
    if not heads:
        raise CheckpointError(
            f"{name}: a width of {width} is no vitlab variant's and the weights do not say the "
            "number of attention heads; pass the variant with --model_type"
        )
    return heads


def _depth(state: dict) -> int:
    return 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))


def to_timm(model) -> dict[str, torch.Tensor]:
    """The model's state dict in timm's keys (refused where timm's VisionTransformer would compute
    otherwise)."""
    timm_args(model.config)  # the refusals
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    state = rename_keys(state, _TIMM_KEYS, "the model", reverse=True)
    if model.config.classifier == "gap" and model.config.final_norm == "after_pool":
        state = {("fc_norm." + k[5:] if k.startswith("norm.") else k): v for k, v in state.items()}
    return state


def timm_args(config: ModelConfig) -> tuple[str, dict]:
    """(timm architecture, `timm.create_model` keyword arguments) that build `config`'s function."""
    if config.representation_size:
        raise ExportError(
            "timm's VisionTransformer has no pre-logits layer (representation_size); export hf, "
            "safetensors or npz"
        )
    kwargs = {"num_classes": config.num_classes}
    if config.is_hybrid:
        name, depth, heads = _TIMM_HYBRIDS.get(
            (config.resnet_layers, config.hidden_size), (None, 0, 0)
        )
        if name is None or config.resnet_width_factor != 1:
            raise ExportError(
                f"timm has no hybrid of ResNet stages {config.resnet_layers} and width "
                f"{config.hidden_size}"
            )
        if config.stem_norm != "timm":
            raise ExportError(
                "timm's hybrids standardise the stem's convolutions otherwise than the official "
                "code (stem_norm flax)"
            )
        kernel = config.patch_size // config.stem_stride
        base = {
            "patch_size": 1,
            "hidden_size": config.hidden_size,
            "depth": depth,
            "num_heads": heads,
        }
        kwargs.update({"patch_size": kernel} if kernel != 1 else {})
    else:
        variant = nearest_variant(config.hidden_size, config.patch_size, False) or VARIANTS["B/16"]
        name = f"vit_{_TIMM_SIZES[variant.hidden_size]}_patch{variant.patch_size}_224"
        base = {f: getattr(variant, f) for f in ("patch_size", "hidden_size", "depth", "num_heads")}
        kwargs.update(
            {"patch_size": config.patch_size} if config.patch_size != variant.patch_size else {}
        )
    timm_names = {"hidden_size": "embed_dim", "depth": "depth", "num_heads": "num_heads"}
    kwargs.update(
        {timm_names[f]: getattr(config, f) for f in timm_names if getattr(config, f) != base[f]}
    )
    if config.mlp_dim != 4 * config.hidden_size:
        kwargs["mlp_ratio"] = config.mlp_dim / config.hidden_size
    if config.img_size != 224:
        kwargs["img_size"] = config.img_size
    if config.classifier == "gap":
        kwargs.update(
            class_token=False,
            global_pool="avg",
            **({"fc_norm": False} if config.final_norm == "before_pool" else {}),
        )
    if config.gelu == "tanh":
        kwargs["act_layer"] = "gelu_tanh"
    if config.layer_norm_eps != 1e-6:
        kwargs["norm_layer"] = functools.partial(torch.nn.LayerNorm, eps=config.layer_norm_eps)
    return name, kwargs


def format_args(kwargs: dict) -> str:
    """Keyword arguments as Python source (a LayerNorm of another eps included)."""

    def shown(key, value) -> str:
        return (
            f"functools.partial(torch.nn.LayerNorm, eps={value.keywords['eps']!r})"
            if key == "norm_layer"
            else repr(value)
        )

    return ", ".join(f"{k}={shown(k, v)}" for k, v in kwargs.items())

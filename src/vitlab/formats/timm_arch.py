"""Which timm model computes a vitlab configuration: the architecture's name and the
`timm.create_model` keyword arguments, for `vitlab export --format timm` (the state dict's keys are
timm_layout.py's), or a refusal where timm's VisionTransformer would compute otherwise."""

from __future__ import annotations

import functools

import torch

from ..config import ModelConfig
from ..errors import ExportError

# timm's names of the sizes in vitlab's variant table, and its hybrids: (stages, width) -> (name,
# depth, heads).
_TIMM_SIZES = {192: "tiny", 384: "small", 768: "base", 1024: "large", 1280: "huge"}
# size -> (width, depth, heads, patch sizes of its vit_<size>_patch<P>_224 architectures)
_TIMM_SHAPES = {
    "tiny": (192, 12, 3, (16,)),
    "small": (384, 12, 6, (16, 32)),
    "base": (768, 12, 12, (16, 32, 8)),
    "large": (1024, 24, 16, (16, 32)),
    "huge": (1280, 32, 16, (14,)),
}
_TIMM_HYBRIDS = {
    ((3, 4, 9), 768): ("vit_base_r50_s16_224", 12, 12),
    ((2, 2, 2, 2), 384): ("vit_small_r26_s32_224", 12, 6),
    ((2, 2, 2, 2), 768): ("vit_base_r26_s32_224", 12, 12),
    ((3, 4, 6, 3), 1024): ("vit_large_r50_s32_224", 24, 16),
}
# timm's act_layer names of the GELU forms vitlab computes (a SwiGLU MLP gates with SiLU)
GELUS = {"gelu": "exact", "gelu_tanh": "tanh", "quick_gelu": "quick"}
_TIMM_ACTS = {form: name for name, form in GELUS.items()}
POOLS = {"token": "token", "avg": "gap", "map": "map"}  # timm's global_pool -> vitlab's classifier


def timm_args(config: ModelConfig) -> tuple[str, dict]:
    """(timm architecture, `timm.create_model` keyword arguments) that build `config`'s function."""
    refusals = [
        (config.representation_size, "pre-logits layer (representation_size)"),
        (
            config.classifier == "token_gap",
            "pooling of the class token beside the patches' mean (token_gap)",
        ),
        (
            config.pre_norm and config.patch_bias,
            "patch-embedding bias beside a norm before the blocks",
        ),
        (config.distilled and config.is_hybrid, "distilled hybrid"),
    ]
    for refused, what in refusals:
        if refused:
            raise ExportError(
                f"timm's VisionTransformer has no {what}; export hf, safetensors or npz"
            )
    name, kwargs = _timm_base(config)
    kwargs.update(_timm_options(config))
    return name, kwargs


def _timm_base(config: ModelConfig) -> tuple[str, dict]:
    """The timm architecture closest to `config` and the shape arguments that make it `config`'s."""
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
        size = _TIMM_SIZES.get(config.hidden_size, "base")
        width, depth, heads, patches = _TIMM_SHAPES[size]
        patch = config.patch_size if config.patch_size in patches else patches[0]
        if config.distilled:  # timm's DeiT class, whose sizes stop at base
            size = size if size in ("tiny", "small") else "base"
            width, depth, heads, _ = _TIMM_SHAPES[size]
            name, patch = f"deit_{size}_distilled_patch16_224", 16
        else:
            name = f"vit_{size}_patch{patch}_224"
        base = {"patch_size": patch, "hidden_size": width, "depth": depth, "num_heads": heads}
        kwargs.update({"patch_size": config.patch_size} if config.patch_size != patch else {})
    timm_names = {"hidden_size": "embed_dim", "depth": "depth", "num_heads": "num_heads"}
    kwargs.update(
        {timm_names[f]: getattr(config, f) for f in timm_names if getattr(config, f) != base[f]}
    )
    if config.img_size != 224:
        kwargs["img_size"] = config.img_size
    return name, kwargs


def _timm_options(config: ModelConfig) -> dict:
    """timm's keyword arguments for everything in `config` beyond the shape."""
    kwargs: dict = {}
    hidden = config.mlp_dim * (2 if config.mlp == "swiglu" else 1)
    if hidden != 4 * config.hidden_size:
        kwargs["mlp_ratio"] = hidden / config.hidden_size
    if config.mlp == "swiglu":
        from timm.layers import SwiGLUPacked

        kwargs.update(mlp_layer=SwiGLUPacked, act_layer="silu")
    elif config.gelu != "exact":
        kwargs["act_layer"] = _TIMM_ACTS[config.gelu]
    if not config.has_class_token:
        kwargs["class_token"] = False
    pool = {v: k for k, v in POOLS.items()}[config.classifier]
    if pool != "token" or not config.has_class_token:
        kwargs["global_pool"] = pool
    # timm puts the final norm after average pooling by default, before any other
    if (config.final_norm == "after_pool") != (pool == "avg"):
        kwargs["fc_norm"] = config.final_norm == "after_pool"
    if config.reg_tokens:
        kwargs["reg_tokens"] = config.reg_tokens
    if not config.pos_embed_prefix:
        kwargs["no_embed_class"] = True
    if config.layer_scale:
        kwargs["init_values"] = config.layer_scale
    if config.pre_norm:
        kwargs["pre_norm"] = True
    if config.layer_norm_eps != 1e-6:
        kwargs["norm_layer"] = functools.partial(torch.nn.LayerNorm, eps=config.layer_norm_eps)
    return kwargs


def format_args(kwargs: dict) -> str:
    """Keyword arguments as Python source (a LayerNorm of another eps, timm's SwiGLU included)."""

    def shown(key, value) -> str:
        if key == "norm_layer":
            return f"functools.partial(torch.nn.LayerNorm, eps={value.keywords['eps']!r})"
        if key == "mlp_layer":  # the only one vitlab passes
            return "timm.layers.SwiGLUPacked"
        return repr(value)

    return ", ".join(f"{k}={shown(k, v)}" for k, v in kwargs.items())

"""timm's ViT checkpoints, read into vitlab's layout and written from it.

A `VisionTransformer` state dict (`model.state_dict()` saved with safetensors or torch.save, or a
`save_for_hf` folder with its config.json) has vitlab's block names and fused qkv, with
`patch_embed.proj`, `fc_norm` (the norm after average pooling), the hybrid's ResNetV2 under
`patch_embed.backbone`, and the later families' parts under the names vitlab took from it
(`reg_token`, `dist_token` and `head_dist`, `ls1.gamma`, `norm_pre`, `attn_pool`). What the weights
do not say (the GELU form, the LayerNorm eps, the heads, how images are fed) comes from config.json:
`model_args`, the architecture's name (timm's CLIP towers: eps 1e-5, QuickGELU where the name says
so) and `pretrained_cfg`; else from the variant the user named; else timm's defaults (exact GELU,
eps 1e-6) and images in [-1, 1]. A file without a classifier (num_classes=0) gives a state without
`head.*`, its config a placeholder head of 1 class.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F

from ..config import ModelConfig, family
from ..errors import CheckpointError
from .interop import label_names, nearest_variant, refuse_unrepresentable, rename_keys
from .timm_arch import GELUS, POOLS, timm_args

# (their key prefix, ours), "{}" standing for a number; every key of a file must match one.
_TIMM_KEYS = (
    [
        ("patch_embed.proj.", "patch_embed."),
        ("patch_embed.backbone.stem.conv.", "stem.conv_root."),
        ("patch_embed.backbone.stem.norm.", "stem.gn_root."),
        (
            "patch_embed.backbone.stages.{}.blocks.{}.downsample.conv.",
            "stem.stages.{}.{}.conv_proj.",
        ),
        ("patch_embed.backbone.stages.{}.blocks.{}.downsample.norm.", "stem.stages.{}.{}.gn_proj."),
        ("patch_embed.backbone.stages.{}.blocks.{}.conv{}.", "stem.stages.{}.{}.conv{}."),
        ("patch_embed.backbone.stages.{}.blocks.{}.norm{}.", "stem.stages.{}.{}.gn{}."),
        ("cls_token", "cls_token"),
        ("dist_token", "dist_token"),
        ("reg_token", "reg_token"),
        ("pos_embed", "pos_embed"),
        ("norm_pre.weight", "norm_pre.weight"),
        ("norm_pre.bias", "norm_pre.bias"),
        ("norm.weight", "norm.weight"),
        ("norm.bias", "norm.bias"),
        ("head.weight", "head.weight"),
        ("head.bias", "head.bias"),  # a linear head only
        ("head_dist.weight", "head_dist.weight"),
        ("head_dist.bias", "head_dist.bias"),
        ("attn_pool.latent", "attn_pool.latent"),
    ]
    + [
        (f"blocks.{{}}.{m}.", f"blocks.{{}}.{m}.")
        for m in ("norm1", "norm2", "attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "ls1", "ls2")
    ]
    + [
        (f"attn_pool.{m}.", f"attn_pool.{m}.")
        for m in ("q", "kv", "proj", "norm", "mlp.fc1", "mlp.fc2")
    ]
)


def _stem(state: dict) -> tuple[tuple[int, ...], int]:
    """(units per stage, width factor) of a hybrid stem in vitlab's keys; ((), 1) for none."""
    units = {}
    for key in state:
        match = re.fullmatch(r"stem\.stages\.(\d+)\.(\d+)\.conv1\.weight", key)
        if match:
            units[int(match[1])] = max(units.get(int(match[1]), 0), int(match[2]) + 1)
    root = state.get("stem.conv_root.weight")
    return tuple(units[s] for s in sorted(units)), (root.shape[0] // 64 if root is not None else 1)


def _positions(rows: int, prefix: int, stated: bool | None, name: str) -> tuple[int, bool]:
    """(patches per side, whether the prefix tokens have position rows) of a position table of
    `rows` rows beside `prefix` prefix tokens; `stated`: config.json's no_embed_class, if any."""
    layouts = [True, False] if stated is None else [not stated]
    for with_prefix in layouts:
        patches = rows - prefix if with_prefix else rows
        if patches > 0 and math.isqrt(patches) ** 2 == patches:
            return math.isqrt(patches), with_prefix
    raise CheckpointError(
        f"{name}: pos_embed of {rows} rows beside {prefix} prefix tokens is not a square grid (a "
        "rectangular image), which vitlab does not compute"
    )


def resample_positions(pos_embed: torch.Tensor, prefix: int, grid: int) -> torch.Tensor:
    """timm's `resample_abs_pos_embed` as its loader calls it: the `prefix` rows kept apart, the grid
    resized to `grid` x `grid` bicubic, antialiased, corners not aligned, in float32."""
    head, table = pos_embed[:, :prefix], pos_embed[:, prefix:]
    old = math.isqrt(table.shape[1])
    table = table.float().reshape(1, old, old, -1).permute(0, 3, 1, 2)  # (1, D, old, old)
    table = F.interpolate(table, size=(grid, grid), mode="bicubic", antialias=True)
    table = table.permute(0, 2, 3, 1).reshape(1, grid * grid, -1).to(pos_embed.dtype)
    return torch.cat([head, table], dim=1)


def timm_keys(state: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """A timm state dict in vitlab's keys (fc_norm as `norm`, a missing qkv or patch-embedding bias
    where the rest of the file has one as zeros, which computes the same)."""
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
    variant: ModelConfig | None = None,
):
    """(ModelConfig, vitlab state dict, class names or None) of a timm ViT state dict and its
    config.json, if any. `variant`: the variant the user named (or the model the file is loaded
    into), which gives the heads and how images are fed where neither the weights nor config.json
    say; else the attention heads come from config.json or the variant table by width."""
    config_json = config_json or {}
    args = config_json.get("model_args") or {}
    fc_norm = "fc_norm.weight" in state
    state = timm_keys(state, name)
    patch, layers, width_factor = _patches(state, name)
    width = state["pos_embed"].shape[-1]
    has_class_token = "cls_token" in state
    reg_tokens = state["reg_token"].shape[1] if "reg_token" in state else 0
    prefix = has_class_token + ("dist_token" in state) + reg_tokens
    grid, pos_embed_prefix = _positions(
        state["pos_embed"].shape[1], prefix, args.get("no_embed_class"), name
    )
    classifier = _pooling(state, config_json, fc_norm, name)
    base = variant or nearest_variant(width, patch, bool(layers))
    heads = _heads(variant.num_heads if variant else None, args.get("num_heads"), base, width, name)
    mlp, mlp_dim = _mlp(state, name)
    config = ModelConfig(
        name=base.name if base else "B/16",
        patch_size=patch,
        hidden_size=width,
        depth=_depth(state),
        num_heads=heads,
        mlp_dim=mlp_dim,
        dropout_rate=0.0,
        classifier=classifier,
        class_token=has_class_token,
        distilled="dist_token" in state,
        reg_tokens=reg_tokens,
        pos_embed_prefix=pos_embed_prefix,
        pre_norm="norm_pre.weight" in state,
        patch_bias="patch_embed.bias" in state,
        layer_scale=_layer_scale(state, args, variant),
        mlp=mlp,
        final_norm="after_pool" if fc_norm else "before_pool",
        resnet_layers=layers,
        resnet_width_factor=width_factor,
        stem_norm="timm" if layers else "flax",
        num_classes=state["head.weight"].shape[0] if "head.weight" in state else 1,
        img_size=grid * patch,
        **_function(config_json, variant, mlp, name),
        **_preprocessing(config_json.get("pretrained_cfg") or {}, variant, name),
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


def _pooling(state: dict, config_json: dict, fc_norm: bool, name: str) -> str:
    """vitlab's classifier for timm's global_pool: as config.json says, else what the weights show
    (attention pooling's parameters; an fc_norm, which timm adds for average pooling, beside a class
    token: MAE's fine-tuned models)."""
    args = config_json.get("model_args") or {}
    stated = config_json.get("global_pool", args.get("global_pool"))
    if "attn_pool.latent" in state:
        pool = "map"
    elif stated is not None:
        pool = stated
    else:
        pool = "avg" if fc_norm or "cls_token" not in state else "token"
    if (
        pool not in POOLS
        or (pool == "token" and "cls_token" not in state)
        or (pool == "map" and "attn_pool.latent" not in state)
    ):
        raise CheckpointError(
            f"{name}: global_pool {pool!r} in a model {'with' if 'cls_token' in state else 'without'}"
            " a class token: vitlab pools the class token, averages the patch tokens, or attends "
            "over them (map)"
        )
    if "attn_pool.latent" in state and state["attn_pool.latent"].shape[1] != 1:
        raise CheckpointError(
            f"{name}: attention pooling with {state['attn_pool.latent'].shape[1]} latent queries; "
            "vitlab's has one"
        )
    return POOLS[pool]


def _mlp(state: dict, name: str) -> tuple[str, int]:
    """("gelu" or "swiglu", the hidden width): timm's packed SwiGLU has an fc1 twice fc2's input."""
    fc1, fc2 = state["blocks.0.mlp.fc1.weight"].shape[0], state["blocks.0.mlp.fc2.weight"].shape[1]
    if fc1 == fc2:
        return "gelu", fc2
    if fc1 == 2 * fc2:
        return "swiglu", fc2
    raise CheckpointError(
        f"{name}: an MLP of {fc1} and {fc2} hidden units, which vitlab does not compute"
    )


def _layer_scale(state: dict, args: dict, variant: ModelConfig | None) -> float | None:
    """Layer scale's starting value where the model has it (the weights are loaded over it): timm's
    init_values, else the variant's, else DINOv2's and DeiT III's 1e-5."""
    if "blocks.0.ls1.gamma" not in state:
        return None
    return args.get("init_values") or (variant.layer_scale if variant else None) or 1e-5


def _function(config_json: dict, variant: ModelConfig | None, mlp: str, name: str) -> dict:
    """The GELU form and LayerNorm eps, which the weights do not say: as timm computes them for
    config.json's architecture and model_args, else for its architecture of the variant's family
    (timm's CLIP towers: eps 1e-5; its other ViTs: 1e-6; the exact GELU unless the architecture or
    model_args name another, or a CLIP architecture is read as the variant named)."""
    args, arch = config_json.get("model_args") or {}, config_json.get("architecture", "")
    act = args.get("act_layer") or ("quick_gelu" if "quickgelu" in arch else None)
    if mlp == "swiglu":
        if act not in (None, "silu", "swish"):
            raise CheckpointError(
                f"{name}: model_args act_layer {act!r}: vitlab's SwiGLU gates with SiLU"
            )
        act = None
    elif act is not None and act not in GELUS:
        raise CheckpointError(
            f"{name}: model_args act_layer {act!r}: vitlab computes the GELU (exact, tanh or quick)"
        )
    if args.get("norm_layer", "layernorm") != "layernorm":
        raise CheckpointError(
            f"{name}: model_args norm_layer {args['norm_layer']!r}: vitlab computes LayerNorm only"
        )
    clip = "_clip_" in arch if arch else variant is not None and "clip" in family(variant.name)
    gelu = GELUS[act or "gelu"]
    if clip and act is None and mlp == "gelu" and variant is not None:
        # timm loads OpenAI's weights as vit_*_clip_224.openai (the exact GELU) and, from the same
        # repository, as vit_*_clip_quickgelu_224.openai: the name does not say what the weights
        # were trained with; the variant named does (clip-*: QuickGELU, openclip-*: exact)
        gelu = variant.gelu
    return {"gelu": gelu, "layer_norm_eps": 1e-5 if clip else 1e-6}


def _preprocessing(pretrained: dict, variant: ModelConfig | None, name: str) -> dict:
    """How images were fed, from timm's pretrained_cfg (its resize keeps the aspect and crops the
    centre, unless crop_mode is squash), else the variant's, else images in [-1, 1]."""
    if not pretrained.get("mean"):
        return variant.preprocessing() if variant is not None else {}
    interpolation = pretrained.get("interpolation", "bicubic")
    if interpolation not in ("bilinear", "bicubic") or pretrained.get(
        "crop_mode", "center"
    ) not in (
        "center",
        "squash",
    ):
        raise CheckpointError(
            f"{name}: pretrained_cfg interpolation {interpolation!r}, crop_mode "
            f"{pretrained.get('crop_mode')!r}: vitlab resizes bilinear or bicubic, centre crop or squash"
        )
    return {
        "image_mean": tuple(pretrained["mean"]),
        "image_std": tuple(pretrained["std"]),
        "resize": "squash" if pretrained.get("crop_mode") == "squash" else "shorter_side",
        "crop_pct": pretrained.get("crop_pct", 0.875),
        "interpolation": interpolation,
    }


def _heads(
    given: int | None,
    in_file: int | None,
    base: ModelConfig | None,
    width: int,
    name: str,
) -> int:
    if given and in_file and given != in_file:
        raise CheckpointError(
            f"{name}: config.json says num_heads {in_file}, {given} were asked for"
        )
    heads = given or in_file or (base.num_heads if base else None)
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
    config = model.config
    timm_args(config)  # the refusals
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if not config.patch_bias and not config.pre_norm:  # timm's patch embedding has a bias here
        state["patch_embed.bias"] = torch.zeros(config.hidden_size, dtype=state["pos_embed"].dtype)
    state = rename_keys(state, _TIMM_KEYS, "the model", reverse=True)
    if config.final_norm == "after_pool":
        state = {("fc_norm." + k[5:] if k.startswith("norm.") else k): v for k, v in state.items()}
    return state

"""timm's and Hugging Face transformers' ViT checkpoints, read into vitlab's layout and written from
it.

- timm: a `VisionTransformer` state dict (`model.state_dict()` saved with safetensors or torch.save, or a
  `save_for_hf` folder with its config.json). vitlab's block names and fused qkv, with `patch_embed.proj`,
  `fc_norm` (the norm after average pooling) and the hybrid's ResNetV2 under `patch_embed.backbone`. The weights
  do not say the GELU form, the LayerNorm eps or the heads: timm's defaults (exact GELU, eps 1e-6) unless
  config.json's model_args say otherwise; the heads from the caller, model_args, or the variant table by width.
- transformers: `ViTForImageClassification` or `ViTModel` as `save_pretrained` writes them (config.json and
  model.safetensors or pytorch_model.bin, keys as the Hub holds them): query, key and value apart, the GELU form,
  LayerNorm eps (1e-12 in google/vit-* configs), qkv bias and class names in config.json; ViTModel's pooler is
  vitlab's tanh pre-logits layer.
Whatever vitlab cannot compute exactly raises CheckpointError naming the field: nothing is loaded
approximately. A file without a classifier (timm's num_classes=0, a ViTModel) gives a state without
`head.*`, its config a placeholder head of 1 class.
"""

from __future__ import annotations

import functools
import math
import re

import torch

from ..config import VARIANTS, ModelConfig
from ..errors import CheckpointError, ExportError

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
_HF_KEYS = [
    ("vit.embeddings.patch_embeddings.projection.", "patch_embed."),
    ("vit.embeddings.cls_token", "cls_token"),
    ("vit.embeddings.position_embeddings", "pos_embed"),
    ("vit.encoder.layer.{}.layernorm_before.", "blocks.{}.norm1."),
    ("vit.encoder.layer.{}.attention.output.dense.", "blocks.{}.attn.proj."),
    ("vit.encoder.layer.{}.layernorm_after.", "blocks.{}.norm2."),
    ("vit.encoder.layer.{}.intermediate.dense.", "blocks.{}.mlp.fc1."),
    ("vit.encoder.layer.{}.output.dense.", "blocks.{}.mlp.fc2."),
    ("vit.layernorm.", "norm."),
    ("vit.pooler.dense.", "pre_logits.0."),
    ("classifier.weight", "head.weight"),
    ("classifier.bias", "head.bias"),
]
_HF_QKV = "vit.encoder.layer.{}.attention.attention.{}.{}"  # block, query|key|value, weight|bias

# Parameters of what vitlab's ViT does not compute, by the name they have in a file.
_UNREPRESENTABLE = {
    "reg_token": "register tokens (reg_tokens)",
    ".ls1.": "layer scale (init_values)",
    ".ls2.": "layer scale (init_values)",
    ".q_norm.": "query-key normalisation (qk_norm)",
    ".k_norm.": "query-key normalisation (qk_norm)",
    "norm_pre.": "a norm before the blocks (pre_norm)",
    "attn_pool.": "attention pooling (global_pool 'map')",
    "dist_token": "a distillation token (DeiT)",
    "head_dist.": "a distillation head (DeiT)",
    "patch_embed.norm.": "a norm in the patch embedding",
    "mask_token": "a mask token (masked image modelling)",
    "decoder.": "a masked-image-modelling decoder",
}

# timm's names of the sizes in vitlab's variant table, and its hybrids: (stages, width) -> (name,
# depth, heads).
_TIMM_SIZES = {192: "tiny", 384: "small", 768: "base", 1024: "large", 1280: "huge"}
_TIMM_HYBRIDS = {
    ((3, 4, 9), 768): ("vit_base_r50_s16_224", 12, 12),
    ((2, 2, 2, 2), 384): ("vit_small_r26_s32_224", 12, 6),
    ((2, 2, 2, 2), 768): ("vit_base_r26_s32_224", 12, 12),
    ((3, 4, 6, 3), 1024): ("vit_large_r50_s32_224", 24, 16),
}
_HF_GELU = {
    "gelu": "exact",
    "gelu_python": "exact",
    "gelu_pytorch_tanh": "tanh",
    "gelu_new": "tanh",
    "gelu_python_tanh": "tanh",
}


@functools.cache
def _pattern(prefix: str) -> re.Pattern:
    return re.compile(re.escape(prefix).replace(r"\{\}", r"(\d+)") + "(.*)", re.DOTALL)


def _rename(state: dict, table: list[tuple[str, str]], name: str, reverse: bool = False) -> dict:
    """`state` with every key renamed by `table` (theirs -> ours, or back); a key no rule matches is
    refused."""
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


def _refuse_unrepresentable(state: dict, name: str) -> None:
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


def check_normalisation(mean, std, field: str, name: str) -> None:
    """vitlab feeds images in [-1, 1]: weights trained on other inputs would see other numbers."""
    if (
        mean is not None
        and std is not None
        and (any(abs(m - 0.5) > 1e-6 for m in mean) or any(abs(s - 0.5) > 1e-6 for s in std))
    ):
        raise CheckpointError(
            f"{name}: {field} normalise images with mean {list(mean)}, std {list(std)}; vitlab "
            "feeds the model images in [-1, 1] (mean 0.5, std 0.5), so it would compute other "
            "logits"
        )


def _variant(width: int, patch: int, hybrid: bool) -> ModelConfig | None:
    same_width = [
        v
        for v in VARIANTS.values()
        if v.hidden_size == width and v.is_hybrid == hybrid and v.name != "testing"
    ]
    return next(
        (v for v in same_width if v.patch_size == patch), same_width[0] if same_width else None
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
    _refuse_unrepresentable(state, name)
    state = {("norm." + k[8:] if k.startswith("fc_norm.") else k): v for k, v in state.items()}
    state = _rename(state, _TIMM_KEYS, name)
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
    if (
        "pos_embed" not in state
        or "patch_embed.weight" not in state
        or "blocks.0.mlp.fc1.weight" not in state
    ):
        raise CheckpointError(
            f"{name}: no pos_embed, patch_embed or blocks.0: not a timm ViT state dict"
        )
    width, kernel = state["pos_embed"].shape[-1], state["patch_embed.weight"].shape[-2:]
    if kernel[0] != kernel[1]:
        raise CheckpointError(
            f"{name}: patch_embed.proj has rectangular patches {tuple(kernel)}, which vitlab does "
            "not compute"
        )
    layers, width_factor = _stem(state)
    patch = kernel[0] * (4 * 2 ** (len(layers) - 1) if layers else 1)
    pool = (
        "token" if "cls_token" in state else "avg"
    )  # the only pooling vitlab computes with, or without, a class token
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
    act = args.get("act_layer", "gelu")
    if act not in ("gelu", "gelu_tanh") or args.get("norm_layer", "layernorm") != "layernorm":
        field = "act_layer" if act not in ("gelu", "gelu_tanh") else "norm_layer"
        raise CheckpointError(
            f"{name}: model_args {field} {args[field]!r}: vitlab computes LayerNorm and GELU "
            "(exact or tanh) only"
        )
    base = _variant(width, patch, bool(layers))
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
    return config, state, _label_names(config_json.get("label_names"), config.num_classes)


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


def _label_names(names, num_classes: int) -> list[str] | None:
    if isinstance(names, dict):
        names = [names.get(str(i), names.get(i)) for i in range(num_classes)]
    return (
        list(names)
        if isinstance(names, (list, tuple)) and len(names) == num_classes and None not in names
        else None
    )


def to_timm(model) -> dict[str, torch.Tensor]:
    """The model's state dict in timm's keys (refused where timm's VisionTransformer would compute
    otherwise)."""
    timm_args(model.config)  # the refusals
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    state = _rename(state, _TIMM_KEYS, "the model", reverse=True)
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
        variant = _variant(config.hidden_size, config.patch_size, False) or VARIANTS["B/16"]
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


# ---------------------------------------------------------------------------------------------
# transformers


def _hf_config(config_json: dict, name: str) -> dict:
    """The fields of a transformers ViT config.json that vitlab computes with, each checked."""

    def refuse(field: str, why: str):
        raise CheckpointError(f"{name}: config.json {field} {config_json.get(field)!r}: {why}")

    if config_json.get("model_type") != "vit":
        refuse("model_type", "vitlab reads transformers' ViT (model_type 'vit') only")
    if config_json.get("hidden_act", "gelu") not in _HF_GELU:
        refuse("hidden_act", "vitlab computes the exact or the tanh GELU only")
    sizes = {}
    for field in ("image_size", "patch_size"):
        value = config_json.get(field, 224 if field == "image_size" else 16)
        if isinstance(value, (list, tuple)):
            value = (
                value[0]
                if len(set(value)) == 1
                else refuse(field, "a rectangular grid, which vitlab does not compute")
            )
        sizes[field] = value
    if config_json.get("num_channels", 3) != 3:
        refuse("num_channels", "vitlab's ViT reads RGB images")
    width, heads = config_json.get("hidden_size", 768), config_json.get("num_attention_heads", 12)
    if config_json.get("head_dim", width // heads) * heads != width:
        refuse("head_dim", "vitlab's heads split the width evenly")
    return {**sizes, "width": width, "heads": heads}


def from_hf(
    config_json: dict, state: dict[str, torch.Tensor], name: str, preprocessor: dict | None = None
):
    """(ModelConfig, vitlab state dict, class names or None) of a transformers ViT's config.json and
    weights."""
    fields = _hf_config(config_json, name)
    if preprocessor and preprocessor.get("do_normalize", True):
        check_normalisation(
            preprocessor.get("image_mean"),
            preprocessor.get("image_std"),
            "preprocessor_config.json image_mean and image_std",
            name,
        )
    _refuse_unrepresentable(state, name)
    prefixed = any(k.startswith("vit.") for k in state)  # a ViTModel's keys have no prefix
    state = {(k if prefixed else "vit." + k): v for k, v in state.items()}
    depth, width = config_json.get("num_hidden_layers", 12), fields["width"]
    qkv = {}
    for i in range(depth):
        for part in ("weight", "bias"):
            keys = [_HF_QKV.format(i, n, part) for n in ("query", "key", "value")]
            if (
                part == "bias"
                and not config_json.get("qkv_bias", True)
                and not any(k in state for k in keys)
            ):
                qkv[f"blocks.{i}.attn.qkv.bias"] = torch.zeros(
                    3 * width
                )  # no bias computes as a zero bias
                continue
            if not all(k in state for k in keys):
                raise CheckpointError(
                    f"{name}: missing {next(k for k in keys if k not in state)}; is it a ViT of "
                    f"{depth} layers?"
                )
            qkv[f"blocks.{i}.attn.qkv.{part}"] = torch.cat([state.pop(k) for k in keys])
    state = {**_rename(state, _HF_KEYS, name), **qkv}
    if "pre_logits.0.weight" in state and config_json.get("pooler_act", "tanh") != "tanh":
        raise CheckpointError(
            f"{name}: config.json pooler_act {config_json['pooler_act']!r}: vitlab's pre-logits "
            "layer is tanh"
        )
    num_classes = state["head.weight"].shape[0] if "head.weight" in state else 1
    base = _variant(width, fields["patch_size"], False)
    config = ModelConfig(
        name=base.name if base else "B/16",
        patch_size=fields["patch_size"],
        hidden_size=width,
        depth=depth,
        num_heads=fields["heads"],
        mlp_dim=config_json.get("intermediate_size", 3072),
        dropout_rate=float(config_json.get("hidden_dropout_prob", 0.0)),
        attention_dropout_rate=float(config_json.get("attention_probs_dropout_prob", 0.0)),
        num_classes=num_classes,
        representation_size=state["pre_logits.0.weight"].shape[0]
        if "pre_logits.0.weight" in state
        else None,
        img_size=fields["image_size"],
        layer_norm_eps=float(config_json.get("layer_norm_eps", 1e-12)),
        gelu=_HF_GELU[config_json.get("hidden_act", "gelu")],
    )
    return (
        config,
        state,
        _label_names(config_json.get("id2label"), num_classes) if "head.weight" in state else None,
    )


def to_hf(model, class_names: list[str]) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json, state dict) of a `ViTForImageClassification` that computes the model's
    function."""
    config = model.config
    refusals = [
        (
            config.classifier != "token",
            "transformers' ViT classifies the class token (this model: classifier gap)",
        ),
        (
            bool(config.representation_size),
            "ViTForImageClassification has no pre-logits layer (representation_size)",
        ),
        (config.is_hybrid, "transformers' ViT has no ResNet stem (a hybrid model)"),
    ]
    for refused, why in refusals:
        if refused:
            raise ExportError(f"{why}; export timm, safetensors or npz")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    out = _rename(
        {k: v for k, v in state.items() if ".attn.qkv." not in k},
        _HF_KEYS,
        "the model",
        reverse=True,
    )
    for i in range(config.depth):
        for part in ("weight", "bias"):
            for n, chunk in zip(
                ("query", "key", "value"),
                state[f"blocks.{i}.attn.qkv.{part}"].chunk(3),
                strict=False,
            ):
                out[_HF_QKV.format(i, n, part)] = chunk.contiguous()
    config_json = {
        "architectures": ["ViTForImageClassification"],
        "model_type": "vit",
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.depth,
        "num_attention_heads": config.num_heads,
        "intermediate_size": config.mlp_dim,
        "hidden_act": "gelu" if config.gelu == "exact" else "gelu_pytorch_tanh",
        "hidden_dropout_prob": config.dropout_rate,
        "attention_probs_dropout_prob": config.attention_dropout_rate,
        "layer_norm_eps": config.layer_norm_eps,
        "image_size": config.img_size,
        "patch_size": config.patch_size,
        "num_channels": 3,
        "qkv_bias": True,
        "id2label": {str(i): n for i, n in enumerate(class_names)},
        "label2id": {n: i for i, n in enumerate(class_names)},
        "dtype": "float32",
    }
    return config_json, out

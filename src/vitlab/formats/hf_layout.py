"""Hugging Face transformers' ViT checkpoints, read into vitlab's layout and written from it.

`ViTForImageClassification` or `ViTModel` as `save_pretrained` writes them (config.json and
model.safetensors or pytorch_model.bin, keys as the Hub holds them): query, key and value apart, the
GELU form, LayerNorm eps (1e-12 in google/vit-* configs), qkv bias and class names in config.json;
ViTModel's pooler is vitlab's tanh pre-logits layer. A ViTModel (no classifier) gives a state
without `head.*`, its config a placeholder head of 1 class.
"""

from __future__ import annotations

import torch

from ..config import ModelConfig
from ..errors import CheckpointError, ExportError
from .interop import (
    check_normalisation,
    label_names,
    nearest_variant,
    refuse_unrepresentable,
    rename_keys,
)

# (their key prefix, ours), "{}" standing for a number; every key of a file must match one.
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
_HF_GELU = {
    "gelu": "exact",
    "gelu_python": "exact",
    "gelu_pytorch_tanh": "tanh",
    "gelu_new": "tanh",
    "gelu_python_tanh": "tanh",
}


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
    refuse_unrepresentable(state, name)
    prefixed = any(k.startswith("vit.") for k in state)  # a ViTModel's keys have no prefix
    state = {(k if prefixed else "vit." + k): v for k, v in state.items()}
    depth, width = config_json.get("num_hidden_layers", 12), fields["width"]
    qkv = _fused_qkv(state, config_json, depth, width, name)
    state = {**rename_keys(state, _HF_KEYS, name), **qkv}
    if "pre_logits.0.weight" in state and config_json.get("pooler_act", "tanh") != "tanh":
        raise CheckpointError(
            f"{name}: config.json pooler_act {config_json['pooler_act']!r}: vitlab's pre-logits "
            "layer is tanh"
        )
    num_classes = state["head.weight"].shape[0] if "head.weight" in state else 1
    base = nearest_variant(width, fields["patch_size"], False)
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
    names = (
        label_names(config_json.get("id2label"), num_classes) if "head.weight" in state else None
    )
    return config, state, names


def _fused_qkv(
    state: dict, config_json: dict, depth: int, width: int, name: str
) -> dict[str, torch.Tensor]:
    """Each block's query, key and value taken out of `state` and fused as vitlab's qkv (a model
    without qkv bias given a zero bias, which computes the same)."""
    qkv = {}
    for i in range(depth):
        for part in ("weight", "bias"):
            keys = [_HF_QKV.format(i, n, part) for n in ("query", "key", "value")]
            if (
                part == "bias"
                and not config_json.get("qkv_bias", True)
                and not any(k in state for k in keys)
            ):
                qkv[f"blocks.{i}.attn.qkv.bias"] = torch.zeros(3 * width)
                continue
            if not all(k in state for k in keys):
                raise CheckpointError(
                    f"{name}: missing {next(k for k in keys if k not in state)}; is it a ViT of "
                    f"{depth} layers?"
                )
            qkv[f"blocks.{i}.attn.qkv.{part}"] = torch.cat([state.pop(k) for k in keys])
    return qkv


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
    out = rename_keys(
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

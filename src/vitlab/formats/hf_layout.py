"""Hugging Face transformers' vision models, read into vitlab's layout and written from it.

Folders as `save_pretrained` writes them (config.json, model.safetensors or pytorch_model.bin) of
ViT, DeiT, DINOv2 (with and without registers), CLIP's and SigLIP's vision towers, with their
classifiers or without (a `*Model`'s weights give a state without `head.*`, its config a
placeholder head of 1 class). Each family is a row of `hf_families.FAMILIES`: its key prefix and
names, which config.json fields say what, and their defaults. How a family's parts map to vitlab's:

- ViT and DeiT: ViTModel's and DeiTModel's pooler is vitlab's tanh pre-logits layer. DeiT's
  distillation token is vitlab's distilled model where both classifiers are there
  (`DeiTForImageClassificationWithTeacher`, logits their mean); where only the class token is
  classified (`DeiTForImageClassification`, `DeiTModel`) it is a register token with a position
  row: a token that attends and is not read.
- DINOv2: layer scale (`lambda1`), the packed SwiGLU (`weights_in` = gate, then value), the mask
  token dropped (only masked pre-training uses it); `Dinov2ForImageClassification` classifies the
  class token beside the patch tokens' mean (vitlab's token_gap). With registers, transformers keeps
  a position row for the class token and none for the registers: the row is added to the class token
  as timm's `_convert_dinov2` does (the same float32 sum the forward computes), so that vitlab's
  table has the patches' rows only.
- CLIP: a norm before the blocks (`pre_layrnorm`), no patch bias, the class token's post_layernorm
  (vitlab's final norm on the token it pools); `visual_projection` (no bias) is the head, bias zero.
- SigLIP: post_layernorm on every token, then the MAP head (`nn.MultiheadAttention`'s packed
  in_proj as vitlab's q and kv); `SiglipForImageClassification` classifies the mean of every token
  and leaves the MAP head unused, so it is dropped. CLIP's and SigLIP's whole models (text tower
  beside) give their vision tower.

What vitlab cannot compute exactly is refused in one line naming the field; nothing is loaded
approximately. How images are fed is read from preprocessor_config.json (`hf_preprocessing.py`).
Written (`to_hf`), a model becomes the class its parts call for (a norm before the blocks: CLIP's;
a distillation token: DeiT's with its teacher; no class token: SigLIP's classifier; token_gap,
layer scale, SwiGLU or no position row for the class token: DINOv2's; ViT's otherwise) and is
refused naming the field where that class computes otherwise (attention pooling, which
transformers follows with no classifier; MAE's mean beside a class token; DeiT III's class token
classified alone; CLIP's projection with a bias).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..config import ModelConfig, family
from ..errors import CheckpointError, ConfigError, ExportError
from .hf_families import (
    CAN_HOLD,
    CLASSES,
    COMPOSITE,
    FAMILIES,
    GELU_NAMES,
    GELUS,
    HEADS,
    OTHER_TOWERS,
    Family,
)
from .hf_preprocessing import read_preprocessing
from .interop import family_variant, label_names, refuse_unrepresentable, rename_keys

# ---------------------------------------------------------------------------------------------
# Reading


def from_hf(
    config_json: dict,
    state: dict[str, torch.Tensor],
    name: str,
    preprocessor: dict | None = None,
    variant: ModelConfig | None = None,
):
    """(ModelConfig, vitlab state dict, class names or None, whose rule resamples its positions) of
    a transformers folder's config.json, weights and preprocessor_config.json; without the latter,
    images are fed as `variant` (the model the file is loaded into), else as the family's."""
    tower, values = _tower_config(config_json, name)
    fields = _checked_fields(values, tower, name)
    state = _vitlab_state(state, tower, values, name)
    if "pre_logits.0.weight" in state and values.get("pooler_act", "tanh") != "tanh":
        _refuse(values, "pooler_act", "vitlab's pre-logits layer is tanh", name)
    mlp, mlp_dim = _mlp(state)
    num_classes = state["head.weight"].shape[0] if "head.weight" in state else 1
    kind = "deit-distilled" if "dist_token" in state else family(tower.variant)
    base = family_variant(kind, fields["hidden_size"], fields["patch_size"])
    try:
        config = ModelConfig(
            name=base.name,
            **fields,
            mlp=mlp,
            mlp_dim=mlp_dim,
            classifier=_classifier(state, tower),
            distilled="dist_token" in state,
            reg_tokens=state["reg_token"].shape[1] if "reg_token" in state else 0,
            pos_embed_prefix=not tower.fold_class_position,
            pre_norm="norm_pre.weight" in state,
            patch_bias="patch_embed.bias" in state,
            layer_scale=values["layerscale_value"] if "blocks.0.ls1.gamma" in state else None,
            representation_size=(
                state["pre_logits.0.weight"].shape[0] if "pre_logits.0.weight" in state else None
            ),
            num_classes=num_classes,
            multi_label=config_json.get("problem_type") == "multi_label_classification",
            **read_preprocessing(preprocessor, variant or base, name),
        )
    except ConfigError as e:
        raise CheckpointError(
            f"{name}: config.json and preprocessor_config.json describe no model vitlab "
            f"computes ({e})"
        ) from None
    names = (
        label_names(config_json.get("id2label"), num_classes) if "head.weight" in state else None
    )
    return config, state, names, tower.positions


def is_hf_state(state: dict) -> bool:
    """Whether a state dict is in transformers' layout: its patch embedding's name says so."""
    return any(
        ".patch_embeddings.projection." in k or "embeddings.patch_embedding." in k for k in state
    )


def _refuse(values: dict, field: str, why: str, name: str):
    raise CheckpointError(f"{name}: config.json {field} {values.get(field)!r}: {why}")


def _tower_config(config_json: dict, name: str) -> tuple[Family, dict]:
    """The family of a config.json and its vision tower's fields, defaults filled in."""
    model_type = config_json.get("model_type")
    if model_type in COMPOSITE:
        model_type, config_json = COMPOSITE[model_type], config_json.get("vision_config") or {}
    if model_type not in FAMILIES:
        known = ", ".join(sorted([*FAMILIES, *COMPOSITE]))
        _refuse(config_json, "model_type", f"vitlab reads transformers' {known}", name)
    tower = FAMILIES[model_type]
    return tower, {**tower.defaults, **config_json}


def _checked_fields(values: dict, tower: Family, name: str) -> dict:
    """The ModelConfig fields config.json says, each checked: what vitlab cannot compute is
    refused."""
    if values["hidden_act"] not in GELUS:
        _refuse(values, "hidden_act", "vitlab computes the exact, tanh or quick GELU", name)
    if values["num_channels"] != 3:
        _refuse(values, "num_channels", "vitlab's ViT reads RGB images", name)
    fields = {}
    for ours, theirs in tower.fields.items():
        value = values[theirs]
        if isinstance(value, (list, tuple)):
            if len(set(value)) != 1:
                _refuse(values, theirs, "a rectangular grid, which vitlab does not compute", name)
            value = value[0]
        fields[ours] = value
    width, heads = fields["hidden_size"], fields["num_heads"]
    if values.get("head_dim", width // heads) * heads != width:
        _refuse(values, "head_dim", "vitlab's heads split the width evenly", name)
    # CLIP and SigLIP have dropout on the attention only
    rates = {f: float(fields.get(f, 0.0)) for f in ("dropout_rate", "attention_dropout_rate")}
    eps = float(fields["layer_norm_eps"])
    return {**fields, **rates, "layer_norm_eps": eps, "gelu": GELUS[values["hidden_act"]]}


def _vitlab_state(state: dict, tower: Family, values: dict, name: str) -> dict[str, torch.Tensor]:
    """A transformers state dict in vitlab's keys and shapes: what the family's function does not
    use dropped, the classifiers and the tower apart, its query, key and value fused."""
    drop = OTHER_TOWERS + (("embeddings.mask_token",) if tower.dinov2 else ())
    if "classifier.weight" in state and tower.model_type == "siglip_vision_model":
        drop += ("head.",)  # SiglipForImageClassification does not use the MAP head
    state = {
        k: v
        for k, v in state.items()
        if not k.removeprefix(tower.prefix).startswith(drop) and not k.endswith("position_ids")
    }
    heads = {k: state.pop(k) for k in list(state) if k.startswith(tuple(h for h, _ in HEADS))}
    state = {k.removeprefix(tower.prefix): v for k, v in state.items()}
    patches = next(theirs for theirs, ours in tower.keys if ours == "patch_embed.") + "weight"
    if patches not in state:
        raise CheckpointError(
            f"{name}: no {patches}: not the weights of the transformers {tower.model_type} model "
            "its config.json describes"
        )
    refuse_unrepresentable(state, name)
    mlp = "swiglu" if any(".mlp.weights_in." in k for k in state) else "gelu"
    qkv = _fused_qkv(state, tower, values, name) | _map_head(state)
    state = {
        **rename_keys(state, tower.all_keys(mlp), name),
        **qkv,
        **rename_keys(heads, HEADS, name),
    }
    for key in ("pos_embed", "blocks.0.mlp.fc1.weight"):
        if key not in state:
            raise CheckpointError(f"{name}: no {key} (in vitlab's names): not a whole model")
    return _our_shapes(state, tower)


def _our_shapes(state: dict, tower: Family) -> dict[str, torch.Tensor]:
    """`tower`'s tensors, in vitlab's names, in vitlab's shapes and meanings (the inverse of
    `_their_shapes`)."""
    if "head.weight" in state and "head.bias" not in state:  # CLIP's projection
        state["head.bias"] = state["head.weight"].new_zeros(state["head.weight"].shape[0])
    if tower.flat_embeddings:  # nn.Embedding's (tokens, D) and CLIP's (D,) class embedding
        state["pos_embed"] = state["pos_embed"][None]
        if "cls_token" in state:
            state["cls_token"] = state["cls_token"].reshape(1, 1, -1)
    if tower.fold_class_position:
        state["cls_token"] = state["cls_token"] + state["pos_embed"][:, :1]
        state["pos_embed"] = state["pos_embed"][:, 1:]
    if "dist_token" in state and "head_dist.weight" not in state:  # read by no classifier
        state["reg_token"] = state.pop("dist_token")
    if "reg_token" in state and not state["reg_token"].shape[1]:
        del state["reg_token"]
    return state


def _fused_qkv(state: dict, tower: Family, values: dict, name: str) -> dict[str, torch.Tensor]:
    """Each block's query, key and value taken out of `state` and fused as vitlab's qkv (a model
    without qkv bias given a zero bias, which computes the same)."""
    qkv = {}
    for i in range(values["num_hidden_layers"]):
        for part in ("weight", "bias"):
            keys = [tower.attention.format(i, n, part) for n in tower.qkv]
            if (
                part == "bias"
                and not values.get("qkv_bias", True)
                and not any(k in state for k in keys)
            ):
                weight = qkv[f"blocks.{i}.attn.qkv.weight"]
                qkv[f"blocks.{i}.attn.qkv.bias"] = weight.new_zeros(weight.shape[0])
                continue
            if not all(k in state for k in keys):
                raise CheckpointError(
                    f"{name}: missing {next(k for k in keys if k not in state)}; is it a model of "
                    f"{values['num_hidden_layers']} layers?"
                )
            qkv[f"blocks.{i}.attn.qkv.{part}"] = torch.cat([state.pop(k) for k in keys])
    return qkv


def _map_head(state: dict) -> dict[str, torch.Tensor]:
    """SigLIP's MAP head's packed query, key and value (nn.MultiheadAttention's in_proj), taken out
    of `state` as vitlab's q (the latent query's) and kv."""
    out = {}
    for part in ("weight", "bias"):
        packed = state.pop(f"head.attention.in_proj_{part}", None)
        if packed is not None:
            width = packed.shape[0] // 3
            out[f"attn_pool.q.{part}"], out[f"attn_pool.kv.{part}"] = packed[:width], packed[width:]
    return out


def _mlp(state: dict) -> tuple[str, int]:
    """("gelu" or "swiglu", the hidden width): DINOv2's packed SwiGLU's fc1 is twice fc2's input."""
    fc1, fc2 = state["blocks.0.mlp.fc1.weight"].shape[0], state["blocks.0.mlp.fc2.weight"].shape[1]
    return ("swiglu", fc2) if fc1 == 2 * fc2 else ("gelu", fc1)


def _classifier(state: dict, tower: Family) -> str:
    if "attn_pool.latent" in state:
        return "map"
    if "cls_token" not in state:
        return "gap"  # SiglipForImageClassification's mean of every token
    return "token_gap" if tower.dinov2 else "token"


def resample_positions(
    pos_embed: torch.Tensor, prefix: int, grid: int, antialias: bool = False, float32: bool = False
) -> torch.Tensor:
    """transformers' `interpolate_pos_encoding` (ViT, DeiT, CLIP, SigLIP) as its 5.x releases
    compute it: the `prefix` rows kept apart, the grid resized to `grid` x `grid` bicubic, corners
    not aligned, not antialiased, in the table's dtype; Dinov2's in float32 (`float32`),
    Dinov2WithRegisters' antialiased too (`antialias`). Earlier 4.x releases scaled the grid by
    (grid + 0.1) / old instead, as DINO did, which gives other tables."""
    head, table = pos_embed[:, :prefix], pos_embed[:, prefix:]
    old = math.isqrt(table.shape[1])
    table = table.reshape(1, old, old, -1).permute(0, 3, 1, 2)  # (1, D, old, old)
    table = F.interpolate(
        table.float() if float32 else table, size=(grid, grid), mode="bicubic", antialias=antialias
    )
    table = table.permute(0, 2, 3, 1).reshape(1, grid * grid, -1).to(pos_embed.dtype)
    return torch.cat([head, table], dim=1)


# ---------------------------------------------------------------------------------------------
# Writing


class HfExport(NamedTuple):
    """What `save_pretrained` would write of a model: its class, config.json and weights; and which
    output of that class holds the logits."""

    architecture: str
    config: dict
    state: dict[str, torch.Tensor]
    output: str


def to_hf(model, class_names: list[str]) -> HfExport:
    """The transformers class that computes the model's function, chosen by its parts, with its
    config.json and state dict; what no class computes is refused naming the field."""
    config = model.config
    architecture = _architecture(config)
    tower, heads = FAMILIES[CLASSES[architecture][0]], CLASSES[architecture][1]
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if architecture == "CLIPVisionModelWithProjection":
        if state["head.bias"].any():
            raise ExportError(
                "CLIPVisionModelWithProjection's projection has no bias, and this model's "
                "head.bias is not zero; export safetensors or timm"
            )
        del state["head.bias"]
    state = _their_shapes(state, config, tower)
    out = {}
    for i in range(config.depth):
        for part in ("weight", "bias"):
            chunks = state.pop(f"blocks.{i}.attn.qkv.{part}").chunk(3)
            for n, chunk in zip(tower.qkv, chunks, strict=True):
                out[tower.prefix + tower.attention.format(i, n, part)] = chunk.contiguous()
    head = {k: state.pop(k) for k in list(state) if k.startswith(("head.", "head_dist."))}
    tower_state = rename_keys(state, tower.all_keys(config.mlp), "the model", reverse=True)
    out.update({tower.prefix + k: v for k, v in tower_state.items()})
    out.update(rename_keys(head, heads, "the model", reverse=True))
    if tower.dinov2:  # DINOv2's embeddings always hold one; masking is unused
        out[tower.prefix + "embeddings.mask_token"] = torch.zeros(1, config.hidden_size)
    output = "image_embeds" if architecture == "CLIPVisionModelWithProjection" else "logits"
    return HfExport(architecture, _config_json(config, architecture, class_names), out, output)


def _architecture(config: ModelConfig) -> str:
    """The transformers class that computes `config`'s function, by its parts; ExportError naming
    the field where none does."""
    refusals = [
        (config.is_hybrid, "transformers has no ViT with a ResNet stem (a hybrid model)"),
        (
            config.representation_size,
            "transformers' classifiers have no pre-logits layer (representation_size)",
        ),
        (
            config.classifier == "map",
            "transformers' attention pooling (SiglipVisionModel) has no classifier after it "
            "(classifier map)",
        ),
    ]
    for refused, why in refusals:
        if refused:
            raise ExportError(f"{why}; export safetensors or timm")
    if config.pre_norm:
        architecture = "CLIPVisionModelWithProjection"
    elif config.distilled:
        architecture = "DeiTForImageClassificationWithTeacher"
    elif not config.has_class_token:
        architecture = "SiglipForImageClassification"
    elif (
        config.classifier == "token_gap"
        or config.layer_scale
        or config.mlp == "swiglu"
        or not config.pos_embed_prefix
    ):
        registers = config.reg_tokens or not config.pos_embed_prefix
        architecture = f"Dinov2{'WithRegisters' if registers else ''}ForImageClassification"
    else:
        architecture = f"{'DeiT' if config.reg_tokens else 'ViT'}ForImageClassification"
    for name, values in CAN_HOLD[architecture].items():
        if getattr(config, name) not in values:
            raise ExportError(
                f"transformers' {architecture} cannot compute {name} {getattr(config, name)!r} "
                f"(only {' or '.join(repr(v) for v in values)}); export safetensors or timm"
            )
    return architecture


def _their_shapes(state: dict, config: ModelConfig, tower: Family) -> dict:
    """vitlab's tensors in the shapes and meanings of `tower`'s family (the inverse of
    `_our_shapes`), what it always has and vitlab may not (a patch bias, layer scale) as the values
    that compute the same: zeros, ones."""
    if tower.model_type == "deit" and "reg_token" in state:
        state["dist_token"] = state.pop("reg_token")
    if tower.fold_class_position:  # the class token's row: zero, the token as it is
        pos = state["pos_embed"]
        state["pos_embed"] = torch.cat([pos.new_zeros(1, 1, pos.shape[-1]), pos], dim=1)
        state.setdefault("reg_token", pos.new_zeros(1, 0, pos.shape[-1]))  # none: DeiT III's
    if tower.flat_embeddings:
        state["pos_embed"] = state["pos_embed"][0]
        if "cls_token" in state:
            state["cls_token"] = state["cls_token"].reshape(-1)
    if not config.patch_bias and tower.model_type != "clip_vision_model":
        state["patch_embed.bias"] = state["pos_embed"].new_zeros(config.hidden_size)
    if tower.dinov2 and not config.layer_scale:
        for i in range(config.depth):
            for n in ("ls1", "ls2"):
                state[f"blocks.{i}.{n}.gamma"] = state["pos_embed"].new_ones(config.hidden_size)
    return state


def _config_json(config: ModelConfig, architecture: str, class_names: list[str]) -> dict:
    tower = FAMILIES[CLASSES[architecture][0]]
    values = {theirs: getattr(config, ours) for ours, theirs in tower.fields.items()}
    values.update(model_type=tower.model_type, num_channels=3, hidden_act=GELU_NAMES[config.gelu])
    if tower.dinov2:
        values.update(
            mlp_ratio=_mlp_ratio(config),
            use_swiglu_ffn=config.mlp == "swiglu",
            layerscale_value=config.layer_scale or 1.0,
        )
    else:
        values["intermediate_size"] = config.mlp_dim
    if "qkv_bias" in tower.defaults:
        values["qkv_bias"] = True
    if tower.fold_class_position:
        values["num_register_tokens"] = config.reg_tokens
    if architecture == "CLIPVisionModelWithProjection":
        values["projection_dim"] = config.num_classes
    labels = {
        "id2label": {str(i): n for i, n in enumerate(class_names)},
        "label2id": {n: i for i, n in enumerate(class_names)},
    }
    top = {"architectures": [architecture]}
    if config.multi_label:  # transformers' classifiers then train with BCEWithLogitsLoss
        top["problem_type"] = "multi_label_classification"
    if tower.model_type == "siglip_vision_model":  # a SiglipConfig: the vision tower's, a text's
        values["vision_use_head"] = False  # SiglipForImageClassification does not use it
        return {
            **top,
            "model_type": "siglip",
            "vision_config": values,
            "text_config": {},
            **labels,
            "dtype": "float32",
        }
    return {**top, **values, **labels, "dtype": "float32"}


def _mlp_ratio(config: ModelConfig) -> int:
    """transformers' Dinov2 sizes its MLP by an integer mlp_ratio: int(width * ratio), or for its
    SwiGLU two thirds of that rounded up to a multiple of 8."""
    width, swiglu = config.hidden_size, config.mlp == "swiglu"
    ratio = max(1, round(config.mlp_dim * (1.5 if swiglu else 1) / width))
    hidden = (int(width * ratio * 2 / 3) + 7) // 8 * 8 if swiglu else width * ratio
    if hidden != config.mlp_dim:
        raise ExportError(
            f"transformers' Dinov2 sizes its MLP by an integer mlp_ratio of hidden_size, and no "
            f"ratio gives this model's mlp_dim {config.mlp_dim}; export safetensors or timm"
        )
    return ratio

"""transformers' vision families as vitlab reads and writes them: each family's names for vitlab's
tensors, which config.json fields say what (and their defaults, for a file that leaves one out), and
the classes vitlab writes with what each can hold. The conversion is in `hf_layout.py`.

Keys are as the Hub holds them and `save_pretrained` writes them in every release since 4.40
(transformers 5 renames some in memory and back on saving).
"""

from __future__ import annotations

from dataclasses import dataclass

BLOCK = "encoder.layer.{}."  # ViT, DeiT, DINOv2: BERT's names
LAYER = "encoder.layers.{}."  # CLIP, SigLIP


@dataclass(frozen=True)
class Family:
    """One transformers family: where its tensors are and which config.json fields say what."""

    model_type: str  # config.json's, of the vision tower
    prefix: str  # the tower's key prefix in a file with a classifier (a `*Model` file has none)
    keys: tuple[tuple[str, str], ...]  # (their key prefix after `prefix`, ours), "{}" a number
    mlp: tuple[tuple[str, str], ...]  # the MLP's keys
    attention: str  # a block's query, key or value: "{}" the block, then its name, then the part
    qkv: tuple[str, str, str]
    fields: dict[str, str]  # vitlab's ModelConfig field -> config.json's
    defaults: dict  # config.json's fields at its config class's defaults
    variant: str  # vitlab's variant of the family: the name, and how images are fed by default
    positions: str  # whose rule resamples its position table (checkpoints.RESAMPLERS)
    swiglu: tuple[tuple[str, str], ...] = ()  # the MLP's keys where it is a SwiGLU
    flat_embeddings: bool = False  # a 1-D class token and a 2-D position table (nn.Embedding)
    fold_class_position: bool = False  # the class token's position row added to the token

    def all_keys(self, mlp: str) -> list[tuple[str, str]]:
        return [*self.keys, *(self.swiglu if mlp == "swiglu" else self.mlp)]

    @property
    def dinov2(self) -> bool:
        return self.model_type.startswith("dinov2")


_EMBEDDINGS = (
    ("embeddings.patch_embeddings.projection.", "patch_embed."),
    ("embeddings.cls_token", "cls_token"),
    ("embeddings.position_embeddings", "pos_embed"),
)
_VIT = (
    *_EMBEDDINGS,
    ("embeddings.distillation_token", "dist_token"),  # DeiT's
    (BLOCK + "layernorm_before.", "blocks.{}.norm1."),
    (BLOCK + "attention.output.dense.", "blocks.{}.attn.proj."),
    (BLOCK + "layernorm_after.", "blocks.{}.norm2."),
    ("layernorm.", "norm."),
    ("pooler.dense.", "pre_logits.0."),  # ViTModel's and DeiTModel's
)
_VIT_MLP = (
    (BLOCK + "intermediate.dense.", "blocks.{}.mlp.fc1."),
    (BLOCK + "output.dense.", "blocks.{}.mlp.fc2."),
)
_DINOV2 = (
    *_EMBEDDINGS,
    ("embeddings.register_tokens", "reg_token"),  # with registers
    (BLOCK + "norm1.", "blocks.{}.norm1."),
    (BLOCK + "attention.output.dense.", "blocks.{}.attn.proj."),
    (BLOCK + "layer_scale1.lambda1", "blocks.{}.ls1.gamma"),
    (BLOCK + "norm2.", "blocks.{}.norm2."),
    (BLOCK + "layer_scale2.lambda1", "blocks.{}.ls2.gamma"),
    ("layernorm.", "norm."),
)
_DINOV2_MLP = (
    (BLOCK + "mlp.fc1.", "blocks.{}.mlp.fc1."),
    (BLOCK + "mlp.fc2.", "blocks.{}.mlp.fc2."),
)
# Packed as vitlab's: the gate's rows, then the value's
_DINOV2_SWIGLU = (
    (BLOCK + "mlp.weights_in.", "blocks.{}.mlp.fc1."),
    (BLOCK + "mlp.weights_out.", "blocks.{}.mlp.fc2."),
)
_TOWER_BLOCKS = (
    (LAYER + "layer_norm1.", "blocks.{}.norm1."),
    (LAYER + "self_attn.out_proj.", "blocks.{}.attn.proj."),
    (LAYER + "layer_norm2.", "blocks.{}.norm2."),
)
_TOWER_MLP = (
    (LAYER + "mlp.fc1.", "blocks.{}.mlp.fc1."),
    (LAYER + "mlp.fc2.", "blocks.{}.mlp.fc2."),
)
_CLIP = (
    ("embeddings.class_embedding", "cls_token"),
    ("embeddings.patch_embedding.", "patch_embed."),
    ("embeddings.position_embedding.weight", "pos_embed"),
    ("pre_layrnorm.", "norm_pre."),  # sic
    *_TOWER_BLOCKS,
    ("post_layernorm.", "norm."),
)
_SIGLIP = (
    *_CLIP[1:3],
    *_TOWER_BLOCKS,
    ("post_layernorm.", "norm."),
    # The MAP head; its in_proj (query, key and value packed) is split apart by hf_layout
    ("head.probe", "attn_pool.latent"),
    ("head.attention.out_proj.", "attn_pool.proj."),
    ("head.layernorm.", "attn_pool.norm."),
    ("head.mlp.fc1.", "attn_pool.mlp.fc1."),
    ("head.mlp.fc2.", "attn_pool.mlp.fc2."),
)

_FIELDS = {
    "hidden_size": "hidden_size",
    "depth": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "layer_norm_eps": "layer_norm_eps",
    "img_size": "image_size",
    "patch_size": "patch_size",
}
_BERT = dict(
    attention=BLOCK + "attention.attention.{}.{}",
    qkv=("query", "key", "value"),
    fields={
        **_FIELDS,
        "dropout_rate": "hidden_dropout_prob",
        "attention_dropout_rate": "attention_probs_dropout_prob",
    },
)
# CLIP and SigLIP have dropout on the attention only
_TOWER = dict(
    prefix="vision_model.",
    mlp=_TOWER_MLP,
    attention=LAYER + "self_attn.{}.{}",
    qkv=("q_proj", "k_proj", "v_proj"),
    fields={**_FIELDS, "attention_dropout_rate": "attention_dropout"},
    positions="transformers",
    flat_embeddings=True,
)
# The defaults of each config class (ViTConfig, DeiTConfig, ...): the fields vitlab reads
_SHAPE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_channels=3)
_BERT_DEFAULTS = dict(
    _SHAPE, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, qkv_bias=True
)
_VIT_DEFAULTS = dict(
    _BERT_DEFAULTS,
    intermediate_size=3072,
    hidden_act="gelu",
    layer_norm_eps=1e-12,
    image_size=224,
    patch_size=16,
    pooler_act="tanh",
)
_DINOV2_DEFAULTS = dict(
    _BERT_DEFAULTS,
    mlp_ratio=4,
    hidden_act="gelu",
    layer_norm_eps=1e-6,
    image_size=224,
    layerscale_value=1.0,
    num_register_tokens=4,
)
_TOWER_DEFAULTS = dict(_SHAPE, intermediate_size=3072, image_size=224, attention_dropout=0.0)

FAMILIES = {
    f.model_type: f
    for f in (
        Family(
            "vit",
            "vit.",
            _VIT,
            _VIT_MLP,
            **_BERT,
            defaults=_VIT_DEFAULTS,
            variant="B/16",
            positions="transformers",
        ),
        Family(
            "deit",
            "deit.",
            _VIT,
            _VIT_MLP,
            **_BERT,
            defaults=_VIT_DEFAULTS,
            variant="deit-B/16",
            positions="transformers",
        ),
        Family(
            "dinov2",
            "dinov2.",
            _DINOV2,
            _DINOV2_MLP,
            **_BERT,
            defaults=dict(_DINOV2_DEFAULTS, patch_size=14),
            variant="dinov2-B/14",
            positions="transformers Dinov2",
            swiglu=_DINOV2_SWIGLU,
        ),
        Family(
            "dinov2_with_registers",
            "dinov2_with_registers.",
            _DINOV2,
            _DINOV2_MLP,
            **_BERT,
            defaults=dict(_DINOV2_DEFAULTS, patch_size=16),
            variant="dinov2-reg-B/14",
            positions="transformers Dinov2WithRegisters",
            swiglu=_DINOV2_SWIGLU,
            fold_class_position=True,
        ),
        Family(
            "clip_vision_model",
            keys=_CLIP,
            **_TOWER,
            defaults=dict(
                _TOWER_DEFAULTS, hidden_act="quick_gelu", layer_norm_eps=1e-5, patch_size=32
            ),
            variant="clip-B/16",
        ),
        Family(
            "siglip_vision_model",
            keys=_SIGLIP,
            **_TOWER,
            defaults=dict(
                _TOWER_DEFAULTS, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, patch_size=16
            ),
            variant="siglip-B/16",
        ),
    )
}
# Whole models whose vision tower vitlab reads: their model_type -> the tower's
COMPOSITE = {"clip": "clip_vision_model", "siglip": "siglip_vision_model"}
# Their other parts, which the vision tower's function does not use
OTHER_TOWERS = ("text_model.", "text_projection.", "logit_scale", "logit_bias")
# The classifiers beside a tower: (their key prefix, ours)
HEADS = (
    ("classifier.", "head."),
    ("cls_classifier.", "head."),
    ("distillation_classifier.", "head_dist."),
    ("visual_projection.weight", "head.weight"),  # CLIP's projection, without bias
)
GELUS = {  # transformers' hidden_act -> vitlab's GELU
    "gelu": "exact",
    "gelu_python": "exact",
    "gelu_pytorch_tanh": "tanh",
    "gelu_new": "tanh",
    "gelu_python_tanh": "tanh",
    "quick_gelu": "quick",
}
GELU_NAMES = {"exact": "gelu", "tanh": "gelu_pytorch_tanh", "quick": "quick_gelu"}

# The classes vitlab writes: their family, and their classifiers' keys (theirs, ours)
CLASSES = {
    "ViTForImageClassification": ("vit", HEADS[:1]),
    "DeiTForImageClassification": ("deit", HEADS[:1]),
    "DeiTForImageClassificationWithTeacher": ("deit", HEADS[1:3]),
    "Dinov2ForImageClassification": ("dinov2", HEADS[:1]),
    "Dinov2WithRegistersForImageClassification": ("dinov2_with_registers", HEADS[:1]),
    "CLIPVisionModelWithProjection": ("clip_vision_model", HEADS[3:]),
    "SiglipForImageClassification": ("siglip_vision_model", HEADS[:1]),
}
# What each class can hold of what vitlab's models may: field -> its values there. The parts that
# chose the class (hf_layout._architecture) are not repeated.
_PLAIN = {"layer_scale": (None,), "mlp": ("gelu",)}
CAN_HOLD = {
    "ViTForImageClassification": {"classifier": ("token",), **_PLAIN},
    "DeiTForImageClassification": {"classifier": ("token",), "reg_tokens": (1,), **_PLAIN},
    "DeiTForImageClassificationWithTeacher": {
        "reg_tokens": (0,),
        "pos_embed_prefix": (True,),
        **_PLAIN,
    },
    "Dinov2ForImageClassification": {"classifier": ("token_gap",), "reg_tokens": (0,)},
    "Dinov2WithRegistersForImageClassification": {
        "classifier": ("token_gap",),
        "pos_embed_prefix": (False,),
    },
    "CLIPVisionModelWithProjection": {
        "classifier": ("token",),
        "distilled": (False,),
        "reg_tokens": (0,),
        "pos_embed_prefix": (True,),
        "patch_bias": (False,),
        **_PLAIN,
    },
    "SiglipForImageClassification": {
        "classifier": ("gap",),
        "final_norm": ("before_pool",),
        "reg_tokens": (0,),
        **_PLAIN,
    },
}

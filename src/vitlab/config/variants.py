"""The variant table: the paper's ViTs, then the families people fine-tune today, each a
`ModelConfig` under a short name (`B/16`, `dinov2-B/14`).

The paper's sizes are Table 1 of Dosovitskiy et al. (2020) plus the small sizes of Steiner et al.
(2021, "How to train your ViT"), in the layout of google-research/vision_transformer's
`configs/models.py`; each also has the spelling of jeonsworld/ViT-pytorch (`ViT-B_16`), the PyTorch
port of the paper that vitlab's `train` command stays compatible with ("the tutorial" in comments;
its spellings are the legacy names). A family's variant carries what its weights compute and how
its images are fed, as its authors' code does (each family's source is named beside it); a file
that says otherwise (timm's config.json, transformers' preprocessor config) is read as it says.
"""

from __future__ import annotations

from ..errors import ConfigError
from .model import ModelConfig


def _vit(
    name: str, patch: int, width: int, depth: int, heads: int, mlp_dim: int, **extra
) -> ModelConfig:
    return ModelConfig(
        name=name,
        patch_size=patch,
        hidden_size=width,
        depth=depth,
        num_heads=heads,
        mlp_dim=mlp_dim,
        **extra,
    )


# name: (patch, width, depth, heads, mlp). Ti and S from Steiner et al.; B, L, H from the paper's
# Table 1.
PAPER_VARIANTS = (
    _vit("Ti/16", 16, 192, 12, 3, 768),
    _vit("S/16", 16, 384, 12, 6, 1536),
    _vit("S/32", 32, 384, 12, 6, 1536),
    _vit("B/8", 8, 768, 12, 12, 3072),
    _vit("B/16", 16, 768, 12, 12, 3072),
    _vit("B/32", 32, 768, 12, 12, 3072),
    _vit("L/16", 16, 1024, 24, 16, 4096),
    _vit("L/32", 32, 1024, 24, 16, 4096),
    _vit("H/14", 14, 1280, 32, 16, 5120),
    _vit("R50+B/16", 16, 768, 12, 12, 3072, resnet_layers=(3, 4, 9)),
    _vit("testing", 16, 1, 1, 1, 1),  # the tutorial's one-unit model, for smoke tests
)

# How each family's images are fed (its authors' evaluation transform).
IMAGENET = dict(image_mean=(0.485, 0.456, 0.406), image_std=(0.229, 0.224, 0.225))
CLIP_MEAN_STD = dict(  # OpenAI CLIP's clip/clip.py
    image_mean=(0.48145466, 0.4578275, 0.40821073), image_std=(0.26862954, 0.26130258, 0.27577711)
)
# DINOv2's and DeiT's evaluation: the shorter side to 256, the centre 224, bicubic
CENTRE_CROP = dict(resize="shorter_side", crop_pct=0.875, interpolation="bicubic")


def _family(prefix: str, sizes, **fields) -> list[ModelConfig]:
    """One family's variants: `sizes` of (size, patch, width, depth, heads, mlp), `fields` shared."""
    return [
        _vit(f"{prefix}-{size}/{patch}", patch, width, depth, heads, hidden, **fields)
        for size, patch, width, depth, heads, hidden in sizes
    ]


_DINOV2_SIZES = (
    ("S", 14, 384, 12, 6, 1536),
    ("B", 14, 768, 12, 12, 3072),
    ("L", 14, 1024, 24, 16, 4096),
)
# DINOv2 (Oquab et al. 2023; facebookresearch/dinov2): layer scale, a 518 px position table, frozen
# features read as the class token beside the patches' mean (its linear evaluation, and
# transformers' Dinov2ForImageClassification); giant's MLP is a SwiGLU of 4096 hidden units. With
# registers (Darcet et al. 2024) the position table has no rows for the prefix tokens, as timm
# converts it.
_DINOV2 = dict(
    img_size=518,
    layer_scale=1e-5,
    gelu="exact",
    classifier="token_gap",
    dropout_rate=0.0,
    **IMAGENET,
    **CENTRE_CROP,
)
_GIANT = ("g", 14, 1536, 40, 24, 4096)
DINOV2_VARIANTS = (
    _family("dinov2", _DINOV2_SIZES, **_DINOV2)
    + _family("dinov2", (_GIANT,), mlp="swiglu", **_DINOV2)
    + _family("dinov2-reg", _DINOV2_SIZES, reg_tokens=4, pos_embed_prefix=False, **_DINOV2)
    + _family(
        "dinov2-reg", (_GIANT,), reg_tokens=4, pos_embed_prefix=False, mlp="swiglu", **_DINOV2
    )
)

# CLIP's image towers (Radford et al. 2021; openai/CLIP's model.py): a norm before the blocks, no
# patch-embedding bias, LayerNorm eps 1e-5, QuickGELU in OpenAI's weights (and in those open_clip
# pairs with a `-quickgelu` model, its DFN, MetaCLIP and LAION-400M ones: `clip-*` here), the exact
# GELU in OpenCLIP's LAION-2B ones (`openclip-*`); the head is the image projection. Images: the shorter side to 224, the
# centre, bicubic.
_CLIP = dict(
    pre_norm=True,
    patch_bias=False,
    layer_norm_eps=1e-5,
    dropout_rate=0.0,
    resize="shorter_side",
    interpolation="bicubic",
    **CLIP_MEAN_STD,
)
_CLIP_SIZES = (
    ("B", 32, 768, 12, 12, 3072),
    ("B", 16, 768, 12, 12, 3072),
    ("L", 14, 1024, 24, 16, 4096),
)
CLIP_VARIANTS = _family("clip", _CLIP_SIZES, gelu="quick", **_CLIP) + _family(
    "openclip", _CLIP_SIZES, gelu="exact", **_CLIP
)

# SigLIP (Zhai et al. 2023; big_vision's vit.py): no class token, multihead attention pooling, the
# tanh GELU; images squashed to the model's size, in [-1, 1]. SigLIP 2 has the same towers.
_SIGLIP = dict(classifier="map", dropout_rate=0.0, resize="squash", interpolation="bicubic")
SIGLIP_VARIANTS = (
    _family("siglip", (("B", 16, 768, 12, 12, 3072),), **_SIGLIP)
    + _family("siglip", (("L", 16, 1024, 24, 16, 4096),), img_size=256, **_SIGLIP)
    + _family("siglip", (("so400m", 14, 1152, 27, 16, 4304),), **_SIGLIP)
)

# DeiT (Touvron et al. 2021; facebookresearch/deit): the paper's ViT trained on ImageNet-1k alone;
# the distilled ones add a distillation token and its head. DeiT III (Touvron et al. 2022): layer
# scale, no position rows for the class token.
_DEIT = dict(gelu="exact", dropout_rate=0.0, **IMAGENET, **CENTRE_CROP)
_DEIT_SIZES = (
    ("Ti", 16, 192, 12, 3, 768),
    ("S", 16, 384, 12, 6, 1536),
    ("B", 16, 768, 12, 12, 3072),
)
DEIT_VARIANTS = (
    _family("deit", _DEIT_SIZES, **_DEIT)
    + _family("deit-distilled", _DEIT_SIZES, distilled=True, **_DEIT)
    + _family(
        "deit3",
        (*_DEIT_SIZES[1:], ("L", 16, 1024, 24, 16, 4096)),
        layer_scale=1e-6,
        pos_embed_prefix=False,
        **_DEIT,
    )
)

# MAE's fine-tuned models (He et al. 2022; facebookresearch/mae, global_pool=True): the patch
# tokens' mean beside a class token, normalised after pooling.
MAE_VARIANTS = _family(
    "mae",
    (
        ("B", 16, 768, 12, 12, 3072),
        ("L", 16, 1024, 24, 16, 4096),
        ("H", 14, 1280, 32, 16, 5120),
    ),
    classifier="gap",
    class_token=True,
    final_norm="after_pool",
    **_DEIT,
)

FAMILY_VARIANTS = (
    *DINOV2_VARIANTS,
    *CLIP_VARIANTS,
    *SIGLIP_VARIANTS,
    *DEIT_VARIANTS,
    *MAE_VARIANTS,
)
VARIANTS: dict[str, ModelConfig] = {c.name: c for c in (*PAPER_VARIANTS, *FAMILY_VARIANTS)}

# The tutorial's spellings, and the same form for the small sizes.
LEGACY_NAMES: dict[str, str] = {
    "ViT-B_16": "B/16",
    "ViT-B_32": "B/32",
    "ViT-L_16": "L/16",
    "ViT-L_32": "L/32",
    "ViT-H_14": "H/14",
    "R50-ViT-B_16": "R50+B/16",
    "ViT-Ti_16": "Ti/16",
    "ViT-S_16": "S/16",
    "ViT-S_32": "S/32",
    "ViT-B_8": "B/8",
}
_SHORT_TO_LEGACY = {short: legacy for legacy, short in LEGACY_NAMES.items()}


def canonical_name(name: str) -> str:
    """Short name for either spelling; raises ConfigError listing the choices."""
    if name in VARIANTS:
        return name
    if name in LEGACY_NAMES:
        return LEGACY_NAMES[name]
    raise ConfigError(f"unknown model {name!r}; choose one of: {', '.join(all_names())}")


def family(name: str) -> str:
    """A variant's family: "vit" for the paper's, else its name's prefix ("dinov2-reg-B/14" ->
    "dinov2-reg")."""
    return name.rsplit("-", 1)[0] if "-" in name and name in VARIANTS else "vit"


def legacy_name(short: str) -> str:
    return _SHORT_TO_LEGACY.get(short, short)


def all_names() -> list[str]:
    return list(LEGACY_NAMES) + ["testing"] + [name for name in VARIANTS if name != "testing"]


def get_config(name: str, **overrides) -> ModelConfig:
    """The variant's config with any field replaced, e.g. `get_config("Ti/16", patch_size=4,
    img_size=32)`."""
    return VARIANTS[canonical_name(name)].replace(**overrides)

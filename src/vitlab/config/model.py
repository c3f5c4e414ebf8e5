"""A Vision Transformer's shape (`ModelConfig`) and the variant table.

The variant table is Table 1 of Dosovitskiy et al. (2020) plus the small sizes of Steiner et al.
(2021, "How to train your ViT"), in the layout of google-research/vision_transformer's
`configs/models.py`. Each variant has a short name (`B/16`) and the spelling of
jeonsworld/ViT-pytorch (`ViT-B_16`), the PyTorch port of the paper that vitlab's `train` command
stays compatible with ("the tutorial" in comments; its spellings are the legacy names).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..errors import ConfigError
from .fields import FRACTION, POSITIVE, check_fields, setting, typed


@dataclass(frozen=True)
class ModelConfig:
    """A Vision Transformer's shape and the choices that change what it computes; the model is built
    from it alone."""

    name: str = setting("B/16", "the variant this config started from")
    patch_size: int = setting(
        16,
        "pixels per patch side (for the hybrid: the stem's stride times the embedding kernel)",
        override=True,
        valid=POSITIVE,
    )
    hidden_size: int = setting(768, "token width", override=True, valid=POSITIVE)
    depth: int = setting(12, "encoder blocks", override=True, valid=POSITIVE)
    num_heads: int = setting(12, "attention heads per block", override=True, valid=POSITIVE)
    mlp_dim: int = setting(3072, "hidden width of each block's MLP", override=True, valid=POSITIVE)
    dropout_rate: float = setting(
        0.1,
        "dropout after the embeddings, attention output and MLP layers (the tutorial's 0.1)",
        override=True,
        valid=FRACTION,
    )
    attention_dropout_rate: float = setting(
        0.0, "dropout on the attention probabilities", override=True, valid=FRACTION
    )
    classifier: str = setting(
        "token",
        "token: classify the class token; gap: the mean of the patch tokens, no class token",
        ("token", "gap"),
        override=True,
    )
    representation_size: int | None = setting(
        None,
        "width of a tanh pre-logits layer before the head; none: no such layer",
        valid=POSITIVE,
    )
    resnet_layers: tuple[int, ...] = setting(
        (), "hybrid only: units per BiT ResNetV2 stage of the stem, e.g. (3, 4, 9)", valid=POSITIVE
    )
    resnet_width_factor: int = setting(
        1, "hybrid only: the stem's width multiplier", valid=POSITIVE
    )
    num_classes: int = setting(1000, "classes of the head", valid=POSITIVE)
    img_size: int = setting(224, "image side in pixels", valid=POSITIVE)
    attention_impl: str = setting(
        "auto",
        "sdpa: fused kernels; math: explicit softmax; auto: whichever measured faster here "
        "(vitlab.fastpaths); the logits are the same",
        ("auto", "sdpa", "math"),
    )
    layer_norm_eps: float = setting(
        1e-6,
        "epsilon of every LayerNorm: 1e-6 is flax's, the official weights' (transformers' "
        "google/vit-* configs say 1e-12)",
        override=True,
        valid=POSITIVE,
    )
    final_norm: str = setting(
        "before_pool",
        "the encoder's last LayerNorm: before_pool: on every token, then pooling (the "
        "official); after_pool: on the pooled vector (timm's fc_norm of average pooling)",
        ("before_pool", "after_pool"),
        override=True,
    )
    stem_norm: str = setting(
        "flax",
        "hybrid only: flax: the stem's weight standardisation (w - mean) / (std + 1e-5) and "
        "GroupNorm eps 1e-6, as the official code; timm: (w - mean) / sqrt(var + 1e-8) and eps "
        "1e-5, as timm's hybrids",
        ("flax", "timm"),
        override=True,
    )
    gelu: str = setting(
        "tanh",
        "tanh: flax's approximation, which Google's released weights were trained with; exact: "
        "the erf form, for models trained from scratch (3x cheaper than torch's tanh form on CPUs)",
        ("tanh", "exact"),
        override=True,
    )
    pos_embed_init: str = setting(
        "normal",
        "normal: N(0, 0.02), the official init; sincos2d: the 2-D sine-cosine table of Beyer "
        "et al. (2022), still learned",
        ("normal", "sincos2d"),
        override=True,
    )
    attention_init: str = setting(
        "xavier",
        "xavier: the official init; mimetic: query-key products near +I and value-projection "
        "products near -I (Trockman & Kolter, 2023), faster from scratch",
        ("xavier", "mimetic"),
        override=True,
    )
    drop_path_rate: float = setting(
        0.0,
        "stochastic depth: the last block's residual branches dropped per sample with this "
        "probability, linearly less for earlier blocks (Huang et al. 2016; DeiT)",
        override=True,
        aliases=("--drop_path", "--drop-path"),
        valid=FRACTION,
    )
    patch_drop_rate: float = setting(
        0.0,
        "share of each image's patch tokens dropped at random in training (PatchDropout, Liu et "
        "al. 2022); evaluation sees every patch",
        override=True,
        valid=FRACTION,
    )

    def __post_init__(self) -> None:
        check_fields(self)
        if self.pos_embed_init == "sincos2d" and self.hidden_size % 4:
            raise ConfigError(
                "pos_embed_init 'sincos2d' needs hidden_size divisible by 4, got "
                f"{self.hidden_size}"
            )
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
            )
        if self.patch_size % self.stem_stride:
            raise ConfigError(
                f"hybrid patch_size {self.patch_size} must be a multiple of the stem's stride "
                f"{self.stem_stride}"
            )
        if self.grid_size < 1:
            raise ConfigError(
                f"img_size {self.img_size} is smaller than one patch of {self.patch_size} pixels"
            )
        if not self.is_hybrid and self.img_size % self.patch_size:
            raise ConfigError(
                f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}: the "
                f"last {self.img_size % self.patch_size} rows and columns would be dropped"
            )

    @property
    def is_hybrid(self) -> bool:
        return bool(self.resnet_layers)

    @property
    def stem_stride(self) -> int:
        # Root conv and max-pool halve twice; every stage after the first halves once more.
        return 4 * 2 ** (len(self.resnet_layers) - 1) if self.resnet_layers else 1

    @property
    def grid_size(self) -> int:
        """Patches per side. The hybrid's 'SAME' convolutions round up; the patch conv rounds
        down."""
        side = self.img_size
        for _ in range(self.stem_stride.bit_length() - 1):
            side = -(-side // 2)  # each stride-2 'SAME' layer: ceil(side / 2)
        return side // (self.patch_size // self.stem_stride)

    @property
    def num_tokens(self) -> int:
        return self.grid_size**2 + (self.classifier == "token")

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> ModelConfig:
        return cls(**typed(cls, values, "model config fields"))


# The model settings `vitlab train` overrides by flag or config file (declared with override=True
# above).
MODEL_OVERRIDES: dict[str, dataclasses.Field] = {
    f.name: f for f in dataclasses.fields(ModelConfig) if f.metadata.get("override")
}


def _vit(
    name: str, patch: int, width: int, depth: int, heads: int, mlp: int, **extra
) -> ModelConfig:
    return ModelConfig(
        name=name,
        patch_size=patch,
        hidden_size=width,
        depth=depth,
        num_heads=heads,
        mlp_dim=mlp,
        **extra,
    )


# name: (patch, width, depth, heads, mlp). Ti and S from Steiner et al.; B, L, H from the paper's
# Table 1.
VARIANTS: dict[str, ModelConfig] = {
    c.name: c
    for c in (
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
}

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


def legacy_name(short: str) -> str:
    return _SHORT_TO_LEGACY.get(short, short)


def all_names() -> list[str]:
    return list(LEGACY_NAMES) + ["testing"] + list(VARIANTS)[:-1]


def get_config(name: str, **overrides) -> ModelConfig:
    """The variant's config with any field replaced, e.g. `get_config("Ti/16", patch_size=4,
    img_size=32)`."""
    return VARIANTS[canonical_name(name)].replace(**overrides)

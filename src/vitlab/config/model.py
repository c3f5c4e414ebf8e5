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
from .fields import AT_LEAST_0, FRACTION, POSITIVE, PROBABILITY, Range, check_fields, setting, typed


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
        "how the tokens become the head's input: token: the class token; gap: the mean of the patch "
        "tokens; map: attention pooling by a learned query (SigLIP's MAP head); token_gap: the class "
        "token and the patch tokens' mean side by side (transformers' Dinov2ForImageClassification)",
        ("token", "gap", "map", "token_gap"),
        override=True,
    )
    pool_blocks: int = setting(
        1,
        "the head reads the pooled tokens of the last N blocks side by side, each through the final "
        "norm (DINOv2's linear evaluation: the class tokens of the last 4 blocks, and with token_gap "
        "the last block's patch mean beside them)",
        override=True,
        valid=POSITIVE,
    )
    class_token: bool | None = setting(
        None,
        "a class token before the patch tokens; none: as the classifier implies (gap and map have "
        "none; MAE's fine-tuned models average beside one)",
        override=True,
    )
    distilled: bool = setting(
        False,
        "DeiT's distillation token after the class token, with a second head of its own; the "
        "logits are the mean of the two heads' (Touvron et al. 2021)",
        override=True,
    )
    reg_tokens: int = setting(
        0,
        "register tokens after the class token, dropped at the output (Darcet et al. 2024; DINOv2 "
        "with registers)",
        override=True,
        valid=AT_LEAST_0,
    )
    pos_embed_prefix: bool = setting(
        True,
        "position embeddings for the prefix tokens (class, distillation, registers) as well as the "
        "patches, as the official code; false: the patches only (timm's no_embed_class: DeiT III, "
        "DINOv2 with registers)",
        override=True,
    )
    pre_norm: bool = setting(
        False, "a LayerNorm on the embeddings before the first block (CLIP's ln_pre)", override=True
    )
    patch_bias: bool = setting(
        True, "a bias in the patch embedding (CLIP's has none)", override=True
    )
    layer_scale: float | None = setting(
        None,
        "layer scale: each residual branch times a learned per-channel factor that starts at this "
        "value (Touvron et al. 2021, CaiT; DINOv2 and DeiT III: 1e-5); none: off",
        override=True,
        valid=POSITIVE,
    )
    mlp: str = setting(
        "gelu",
        "each block's MLP: gelu: fc1, GELU, fc2 (the paper's); swiglu: fc1 to twice mlp_dim, SiLU "
        "of one half times the other, fc2 (Shazeer 2020; DINOv2 giant)",
        ("gelu", "swiglu"),
        override=True,
    )
    multi_label: bool = setting(
        False,
        "the classes are independent, a sigmoid each, so that an image may have several (trained "
        "with binary cross-entropy; transformers' multi_label_classification); false: one softmax",
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
        "the erf form, for models trained from scratch (3x cheaper than torch's tanh form on CPUs); "
        "quick: x * sigmoid(1.702 x), OpenAI CLIP's",
        ("tanh", "exact", "quick"),
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
    # How images are fed: the weights were trained on images prepared so, and give their logits
    # only on such images. Read from a checkpoint's source (timm's pretrained_cfg, transformers'
    # preprocessor_config.json) and kept in vitlab's files.
    image_mean: tuple[float, float, float] = setting(
        (0.5, 0.5, 0.5),
        "per-channel mean subtracted from images in [0, 1] (0.5, 0.5, 0.5 with std 0.5: images in "
        "[-1, 1], the official; ImageNet's 0.485, 0.456, 0.406 for DINOv2 and DeiT)",
        override=True,
        nargs=3,
        metavar=("R", "G", "B"),
        valid=PROBABILITY,
    )
    image_std: tuple[float, float, float] = setting(
        (0.5, 0.5, 0.5),
        "per-channel standard deviation images are divided by, after the mean",
        override=True,
        nargs=3,
        metavar=("R", "G", "B"),
        valid=POSITIVE,
    )
    resize: str = setting(
        "squash",
        "how evaluation fits an image to img_size: squash: the whole image to a square (the "
        "tutorial's); shorter_side: its shorter side, keeping the aspect; each to img_size / "
        "crop_pct, then a centre crop of img_size",
        ("squash", "shorter_side"),
        override=True,
    )
    crop_pct: float = setting(
        1.0,
        "evaluation's centre crop as a share of the resized side (timm's crop_pct: 0.875 is 224 px "
        "of 256)",
        override=True,
        valid=Range(0, 1, open_low=True),
    )
    interpolation: str = setting(
        "bilinear",
        "how images are resampled: bilinear (the tutorial's) or bicubic (timm's and transformers' "
        "for most families)",
        ("bilinear", "bicubic"),
        override=True,
    )

    def __post_init__(self) -> None:
        check_fields(self)
        if self.classifier in ("token", "token_gap") and not self.has_class_token:
            raise ConfigError(f"classifier {self.classifier!r} needs a class token")
        if self.classifier == "token_gap" and self.final_norm == "after_pool":
            raise ConfigError(
                "final_norm 'after_pool' normalises one token's width, not token_gap's two"
            )
        if self.pool_blocks > 1 and (
            self.pool_blocks > self.depth
            or self.classifier == "map"
            or self.distilled
            or self.final_norm != "before_pool"
        ):
            raise ConfigError(
                f"pool_blocks {self.pool_blocks}: the pooled tokens of the last blocks of {self.depth}"
                ", each through the final norm, by the class token or the patches' mean"
            )
        if self.distilled and self.classifier != "token":
            raise ConfigError(
                "a distilled model (DeiT) classifies its class and distillation tokens"
            )
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
    def has_class_token(self) -> bool:
        if self.class_token is None:
            return self.classifier not in ("gap", "map")
        return self.class_token

    @property
    def pooled_width(self) -> int:
        """The width of what pooling gives the head (before any pre-logits layer)."""
        blocks = self.pool_blocks * self.hidden_size
        return blocks + self.hidden_size if self.classifier == "token_gap" else blocks

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patches: class, distillation, registers."""
        return int(self.has_class_token) + int(self.distilled) + self.reg_tokens

    @property
    def num_tokens(self) -> int:
        return self.num_prefix_tokens + self.grid_size**2

    @property
    def num_positions(self) -> int:
        """Rows of the position table."""
        return self.num_tokens if self.pos_embed_prefix else self.grid_size**2

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def preprocessing(self) -> dict:
        """How its images are fed (the fields from image_mean on), to give another config."""
        fields = ("image_mean", "image_std", "resize", "crop_pct", "interpolation")
        return {f: getattr(self, f) for f in fields}

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

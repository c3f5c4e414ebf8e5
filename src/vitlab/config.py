"""Every setting, declared once: the model's shape (`ModelConfig`, with the variant table) and a
training run (`TrainConfig`). Each field carries its default, its help and, where it takes one of a
few names, its choices; the command line, config files, validation and the model overrides of
`vitlab train` are derived from them.

The variant table is Table 1 of Dosovitskiy et al. (2020) plus the small sizes of Steiner et al.
(2021, "How to train your ViT"), in the layout of google-research/vision_transformer's
`configs/models.py`. Each variant has a short name (`B/16`) and the spelling of
jeonsworld/ViT-pytorch (`ViT-B_16`), the PyTorch port of the paper that vitlab's `train` command
stays compatible with ("the tutorial" in comments; its spellings are the legacy names).
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

DATASETS = ("cifar10", "cifar100", "imagefolder")


@dataclass(frozen=True)
class Range:
    """The interval a number (or each number of a tuple) must lie in: `low` to `high`, None for no
    bound, each end closed unless marked open."""

    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False

    def __contains__(self, value: float) -> bool:
        above = self.low is None or (value > self.low if self.open_low else value >= self.low)
        below = self.high is None or (value < self.high if self.open_high else value <= self.high)
        return above and below

    def __str__(self) -> str:
        if self.high is None and self.low == 0:
            return "positive" if self.open_low else "0 or more"
        if self.high is None:
            return f"{'more than' if self.open_low else 'at least'} {self.low:g}"
        return (
            f"in {'(' if self.open_low else '['}{self.low:g}, "
            f"{self.high:g}{')' if self.open_high else ']'}"
        )


POSITIVE, AT_LEAST_0 = Range(0, open_low=True), Range(0)
PROBABILITY, FRACTION = Range(0, 1), Range(0, 1, open_high=True)  # [0, 1] and [0, 1)


def setting(
    default: Any,
    help: str,
    choices: tuple[str, ...] | None = None,
    valid: Range | None = None,
    **extra: Any,
) -> Any:
    """A config field: its default, the help `--help` shows, the names it may take or the range its
    numbers must lie in (`valid`), and anything else the command line or a resume needs to know of
    it (`override`: a model setting `vitlab train` can override; `resume`: "same" if a resumed run
    must keep it, "warn" if changing it on resume deserves a word)."""
    metadata = {"help": help, "choices": choices, "valid": valid, **extra}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def _listed(names: tuple[str, ...]) -> str:
    """'a', 'b' or 'c'."""
    shown = [repr(n) for n in names]
    return f"{', '.join(shown[:-1])} or {shown[-1]}"


def check_fields(config, prefix: str = "") -> None:
    """Every field of `config` among its choices and in its range, else one line naming it (`prefix`
    "--" for flags)."""
    for f in dataclasses.fields(config):
        value, choices, valid = (
            getattr(config, f.name),
            f.metadata.get("choices"),
            f.metadata.get("valid"),
        )
        if choices and value not in choices:
            raise ConfigError(f"{prefix}{f.name} must be {_listed(choices)}, got {value!r}")
        numbers = value if isinstance(value, tuple) else (value,)
        if valid is not None and value is not None and not all(n in valid for n in numbers):
            raise ConfigError(f"{prefix}{f.name} must be {valid}, got {value!r}")


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
        return cls(**_typed(cls, values, "model config fields"))


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


@dataclass
class TrainConfig:
    """Every setting of a training run. Defaults are the tutorial's (its `train.py`) up to
    `loss_scale`; the rest are vitlab's. Built from recipe < config file < command-line flags,
    printed at the start and saved as `output/<name>/config.json`."""

    name: str = setting("", "the run's name (required): output/<name>/ and logs/<name>/")
    dataset: str = setting(
        "cifar10",
        "the dataset: CIFAR, downloaded into --data_dir, or an image folder <class>/<image>",
        DATASETS,
        resume="same",
    )
    model_type: str = setting(
        "ViT-B_16", "a variant by either spelling (`vitlab models`)", resume="same"
    )
    pretrained_dir: str = setting(
        "auto",
        "initial weights: a checkpoint file (vitlab, official .npz, timm), a transformers or timm "
        "folder, an official checkpoint name, hf-hub:ORG/NAME, 'none' (from scratch) or 'auto' "
        "(checkpoint/<model_type>.npz if present, else the official ImageNet-21k file)",
    )
    output_dir: str = setting("output", "where output/<name>/ goes")
    img_size: int = setting(224, "image side in pixels", resume="same", valid=POSITIVE)
    train_batch_size: int = setting(
        512,
        "images per update, over accumulation steps and processes",
        resume="same",
        valid=POSITIVE,
    )
    eval_batch_size: int = setting(64, "images per evaluation batch and process", valid=POSITIVE)
    eval_every: int = setting(
        100, "steps between evaluations on the validation split (and at the end)", valid=POSITIVE
    )
    learning_rate: float = setting(3e-2, "peak learning rate", resume="same", valid=POSITIVE)
    weight_decay: float = setting(0.0, "weight decay", resume="same", valid=AT_LEAST_0)
    num_steps: int = setting(
        10000,
        "optimizer steps; the schedule decays to 0 at the last",
        resume="warn",
        valid=POSITIVE,
    )
    decay_type: str = setting(
        "cosine", "decay after the linear warmup", ("cosine", "linear"), resume="same"
    )
    warmup_steps: int = setting(
        500, "steps of linear warmup from 0", resume="same", valid=AT_LEAST_0
    )
    max_grad_norm: float = setting(
        1.0, "gradient clipping norm; 0 disables clipping", resume="same", valid=AT_LEAST_0
    )
    local_rank: int = setting(
        -1,
        "this process's GPU under torch.distributed.launch (torchrun sets LOCAL_RANK instead)",
        valid=Range(-1),
    )
    seed: int = setting(
        42,
        "seed of the initialisation, data order, augmentation, dropout and validation split",
        resume="same",
        valid=AT_LEAST_0,
    )
    gradient_accumulation_steps: int = setting(
        1, "micro-batches per update (same update, less memory)", valid=POSITIVE
    )
    fp16: bool = setting(
        False, "fp16 mixed precision (the same as --precision fp16; CUDA only)", resume="same"
    )
    fp16_opt_level: str = setting(
        "O2",
        "Apex opt level, mapped onto torch.amp: O0 fp32; O1 and O2 fp16 autocast with fp32 master "
        "weights (O3, pure fp16, is not supported)",
        ("O0", "O1", "O2"),
        resume="same",
    )
    loss_scale: float = setting(
        0.0, "fp16 only: 0 dynamic loss scaling, > 0 a static scale", valid=AT_LEAST_0
    )
    # vitlab's own settings
    data_dir: str = setting("data", "CIFAR download folder, or the image folder's root")
    log_dir: str = setting("logs", "TensorBoard logs go to <log_dir>/<name>")
    val_split: float = setting(
        0.02,
        "fraction of train held out for validation; 0 evaluates on the test split as the tutorial "
        "did",
        resume="same",
        valid=FRACTION,
    )
    precision: str = setting(
        "fp32",
        "fp32 (the tutorial's), bf16 or fp16 autocast (fp16 needs CUDA), or auto: bf16 where the "
        "hardware runs it natively, else fp32",
        ("auto", "fp32", "bf16", "fp16"),
        resume="same",
    )
    device: str = setting("auto", "auto (a GPU when there is one), cpu, cuda or cuda:N")
    num_workers: int = setting(
        2, "DataLoader workers for image folders that stream from disk", valid=AT_LEAST_0
    )
    optimizer: str = setting(
        "sgd",
        "sgd (momentum 0.9, the tutorial's), adamw, or muon (torch's Muon for the encoder blocks' "
        "matrices, AdamW for the rest, one learning rate and weight decay)",
        ("sgd", "adamw", "muon"),
        resume="same",
    )
    momentum: float = setting(0.9, "SGD momentum", resume="same", valid=FRACTION)
    adam_betas: tuple[float, float] = setting(
        (0.9, 0.999),
        "AdamW's betas",
        resume="same",
        nargs=2,
        metavar=("BETA1", "BETA2"),
        valid=FRACTION,
    )
    label_smoothing: float = setting(
        0.0, "label smoothing of the training loss, in [0, 1)", resume="same", valid=FRACTION
    )
    augment: str = setting(
        "resized_crop",
        "resized_crop (the tutorial's RandomResizedCrop), pad_crop (4 px, for 32 px training) or "
        "none",
        ("resized_crop", "pad_crop", "none"),
        resume="same",
    )
    min_scale: float = setting(
        0.05,
        "RandomResizedCrop's smallest area fraction (the tutorial's 0.05)",
        resume="same",
        valid=Range(0, 1, open_low=True),
    )
    hflip: bool = setting(
        True,
        "random horizontal flips (the official fine-tuning's; --no-hflip for the tutorial's none)",
        resume="same",
    )
    resume: str | None = setting(
        None,
        "continue a run: a checkpoint path, or with no value the run's own output/<name>/last.pt",
        nargs="?",
        const="last",
        metavar="PATH",
    )
    overwrite: bool = setting(
        False,
        "start afresh where output/<name> holds a run: that run's folder (and logs/<name>) is "
        "moved aside to <name>.replaced-<date-time>, not deleted",
    )
    compile: bool = setting(False, "torch.compile the model")
    log_every: int = setting(10, "steps between train/loss records", valid=POSITIVE)
    randaugment: str = setting(
        "",
        "RandAugment 'N,M': N operations per image at magnitude M of 30 (Cubuk et al. 2020; "
        "torchvision's operations and ranges), e.g. 2,9; empty: off",
        resume="same",
    )
    mixup: float = setting(
        0.0,
        "mixup's Beta(alpha, alpha): pairs of images and labels blended (Zhang et al. 2018); 0: "
        "off",
        resume="same",
        valid=AT_LEAST_0,
    )
    cutmix: float = setting(
        0.0,
        "CutMix's Beta(alpha, alpha): a box of one image pasted into its pair (Yun et al. 2019); "
        "0: off",
        resume="same",
        valid=AT_LEAST_0,
    )
    mixup_switch_prob: float = setting(
        0.5,
        "with both mixup and CutMix on, the share of pairs cut-mixed (timm's name)",
        resume="same",
        valid=PROBABILITY,
    )
    random_erasing: float = setting(
        0.0,
        "share of images with a random box erased to one random colour (Zhong et al. 2020)",
        resume="same",
        valid=PROBABILITY,
    )
    ema: float = setting(
        0.0,
        "decay of an exponential moving average of the weights, which evaluation, best.pt and "
        "every command use (e.g. 0.999); 0: off",
        resume="same",
        valid=FRACTION,
    )
    layer_decay: float = setting(
        1.0,
        "layer-wise learning-rate decay: layer l of L gets rate ** (L + 1 - l) of the rate (BEiT); "
        "1: off",
        resume="same",
        valid=Range(0, 1, open_low=True),
    )
    freeze: str = setting(
        "none",
        "parameters left untrained: backbone (the stem: the hybrid's ResNet, a ViT's patch "
        "embedding) or all-but-head (a linear probe)",
        ("none", "backbone", "all-but-head"),
        resume="same",
    )
    grad_checkpointing: bool = setting(
        False,
        "recompute each block in the backward instead of keeping its activations: "
        "less memory, about a third more compute",
    )
    model: dict[str, Any] = setting(
        {},
        'overrides of the variant\'s model settings, e.g. {"patch_size": 4}; each is also a flag',
        resume="same",
    )

    def model_config(self, num_classes: int) -> ModelConfig:
        return get_config(
            self.model_type, num_classes=num_classes, img_size=self.img_size, **self.model
        )

    def effective_precision(self) -> str:
        if self.fp16 and self.fp16_opt_level != "O0":
            return "fp16"
        return self.precision

    def validate(self, world_size: int = 1) -> None:
        """Refuse settings that cannot run, each with one clear sentence."""
        if not self.name:
            raise ConfigError("--name is required")
        if self.name in (".", "..") or any(c in self.name for c in ("/", "\\", "\0")):
            raise ConfigError(
                f"--name {self.name!r}: a run's name is one folder name (no '/', not '.' or "
                "'..'), kept inside --output_dir and --log_dir"
            )
        check_fields(self, "--")
        checks = [
            (
                not (self.resume and self.overwrite),
                "--resume continues a run and --overwrite replaces it: pass one",
            ),
            (
                not (self.fp16 and self.precision == "bf16"),
                "--fp16 and --precision bf16 contradict each other",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        parts = self.gradient_accumulation_steps * world_size
        if self.train_batch_size <= 0 or self.train_batch_size % parts:
            raise ConfigError(
                f"--train_batch_size {self.train_batch_size} does not divide into "
                f"{self.gradient_accumulation_steps} accumulation steps x {world_size} processes"
            )
        self.randaugment_ops()
        if (self.mixup > 0 or self.cutmix > 0) and (self.train_batch_size // parts) % 2:
            raise ConfigError(
                "--mixup and --cutmix mix pairs of images: each process's micro-batch "
                f"({self.train_batch_size // parts}) must be even"
            )
        self.model_config(num_classes=2)  # the model's own checks, before any data is loaded

    def randaugment_ops(self) -> tuple[int, int] | None:
        """--randaugment as (operations per image, magnitude of 30), or None."""
        if not self.randaugment:
            return None
        try:
            ops, magnitude = (int(v) for v in self.randaugment.split(","))
        except ValueError:
            raise ConfigError(
                f"--randaugment {self.randaugment!r}: expected N,M, e.g. 2,9"
            ) from None
        if not (ops >= 1 and 0 <= magnitude <= 30):
            raise ConfigError(f"--randaugment {self.randaugment!r}: N at least 1 and M in 0..30")
        return ops, magnitude

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        """A config from plain values (flags, JSON, TOML, a checkpoint): model settings flat
        (`patch_size`) or under `model`, None meaning the variant's own value."""
        values = dict(values)
        model = dict(values.pop("model", None) or {})
        for name in [k for k in values if k in MODEL_OVERRIDES]:
            model[name] = values.pop(name)
        model = {k: v for k, v in model.items() if v is not None}
        unknown = sorted(set(model) - set(MODEL_OVERRIDES))
        if unknown:
            raise ConfigError(
                f"unknown model settings: {', '.join(unknown)} (overridable: "
                f"{', '.join(MODEL_OVERRIDES)})"
            )
        _typed(ModelConfig, model, "model settings")
        return cls(**_typed(cls, values, "settings"), model=model)


@functools.cache
def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def field_type(cls, name: str) -> tuple[type, tuple, bool]:
    """A config field's annotation, resolved (the module's annotations are strings): (its type or
    generic origin, that origin's arguments, whether None is allowed). `int | None` is (int, (),
    True); `tuple[float, float]` is (tuple, (float, float), False)."""
    hint = _hints(cls)[name]
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType) and type(
        None
    ) in typing.get_args(hint)
    if optional:
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    return typing.get_origin(hint) or hint, typing.get_args(hint), optional


_ACCEPTED = {
    int: (int,),
    float: (int, float),
    str: (str,),
    bool: (bool,),
}  # a float setting takes an int too


def _typed(cls, values: dict, what: str) -> dict:
    """`values` checked against `cls`'s fields: unknown keys and values of the wrong type refused,
    lists made tuples."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"unknown {what}: {', '.join(unknown)}")
    typed = {}
    for name, value in values.items():
        kind, _, optional = field_type(cls, name)
        if kind in _ACCEPTED and not (value is None and optional):
            if (isinstance(value, bool) and kind is not bool) or not isinstance(
                value, _ACCEPTED[kind]
            ):
                raise ConfigError(
                    f"{name} must be {kind.__name__}{' or null' if optional else ''}, got {value!r}"
                )
        typed[name] = tuple(value) if kind is tuple and isinstance(value, list) else value
    return typed

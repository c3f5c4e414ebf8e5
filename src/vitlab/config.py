"""Model shapes: the variant table and the dataclass every model is built from.

The table is Table 1 of Dosovitskiy et al. (2020) plus the small sizes of Steiner et al.
(2021, "How to train your ViT"), in the layout of google-research/vision_transformer's
`configs/models.py`. Each variant has a short name (`B/16`) and the seed's spelling (`ViT-B_16`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .errors import ConfigError


# Every setting that takes one of a few names, and the names: the configs check them, the CLI offers them.
CHOICES: dict[str, tuple[str, ...]] = {
    "classifier": ("token", "gap"), "attention_impl": ("auto", "sdpa", "math"), "gelu": ("tanh", "exact"),
    "pos_embed_init": ("normal", "sincos2d"), "attention_init": ("xavier", "mimetic"),
    "dataset": ("cifar10", "cifar100", "imagefolder"), "decay_type": ("cosine", "linear"), "precision": ("auto", "fp32", "bf16", "fp16"),
    "fp16_opt_level": ("O0", "O1", "O2"), "optimizer": ("sgd", "adamw", "muon"), "augment": ("resized_crop", "pad_crop", "none"),
}  # fmt: skip


def _listed(names: tuple[str, ...], quote: bool) -> str:
    """'a', 'b' or 'c' (quoted) / a, b or c."""
    shown = [repr(n) if quote else n for n in names]
    return f"{', '.join(shown[:-1])} or {shown[-1]}"


@dataclass(frozen=True)
class ModelConfig:
    name: str = "B/16"
    patch_size: int = 16  # pixels per patch side; for the hybrid, the stem's stride times the embedding kernel
    hidden_size: int = 768  # token width
    depth: int = 12  # encoder blocks
    num_heads: int = 12
    mlp_dim: int = 3072
    dropout_rate: float = 0.1  # after the embeddings, attention output and MLP layers (the seed's 0.1)
    attention_dropout_rate: float = 0.0  # on the attention probabilities
    classifier: str = "token"  # "token": class token; "gap": mean of the patch tokens, no class token
    representation_size: int | None = None  # width of the tanh pre-logits layer; None: no such layer
    resnet_layers: tuple[int, ...] = ()  # hybrid only: units per BiT ResNetV2 stage, e.g. (3, 4, 9)
    resnet_width_factor: int = 1
    num_classes: int = 1000
    img_size: int = 224
    attention_impl: str = "auto"  # "sdpa" (fused kernels), "math" (explicit softmax), "auto": math on CPUs in bf16,
    # where it measured faster (benchmarks/models.py), sdpa elsewhere; the logits are the same
    gelu: str = "tanh"  # "tanh": flax's approximation, which the released weights were trained with; "exact": the erf
    # form, for models trained from scratch (3x cheaper than torch's tanh form on CPUs)
    pos_embed_init: str = "normal"  # "normal": N(0, 0.02), the official init; "sincos2d": the fixed 2-D sine-cosine
    # table of Beyer et al. (2022, "Better plain ViT baselines"), still learned: position is known from step one
    attention_init: str = "xavier"  # "xavier": the official init; "mimetic": query-key products near +I and value-projection
    # products near -I in every block (Trockman & Kolter, 2023), what trained ViTs look like: faster training from scratch
    patch_drop_rate: float = 0.0  # share of each image's patch tokens dropped at random in training (PatchDropout,
    # Liu et al. 2022; timm's patch_drop_rate): cheaper steps, more images per second; evaluation sees every patch

    def __post_init__(self) -> None:
        for name in (n for n in CHOICES if n in self.__dataclass_fields__):
            if getattr(self, name) not in CHOICES[name]:
                raise ConfigError(f"{name} must be {_listed(CHOICES[name], quote=True)}, got {getattr(self, name)!r}")
        if self.pos_embed_init == "sincos2d" and self.hidden_size % 4:
            raise ConfigError(f"pos_embed_init 'sincos2d' needs hidden_size divisible by 4, got {self.hidden_size}")
        if not 0 <= self.patch_drop_rate < 1:
            raise ConfigError(f"patch_drop_rate must be in [0, 1), got {self.patch_drop_rate}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        for what in ("patch_size", "hidden_size", "depth", "num_heads", "mlp_dim", "num_classes", "img_size"):
            if getattr(self, what) < 1:
                raise ConfigError(f"{what} must be at least 1, got {getattr(self, what)}")
        if self.patch_size % self.stem_stride:
            raise ConfigError(f"hybrid patch_size {self.patch_size} must be a multiple of the stem's stride {self.stem_stride}")
        if self.grid_size < 1:
            raise ConfigError(f"img_size {self.img_size} is smaller than one patch of {self.patch_size} pixels")

    @property
    def is_hybrid(self) -> bool:
        return bool(self.resnet_layers)

    @property
    def stem_stride(self) -> int:
        # Root conv and max-pool halve twice; every stage after the first halves once more.
        return 4 * 2 ** (len(self.resnet_layers) - 1) if self.resnet_layers else 1

    @property
    def grid_size(self) -> int:
        """Patches per side. The hybrid's 'SAME' convolutions round up; the patch conv rounds down."""
        side = self.img_size
        for _ in range(self.stem_stride.bit_length() - 1):
            side = -(-side // 2)  # each stride-2 'SAME' layer: ceil(side / 2)
        return side // (self.patch_size // self.stem_stride)

    @property
    def num_tokens(self) -> int:
        return self.grid_size**2 + (self.classifier == "token")

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "ModelConfig":
        return _from_dict(cls, values, "model config fields", ("resnet_layers",))


def _vit(name: str, patch: int, width: int, depth: int, heads: int, mlp: int, **extra) -> ModelConfig:
    return ModelConfig(name=name, patch_size=patch, hidden_size=width, depth=depth, num_heads=heads, mlp_dim=mlp, **extra)


# name: (patch, width, depth, heads, mlp). Ti and S from Steiner et al.; B, L, H from the paper's Table 1.
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
        _vit("testing", 16, 1, 1, 1, 1),  # the seed's one-unit model, for smoke tests
    )
}

# The seed's spellings (jeonsworld/ViT-pytorch), and the same form for the small sizes.
SEED_NAMES: dict[str, str] = {
    "ViT-B_16": "B/16", "ViT-B_32": "B/32", "ViT-L_16": "L/16", "ViT-L_32": "L/32",
    "ViT-H_14": "H/14", "R50-ViT-B_16": "R50+B/16", "ViT-Ti_16": "Ti/16", "ViT-S_16": "S/16",
    "ViT-S_32": "S/32", "ViT-B_8": "B/8",
}  # fmt: skip
_SHORT_TO_SEED = {short: seed for seed, short in SEED_NAMES.items()}


def canonical_name(name: str) -> str:
    """Short name for either spelling; raises ValueError listing the choices."""
    if name in VARIANTS:
        return name
    if name in SEED_NAMES:
        return SEED_NAMES[name]
    raise ConfigError(f"unknown model {name!r}; choose one of: {', '.join(all_names())}")


def seed_name(short: str) -> str:
    return _SHORT_TO_SEED.get(short, short)


def all_names() -> list[str]:
    return list(SEED_NAMES) + ["testing"] + list(VARIANTS)[:-1]


def get_config(name: str, **overrides) -> ModelConfig:
    """The variant's config with any field replaced, e.g. `get_config("Ti/16", patch_size=4, img_size=32)`."""
    return VARIANTS[canonical_name(name)].replace(**overrides)




@dataclass
class TrainConfig:
    """Every setting of a training run. Defaults are the seed's (jeonsworld/ViT-pytorch `train.py`);
    fields after `loss_scale` are vitlab's. Built from recipe < config file < command-line flags,
    printed at the start of a run and saved as `output/<name>/config.json`."""

    name: str = ""  # the run's name: output/<name>/, logs/<name>/
    dataset: str = "cifar10"  # cifar10, cifar100 or imagefolder
    model_type: str = "ViT-B_16"  # a variant by either spelling (`vitlab models`)
    pretrained_dir: str = "auto"  # .npz/.pt file, official checkpoint name, "none" (from scratch), or "auto":
    # checkpoint/<model_type>.npz if it exists (the seed's layout), else the official ImageNet-21k file
    output_dir: str = "output"
    img_size: int = 224
    train_batch_size: int = 512  # total over accumulation steps and processes
    eval_batch_size: int = 64  # per process
    eval_every: int = 100  # steps between evaluations on the validation split (and at the end)
    learning_rate: float = 3e-2
    weight_decay: float = 0.0
    num_steps: int = 10000
    decay_type: str = "cosine"  # cosine or linear, after linear warmup from 0
    warmup_steps: int = 500
    max_grad_norm: float = 1.0  # 0 disables clipping
    local_rank: int = -1  # set by torch.distributed.launch; torchrun sets LOCAL_RANK instead
    seed: int = 42
    gradient_accumulation_steps: int = 1
    fp16: bool = False  # the seed's switch; the same as precision "fp16"
    fp16_opt_level: str = "O2"  # Apex levels, mapped onto torch.amp: O0 fp32; O1 and O2 fp16 autocast with fp32 master weights
    loss_scale: float = 0.0  # fp16 only: 0 dynamic loss scaling, > 0 a static scale
    # vitlab's own settings
    data_dir: str = "data"  # CIFAR download folder, or the image folder's root
    log_dir: str = "logs"
    val_split: float = 0.02  # fraction of train held out for validation; 0 evaluates on the test split as the seed
    precision: str = "fp32"  # fp32 (the seed's), bf16 or fp16 autocast (fp16 needs CUDA), or auto: bf16 where native
    device: str = "auto"  # auto (CUDA when present), cpu, cuda, cuda:N
    num_workers: int = 2  # DataLoader workers for image folders that stream from disk
    optimizer: str = "sgd"  # sgd (momentum 0.9, the seed's), adamw, or muon (Muon with torch's momentum 0.95 for the
    # encoder blocks' matrices, AdamW for the rest, one learning rate and weight decay)
    momentum: float = 0.9
    adam_betas: tuple[float, float] = (0.9, 0.999)
    label_smoothing: float = 0.0
    augment: str = "resized_crop"  # resized_crop (the seed's), pad_crop (4 px, for 32 px training) or none
    min_scale: float = 0.05  # RandomResizedCrop's smallest area fraction (the seed's 0.05)
    hflip: bool = True  # random horizontal flips (the official fine-tuning's; the seed had none)
    resume: str | None = None  # a checkpoint path, or "last" for output/<name>/last.pt
    compile: bool = False  # torch.compile the model
    log_every: int = 10  # steps between train/loss records
    # Model overrides, None: the variant's own value (for training from scratch, e.g. patch 4 at 32 px)
    patch_size: int | None = None
    hidden_size: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    mlp_dim: int | None = None
    dropout_rate: float | None = None
    attention_dropout_rate: float | None = None
    classifier: str | None = None
    gelu: str | None = None
    pos_embed_init: str | None = None
    attention_init: str | None = None
    patch_drop_rate: float | None = None

    MODEL_OVERRIDES = ("patch_size", "hidden_size", "depth", "num_heads", "mlp_dim", "dropout_rate", "attention_dropout_rate", "classifier",
                       "gelu", "pos_embed_init", "attention_init", "patch_drop_rate")  # fmt: skip

    def model_config(self, num_classes: int) -> ModelConfig:
        overrides = {k: getattr(self, k) for k in self.MODEL_OVERRIDES if getattr(self, k) is not None}
        return get_config(self.model_type, num_classes=num_classes, img_size=self.img_size, **overrides)

    def effective_precision(self) -> str:
        if self.fp16 and self.fp16_opt_level != "O0":
            return "fp16"
        return self.precision

    def validate(self, world_size: int = 1) -> None:
        """Refuse settings that cannot run, each with one clear sentence."""
        checks = [(bool(self.name), "--name is required")]
        for name in ("dataset", "decay_type", "precision", "fp16_opt_level", "optimizer", "augment"):
            value, allowed = getattr(self, name), _listed(CHOICES[name], quote=False)
            hint = f"{allowed} (O3, pure fp16, is not supported)" if name == "fp16_opt_level" else f"choose {allowed}"
            checks.append((value in CHOICES[name], f"--{name} {value!r}: {hint}"))
        checks += [
            (self.num_steps > 0, "--num_steps must be positive"),
            (self.warmup_steps >= 0, "--warmup_steps must be 0 or more"),
            (self.eval_every > 0, "--eval_every must be positive"),
            (self.log_every > 0, "--log_every must be positive"),
            (self.learning_rate > 0, "--learning_rate must be positive"),
            (self.gradient_accumulation_steps > 0, "--gradient_accumulation_steps must be positive"),
            (self.eval_batch_size > 0, "--eval_batch_size must be positive"),
            (0 <= self.val_split < 1, "--val_split must be in [0, 1)"),
            (0 < self.min_scale <= 1, "--min_scale must be in (0, 1]"),
            (self.loss_scale >= 0, "--loss_scale must be 0 (dynamic) or positive (static)"),
            (not (self.fp16 and self.precision == "bf16"), "--fp16 and --precision bf16 contradict each other"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        parts = self.gradient_accumulation_steps * world_size
        if self.train_batch_size <= 0 or self.train_batch_size % parts:
            raise ConfigError(
                f"--train_batch_size {self.train_batch_size} does not divide into {self.gradient_accumulation_steps} "
                f"accumulation steps x {world_size} processes"
            )
        canonical_name(self.model_type)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        return _from_dict(cls, values, "settings", ("adam_betas",))


_SCALAR_TYPES = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,)}


def _from_dict(cls, values: dict, what: str, tuple_fields: tuple[str, ...]):
    """A config from a plain dict (JSON, TOML, a checkpoint): unknown keys and values of the wrong type
    refused, lists back to tuples."""
    fields = {f.name: f.type for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"unknown {what}: {', '.join(unknown)}")
    for name, value in values.items():
        kind, _, optional = fields[name].partition(" | ")
        if kind in _SCALAR_TYPES and not (value is None and optional == "None"):
            wrong_bool = isinstance(value, bool) and kind != "bool"
            if wrong_bool or not isinstance(value, _SCALAR_TYPES[kind]):
                raise ConfigError(f"{name} must be {kind}{' or null' if optional else ''}, got {value!r}")
    return cls(**{k: tuple(v) if k in tuple_fields else v for k, v in values.items()})

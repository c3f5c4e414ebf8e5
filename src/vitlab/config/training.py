"""Every setting of a training run (`TrainConfig`): the tutorial's flags with its defaults, then
vitlab's own."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
from ..randomness import longest_run
from .fields import AT_LEAST_0, FRACTION, POSITIVE, PROBABILITY, Range, check_fields, setting, typed
from .model import MODEL_OVERRIDES, ModelConfig
from .variants import get_config

DATASETS = ("cifar10", "cifar100", "imagefolder")


@dataclass
class TrainConfig:
    """Every setting of a training run. Defaults are the tutorial's (its `train.py`) up to
    `loss_scale`, but for `pretrained_dir`; the rest are vitlab's. Where vitlab's defaults depart
    from the tutorial's run (README's list: `--pretrained_dir auto`, the held-out validation split,
    random flips, `auto` precision), tests/test_train.py holds them to that list. Built from recipe <
    config file < command-line flags, printed at the start and saved as
    `output/<name>/config.json`."""

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
        "(a family variant's timm repository on the Hub; else checkpoint/<model_type>.npz if "
        "present, else the official ImageNet-21k file)",
    )
    output_dir: str = setting("output", "where output/<name>/ goes")
    img_size: int = setting(224, "image side in pixels", resume="same", valid=POSITIVE)
    train_batch_size: int = setting(
        16,
        "images per update, over accumulation steps and processes (the tutorial's 16; micro-batches "
        "that fit the device's memory are accumulated to it)",
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
        1,
        "at least this many micro-batches per update (same update, less memory); more where the "
        "batch does not fit the device's memory",
        valid=POSITIVE,
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
    labels: str = setting(
        "",
        "a CSV of the training images and their labels instead of --data_dir's folders: rows "
        "path,label;label;... or a header path,<class>,... over 0/1 columns, paths relative to "
        "the CSV's folder (with --dataset imagefolder; the validation split is carved from it)",
    )
    test_labels: str = setting(
        "",
        "with --labels, a CSV of the test images, tested with best.pt at the end (with --val_split "
        "0, validated on instead); empty: none",
    )
    log_dir: str = setting("logs", "TensorBoard logs go to <log_dir>/<name>")
    val_split: float = setting(
        0.02,
        "fraction of train held out for validation; 0 evaluates on the test split as the tutorial "
        "did",
        resume="same",
        valid=FRACTION,
    )
    precision: str = setting(
        "auto",
        "auto: bf16 where the hardware runs it natively, else fp32; fp32 (the tutorial's "
        "arithmetic), bf16 or fp16 autocast (fp16 needs CUDA)",
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
    teacher: str = setting(
        "",
        "distil from this model (Touvron et al. 2021): any checkpoint the other commands take, "
        "with the run's classes; it runs in eval mode at precision auto, fed as its own "
        "preprocessing says; empty: no teacher",
        resume="same",
    )
    distillation: str = setting(
        "hard",
        "with --teacher: hard: cross-entropy against the teacher's top class (what DeiT's "
        "distilled models were trained with, its best); soft: KL divergence from its softened "
        "probabilities. A DeiT student (--distilled) learns it in its distillation head, another "
        "its one head",
        ("hard", "soft"),
        resume="same",
    )
    distillation_alpha: float = setting(
        0.5,
        "with --teacher: the distillation term's weight, the labels' 1 - alpha (DeiT's 0.5)",
        resume="same",
        valid=PROBABILITY,
    )
    distillation_tau: float = setting(
        1.0,
        "with --distillation soft: the softmax temperature (DeiT's 1)",
        resume="same",
        valid=POSITIVE,
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

    @property
    def multi_label(self) -> bool:
        """Whether the model's classes are independent (--multi_label, a model setting)."""
        return bool(self.model.get("multi_label", False))

    def effective_precision(self) -> str:
        """--precision, or what the tutorial's --fp16 asks for: fp16, or at opt level O0 fp32."""
        if self.fp16:
            return "fp32" if self.fp16_opt_level == "O0" else "fp16"
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
            (
                not self.labels or self.dataset == "imagefolder",
                f"--labels names image files: pass --dataset imagefolder, not {self.dataset}",
            ),
            (
                not self.test_labels or self.labels,
                "--test_labels needs --labels (the training CSV)",
            ),
            (
                not (self.teacher and self.multi_label),
                "--teacher: distillation of a multi-label model is not supported yet",
            ),
            (
                not self.multi_label or self.labels,
                "--multi_label trains on several labels an image: pass them as --labels CSV "
                "(path,label;label;...)",
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
        longest = longest_run(self.train_batch_size, world_size)
        if self.num_steps > longest:
            raise ConfigError(
                f"--num_steps {self.num_steps}: at most {longest:,} steps at --train_batch_size "
                f"{self.train_batch_size} on {world_size} processes (each random stream's seeds)"
            )
        self.randaugment_ops()
        self.check_distillation()
        if (self.mixup > 0 or self.cutmix > 0) and (self.train_batch_size // parts) % 2:
            raise ConfigError(
                "--mixup and --cutmix mix pairs of images: each process's micro-batch "
                f"({self.train_batch_size // parts}) must be even"
            )
        self.model_config(num_classes=2)  # the model's own checks, before any data is loaded

    def check_distillation(self) -> None:
        """The distillation settings only with a teacher, the temperature only with soft."""
        defaults = TrainConfig()
        for name in ("distillation", "distillation_alpha", "distillation_tau"):
            if not self.teacher and getattr(self, name) != getattr(defaults, name):
                raise ConfigError(f"--{name} {getattr(self, name)}: distils only with --teacher")
        if self.distillation == "hard" and self.distillation_tau != defaults.distillation_tau:
            raise ConfigError(
                "--distillation_tau is soft distillation's temperature; hard takes the teacher's "
                "top class"
            )

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
        typed(ModelConfig, model, "model settings")
        return cls(**typed(cls, values, "settings"), model=model)

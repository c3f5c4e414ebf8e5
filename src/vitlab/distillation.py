"""Distillation from a teacher (`vitlab train --teacher CHECKPOINT`; Touvron et al. 2021, DeiT): the
teacher, a trained model of the run's classes, and the loss that composes it with the run's own
(`losses.Distillation`).

The teacher runs in eval mode, without gradients, at precision `auto`, on the images the student
trains on (augmented and mixed), converted to what its own preprocessing wants: the student's
normalisation undone, the teacher's applied, resized to its image size by its interpolation. A DeiT
student (`--distilled`) learns the teacher in its distillation head and the labels in its class
head, as DeiT trains; evaluation averages the two, as before. Any other student learns both in its
one head.
"""

from __future__ import annotations

import torch

from .config import ModelConfig, TrainConfig
from .errors import ConfigError
from .formats.checkpoints import load_model
from .formats.weights import tensors_digest
from .losses import Criterion, Distillation, Loss, MultiLabelCriterion
from .model import VisionTransformer
from .preprocessing import from_unit, resize, to_unit
from .runtime import Processes, autocast, resolve_precision


class Teacher:
    """A model that gives logits of the student's training images: `teacher(images)`, images
    normalised as `student` feeds them (B, 3, img_size, img_size), logits float32 (B, classes)."""

    def __init__(self, model: VisionTransformer, student: ModelConfig, device: torch.device):
        # What a resumed run checks its teacher against: the same file may have been overwritten
        self.digest = tensors_digest({k: v.cpu() for k, v in model.state_dict().items()})
        self.model = model.to(device).eval().requires_grad_(False)
        self.student = student
        self.device = device
        self.precision = resolve_precision("auto", device)

    def inputs(self, images: torch.Tensor) -> torch.Tensor:
        """The student's images as the teacher's preprocessing feeds them (the same tensor where
        the two are fed alike)."""
        ours, theirs = self.student, self.model.config
        size = theirs.img_size
        if (ours.image_mean, ours.image_std, ours.img_size) == (
            theirs.image_mean,
            theirs.image_std,
            size,
        ):
            return images
        x = to_unit(images, ours.image_mean, ours.image_std)  # the pixels / 255, float32
        if x.shape[-1] != size or x.shape[-2] != size:
            x = resize(x, (size, size), theirs.interpolation)
            if theirs.interpolation == "bicubic":
                x = x.clamp_(0, 1)  # bicubic overshoots; PIL, which timm's transforms use, clamps
        return from_unit(x, theirs.image_mean, theirs.image_std)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        # Its own precision, whatever the student's autocast around this call
        cast = (
            torch.autocast(self.device.type, enabled=False)
            if self.precision == "fp32"
            else autocast(self.device, self.precision)
        )
        with cast:
            # float32 in: an fp32 teacher cannot take a bf16 batch, and autocast casts it anyway
            return self.model(self.inputs(images).float()).float()

    def describe(self, source: str) -> str:
        """One line for the run's first lines: what teaches, how it is fed."""
        ours, theirs = self.student, self.model.config
        resized = (
            f"resized {ours.img_size} -> {theirs.img_size} px ({theirs.interpolation}), "
            if ours.img_size != theirs.img_size
            else ""
        )
        numbers = "/".join(f"{v:g}" for v in (*theirs.image_mean, *theirs.image_std))
        return (
            f"teacher {source} ({theirs.name}, {theirs.num_classes} classes): eval mode, precision "
            f"{self.precision}; images {resized}mean/std {numbers}"
        )


def _named(names: list[str]) -> str:
    shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
    return f"{len(names)}: {shown}"


def with_teacher(
    base: Criterion | MultiLabelCriterion,
    *,
    config: TrainConfig,
    model: VisionTransformer,
    class_names: list[str],
    processes: Processes,
) -> Loss:
    """The loss a run minimises: `base`, or with --teacher, `base` and the teacher's distillation
    (DeiT's). A DeiT student is set to give its two heads' logits apart in training."""
    if not config.teacher:
        return base
    if model.config.multi_label:
        raise ConfigError("--teacher: distillation of a multi-label model is not supported yet")
    with processes.main_first():  # rank 0 downloads first
        teacher_model, names = load_model(config.teacher)
    if teacher_model.config.multi_label:
        raise ConfigError(
            f"--teacher {config.teacher}: a multi-label model; distillation takes a single-label "
            "teacher"
        )
    if list(names) != list(class_names):
        raise ConfigError(
            f"--teacher {config.teacher}: its classes ({_named(list(names))}) are not this run's "
            f"({_named(list(class_names))})"
        )
    teacher = Teacher(teacher_model, model.config, processes.device)
    model.heads_apart = model.config.distilled
    if processes.is_main:
        print(teacher.describe(config.teacher))
    return Distillation(
        base=base,
        teacher=teacher,
        kind=config.distillation,
        alpha=config.distillation_alpha,
        tau=config.distillation_tau,
    )

"""What a training step minimises, given the model's outputs for a micro-batch, its images and its
labels: one callable built from the run's configuration, so that train.py's step stays the same
whatever the task."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import TrainConfig


@dataclass(frozen=True, kw_only=True)
class Criterion:
    """Cross-entropy of single-label classification, with label smoothing; labels are class indices,
    or one probability row per image where mixup/cutmix mixed them."""

    label_smoothing: float = 0.0

    def __call__(
        self, outputs: torch.Tensor, images: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        # In float32 whatever the autocast: a bf16 log-softmax loses the small probabilities
        return F.cross_entropy(outputs.float(), labels, label_smoothing=self.label_smoothing)


@dataclass(frozen=True, kw_only=True)
class MultiLabelCriterion:
    """Binary cross-entropy of multi-label classification, one sigmoid a class: labels are multi-hot
    rows (B, classes), mixed by mixup/cutmix where they are on."""

    label_smoothing: float = 0.0

    def __call__(
        self, outputs: torch.Tensor, images: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(
            outputs.float(), smooth_multi_hot(labels.float(), self.label_smoothing)
        )  # the mean over images and classes: transformers' BCEWithLogitsLoss(), timm's default


def smooth_multi_hot(targets: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Label smoothing as timm's BinaryCrossEntropy and mixup_target define it for C classes: a 1
    becomes 1 - smoothing + smoothing / C, a 0 becomes smoothing / C, a mixed value in between
    (the same line, so smoothing and mixing commute)."""
    if not smoothing:
        return targets
    return targets * (1 - smoothing) + smoothing / targets.shape[-1]


def criterion(config: TrainConfig, multi_label: bool = False) -> Criterion | MultiLabelCriterion:
    """The loss a run with `config` trains on; `multi_label`: its model's classes are independent."""
    kind = MultiLabelCriterion if multi_label else Criterion
    return kind(label_smoothing=config.label_smoothing)


@dataclass(frozen=True, kw_only=True)
class Distillation:
    """DeiT's distillation (Touvron et al. 2021; its losses.py, DistillationLoss): (1 - alpha) times
    the base loss of the class head, plus alpha times the distillation head's loss against the
    teacher's logits of the same images (mixed, where mixup mixed them). A student without a
    distillation token distils into its one head (logit distillation)."""

    base: Criterion  # what the class head learns from the labels: label smoothing, mixed targets
    teacher: Callable[[torch.Tensor], torch.Tensor]  # the student's images -> the teacher's logits
    kind: str = "hard"  # TrainConfig.distillation
    alpha: float = 0.5
    tau: float = 1.0

    def __call__(
        self,
        outputs: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
        images: torch.Tensor,
        labels: torch.Tensor,
    ) -> torch.Tensor:
        # A DeiT student training with a teacher gives its two heads' logits (model.heads_apart)
        cls, dist = outputs if isinstance(outputs, tuple) else (outputs, outputs)
        teacher = self.teacher(images)
        term = distillation_term(dist.float(), teacher.float(), self.kind, self.tau)
        return (1 - self.alpha) * self.base(cls, images, labels) + self.alpha * term


def distillation_term(
    student: torch.Tensor, teacher: torch.Tensor, kind: str, tau: float
) -> torch.Tensor:
    """What the distillation head minimises, from logits (B, classes) of the student and teacher:
    hard, the cross-entropy against the teacher's top class; soft, DeiT's KL divergence of the
    student's softened probabilities from the teacher's, times tau^2. As DeiT computes it, the KL is
    summed over images and classes and divided by both (numel), not by the images alone: the
    per-image KL over the number of classes."""
    if kind == "hard":
        return F.cross_entropy(student, teacher.argmax(dim=1))
    divergence = F.kl_div(
        F.log_softmax(student / tau, dim=1),
        F.log_softmax(teacher / tau, dim=1),
        reduction="sum",
        log_target=True,
    )
    return divergence * tau**2 / student.numel()


# Whatever a step minimises: train.Job.criterion
Loss = Criterion | MultiLabelCriterion | Distillation

"""What a training step minimises, given the model's outputs for a micro-batch, its images and its
labels: one callable built from the run's configuration, so that train.py's step stays the same
whatever the task."""

from __future__ import annotations

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

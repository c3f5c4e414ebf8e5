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


def criterion(config: TrainConfig) -> Criterion:
    """The loss a run with `config` trains on."""
    return Criterion(label_smoothing=config.label_smoothing)

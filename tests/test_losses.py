"""What a training step minimises: single-label cross-entropy, and multi-label binary cross-entropy
against its formula written out, with timm's label smoothing of multi-hot rows, in float32 whatever
the autocast."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vitlab.config import TrainConfig
from vitlab.losses import Criterion, MultiLabelCriterion, criterion, smooth_multi_hot


def by_hand(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Binary cross-entropy, the mean over images and classes, in float64 from its definition:
    -(y log sigmoid(x) + (1 - y) log(1 - sigmoid(x)))."""
    p = logits.double().sigmoid()
    y = targets.double()
    return float((-(y * p.log() + (1 - y) * (1 - p).log())).mean())


def test_multi_label_loss_is_binary_cross_entropy_over_every_class():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5, generator=g) * 3
    targets = (torch.rand(6, 5, generator=g) < 0.4).float()
    targets[0] = 0  # an image of no class still counts, every class a negative
    loss = MultiLabelCriterion()(logits, torch.empty(0), targets)
    assert loss.item() == pytest.approx(by_hand(logits, targets), rel=1e-6)
    # Mixed rows (mixup's) are targets in [0, 1] like any other
    soft = torch.rand(6, 5, generator=g)
    assert MultiLabelCriterion()(logits, None, soft).item() == pytest.approx(
        by_hand(logits, soft), rel=1e-6
    )


def test_the_loss_is_float32_for_bf16_outputs():
    logits = torch.randn(4, 3).bfloat16()
    targets = torch.tensor([[1.0, 0, 1], [0, 0, 0], [1, 1, 1], [0, 1, 0]])
    loss = MultiLabelCriterion()(logits, None, targets)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(by_hand(logits.float(), targets), rel=1e-6)


def test_smoothing_is_timms_for_multi_hot_rows():
    # timm's BinaryCrossEntropy and mixup_target: off value s / C, on value 1 - s + s / C
    s, targets = 0.1, torch.tensor([[1.0, 0, 0, 1], [0, 0, 0, 0]])
    on, off = 1 - s + s / 4, s / 4
    expected = torch.tensor([[on, off, off, on], [off, off, off, off]])
    torch.testing.assert_close(smooth_multi_hot(targets, s), expected)
    logits = torch.randn(2, 4, generator=torch.Generator().manual_seed(1))
    loss = MultiLabelCriterion(label_smoothing=s)(logits, None, targets)
    assert loss.item() == pytest.approx(by_hand(logits, expected), rel=1e-6)
    assert smooth_multi_hot(targets, 0.0) is targets


def test_smoothing_and_mixing_commute():
    # Mixup mixes rows before the loss smooths them; smoothing each row first gives the same targets
    a, b, lam = torch.tensor([1.0, 0, 1, 0]), torch.tensor([0.0, 0, 1, 1]), 0.3
    mixed_then_smoothed = smooth_multi_hot(lam * a + (1 - lam) * b, 0.2)
    smoothed_then_mixed = lam * smooth_multi_hot(a, 0.2) + (1 - lam) * smooth_multi_hot(b, 0.2)
    torch.testing.assert_close(mixed_then_smoothed, smoothed_then_mixed)


def test_a_run_gets_the_loss_of_its_task():
    config = TrainConfig(name="x", label_smoothing=0.2)
    assert criterion(config) == Criterion(label_smoothing=0.2)
    assert criterion(config, multi_label=True) == MultiLabelCriterion(label_smoothing=0.2)
    logits, labels = torch.randn(4, 3), torch.tensor([0, 2, 1, 2])
    expected = F.cross_entropy(logits, labels, label_smoothing=0.2)
    assert criterion(config)(logits, None, labels).item() == pytest.approx(expected.item())

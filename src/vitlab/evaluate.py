"""Evaluation: a no-grad pass that sums what the metrics need, reducible over processes."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .runtime import autocast


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches, num_classes: int, device: torch.device, precision: str = "fp32",
             total: int | None = None, progress: bool = True, distributed: bool = False) -> dict:  # fmt: skip
    """Loss, top-1 and top-5 accuracy and the confusion matrix (rows: true class, columns: predicted)."""
    was_training = model.training
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, top-5 correct, count
    for images, labels in tqdm(batches, total=total, desc="eval", unit="batch", leave=False, disable=not progress):
        with autocast(device, precision):
            logits = model(images)
        logits = logits.float()
        sums[0] += F.cross_entropy(logits, labels, reduction="sum")
        top5 = logits.topk(min(5, num_classes), dim=1).indices
        sums[1] += (top5 == labels[:, None]).any(dim=1).sum()
        sums[2] += len(labels)
        confusion += torch.bincount(labels * num_classes + logits.argmax(1), minlength=num_classes**2).view(num_classes, num_classes)
    if distributed:
        torch.distributed.all_reduce(confusion)
        torch.distributed.all_reduce(sums)
    model.train(was_training)
    count = max(sums[2].item(), 1)
    confusion = confusion.cpu()
    per_class = confusion.diag() / confusion.sum(1).clamp(min=1)
    return {
        "loss": sums[0].item() / count,
        "accuracy": confusion.diag().sum().item() / count,
        "top5_accuracy": sums[1].item() / count,
        "count": int(sums[2].item()),
        "per_class_accuracy": per_class.tolist(),
        "confusion": confusion.tolist(),
    }

"""Evaluation: a no-grad pass that sums what the metrics need (reducible over processes), and its
report for people: a printed table and a confusion-matrix picture."""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .formats.files import atomic_write
from .runtime import autocast

# a wider matrix wraps in a terminal; the JSON and the PNG hold it whole
PRINTED_CONFUSION_MAX_CLASSES = 20
LABELLED_CONFUSION_MAX_CLASSES = 100  # beyond this the tick labels would overlap into a grey band


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    batches,
    num_classes: int,
    device: torch.device,
    *,
    precision: str = "fp32",
    total: int | None = None,
    progress: bool = True,
    distributed: bool = False,
) -> dict:
    """Loss, top-1 and top-5 accuracy and the confusion matrix (rows: true class, columns:
    predicted)."""
    was_training = model.training
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, top-5 correct, count
    for images, labels in tqdm(
        batches, total=total, desc="eval", unit="batch", leave=False, disable=not progress
    ):
        with autocast(device, precision):
            logits = model(images)
        logits = logits.float()
        sums[0] += F.cross_entropy(logits, labels, reduction="sum")
        top5 = logits.topk(min(5, num_classes), dim=1).indices
        sums[1] += (top5 == labels[:, None]).any(dim=1).sum()
        sums[2] += len(labels)
        confusion += torch.bincount(
            labels * num_classes + logits.argmax(1), minlength=num_classes**2
        ).view(num_classes, num_classes)
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


def format_report(metrics: dict, class_names: list[str]) -> str:
    """Loss, top-1, top-5, per-class accuracy and (for few classes) the confusion matrix, as
    text."""
    confusion = np.asarray(metrics["confusion"])
    width = max(len(n) for n in class_names + ["class"])
    lines = [
        f"images    {metrics['count']}",
        f"loss      {metrics['loss']:.4f}",
        f"top-1     {metrics['accuracy']:.2%}",
        f"top-5     {metrics['top5_accuracy']:.2%}",
        "",
        f"{'class':<{width}}  accuracy  images",
    ]
    for name, accuracy, count in zip(
        class_names, metrics["per_class_accuracy"], confusion.sum(axis=1), strict=False
    ):
        lines.append(f"{name:<{width}}  {accuracy:>8.2%}  {count:>6}")
    lines.append("")
    if len(class_names) > PRINTED_CONFUSION_MAX_CLASSES:
        lines.append(f"confusion matrix: {len(class_names)} classes, see the JSON and PNG")
        return "\n".join(lines)
    cells = [max(len(name), len(str(confusion.max()))) for name in class_names]
    lines.append("confusion matrix (rows: true class, columns: predicted)")
    lines.append(
        " " * width
        + "  "
        + " ".join(f"{name:>{cell}}" for name, cell in zip(class_names, cells, strict=False))
    )
    for name, row in zip(class_names, confusion, strict=False):
        lines.append(
            f"{name:<{width}}  "
            + " ".join(f"{v:>{cell}}" for v, cell in zip(row, cells, strict=False))
        )
    return "\n".join(lines)


def draw_confusion(
    confusion: list[list[int]], class_names: list[str], title: str, path: str | os.PathLike
) -> None:
    """A PNG of the confusion matrix, each row coloured by the fraction of its true class (so that
    rare classes show as clearly as common ones), counts written in the cells when they fit."""
    from matplotlib.figure import Figure

    counts = np.asarray(confusion)
    fractions = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    n = len(class_names)
    side = min(max(4 + 0.3 * n, 6), 30)
    fig = Figure(figsize=(side + 1.5, side), layout="constrained")
    ax = fig.subplots()
    shown = ax.imshow(fractions, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    fig.colorbar(shown, ax=ax, shrink=0.8, label="fraction of the true class")
    if n <= LABELLED_CONFUSION_MAX_CLASSES:
        ax.set_xticks(range(n), class_names, rotation=90)
        ax.set_yticks(range(n), class_names)
    if n <= PRINTED_CONFUSION_MAX_CLASSES:
        for (i, j), count in np.ndenumerate(counts):
            ax.text(
                j,
                i,
                str(count),
                ha="center",
                va="center",
                color="white" if fractions[i, j] > 0.5 else "black",
            )
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))

"""An evaluation's results for people: a printed table and a confusion-matrix picture."""

from __future__ import annotations

import os

import numpy as np

from .checkpoints import atomic_write

PRINTED_CONFUSION_MAX_CLASSES = 20  # a wider matrix wraps in a terminal; the JSON and the PNG hold it whole
LABELLED_CONFUSION_MAX_CLASSES = 100  # beyond this the tick labels would overlap into a grey band


def format_report(metrics: dict, class_names: list[str]) -> str:
    """Loss, top-1, top-5, per-class accuracy and (for few classes) the confusion matrix, as text."""
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
    for name, accuracy, count in zip(class_names, metrics["per_class_accuracy"], confusion.sum(axis=1)):
        lines.append(f"{name:<{width}}  {accuracy:>8.2%}  {count:>6}")
    lines.append("")
    if len(class_names) > PRINTED_CONFUSION_MAX_CLASSES:
        lines.append(f"confusion matrix: {len(class_names)} classes, see the JSON and PNG")
        return "\n".join(lines)
    cells = [max(len(name), len(str(confusion.max()))) for name in class_names]
    lines.append("confusion matrix (rows: true class, columns: predicted)")
    lines.append(" " * width + "  " + " ".join(f"{name:>{cell}}" for name, cell in zip(class_names, cells)))
    for name, row in zip(class_names, confusion):
        lines.append(f"{name:<{width}}  " + " ".join(f"{v:>{cell}}" for v, cell in zip(row, cells)))
    return "\n".join(lines)


def draw_confusion(confusion: list[list[int]], class_names: list[str], title: str, path: str | os.PathLike) -> None:
    """A PNG of the confusion matrix, each row coloured by the fraction of its true class (so that rare
    classes show as clearly as common ones), counts written in the cells when they fit."""
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
            ax.text(j, i, str(count), ha="center", va="center", color="white" if fractions[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))

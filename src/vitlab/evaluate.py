"""Evaluation: a no-grad pass that sums what the metrics need (reducible over processes), and its
report for people: a printed table and a confusion-matrix picture."""

from __future__ import annotations

import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .batches import eval_batches
from .config import ModelConfig, TrainConfig
from .formats.files import atomic_write
from .runtime import Processes, autocast

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


@torch.no_grad()
def evaluate_multi_label(
    model: torch.nn.Module,
    batches,
    num_classes: int,
    device: torch.device,
    *,
    precision: str = "fp32",
    threshold: float = 0.5,
    total: int | None = None,
    progress: bool = True,
    distributed: bool = False,
) -> dict:
    """A model whose classes are independent (a sigmoid each) on multi-hot labels (B, classes):
    the mean binary cross-entropy, each class's average precision and their mean (mAP, over the
    classes with a positive image), and at `threshold` the micro and macro F1."""
    was_training = model.training
    model.eval()
    scores, targets = [], []
    for images, labels in tqdm(
        batches, total=total, desc="eval", unit="batch", leave=False, disable=not progress
    ):
        with autocast(device, precision):
            scores.append(model(images).float().cpu())
        targets.append(labels.float().cpu())
    model.train(was_training)
    logits, targets = torch.cat(scores), torch.cat(targets)
    if distributed:  # every process's shard, for ranks that need the whole ranking
        gathered = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, (logits, targets))
        logits, targets = (torch.cat(part) for part in zip(*gathered, strict=True))
    return multi_label_metrics(logits, targets, threshold)


def multi_label_metrics(logits: torch.Tensor, targets: torch.Tensor, threshold: float) -> dict:
    """(N, classes) logits and multi-hot targets -> loss, per-class AP, mAP, micro and macro F1."""
    ap = [average_precision(logits[:, c], targets[:, c]) for c in range(targets.shape[1])]
    scored = [a for a in ap if a is not None]
    predicted = logits.sigmoid() >= threshold
    positive = targets > 0.5
    tp, fp = (predicted & positive).sum(0), (predicted & ~positive).sum(0)
    fn = (~predicted & positive).sum(0)
    per_class_f1 = (2 * tp / (2 * tp + fp + fn).clamp(min=1)).tolist()
    return {
        "loss": torch.nn.functional.binary_cross_entropy_with_logits(logits, targets).item(),
        "mAP": sum(scored) / len(scored) if scored else 0.0,
        "per_class_ap": ap,
        "f1_micro": (2 * tp.sum() / (2 * tp.sum() + fp.sum() + fn.sum()).clamp(min=1)).item(),
        "f1_macro": sum(per_class_f1) / len(per_class_f1),
        "per_class_f1": per_class_f1,
        "threshold": threshold,
        "count": len(targets),
    }


def average_precision(scores: torch.Tensor, positive: torch.Tensor) -> float | None:
    """Average precision of one class as scikit-learn computes it: the sum over the distinct
    scores, highest first, of the recall gained times the precision there (tied scores taken
    together); None where no image is positive."""
    positive = positive > 0.5
    if not positive.any():
        return None
    order = scores.double().argsort(descending=True)
    ranked, hits = scores.double()[order], positive[order].double()
    # The last position of each run of equal scores: where the curve has a point
    last = torch.ones_like(ranked, dtype=torch.bool)
    last[:-1] = ranked[1:] != ranked[:-1]
    true_positives = hits.cumsum(0)[last]
    seen = torch.arange(1, len(ranked) + 1, dtype=torch.float64)[last]
    recall = true_positives / hits.sum()
    gained = torch.diff(recall, prepend=torch.zeros(1, dtype=torch.float64))
    return float((gained * true_positives / seen).sum())


def ranked_by(config: ModelConfig) -> str:
    """The validation figure that picks a run's best.pt: mAP for a multi-label model, top-1
    accuracy otherwise."""
    return "mAP" if config.multi_label else "accuracy"


def headline(metrics: dict) -> dict:
    """The figures of `metrics` a run logs and keeps in final_metrics.json: the loss, the ranking
    figure, and top-5 accuracy or (multi-label) the F1s at the threshold."""
    shown = ("mAP", "f1_micro", "f1_macro") if "mAP" in metrics else ("accuracy", "top5_accuracy")
    return {"loss": metrics["loss"], **{k: metrics[k] for k in shown}}


def evaluate_run(
    model: torch.nn.Module,
    data,
    *,
    model_config: ModelConfig,
    config: TrainConfig,
    processes: Processes,
    precision: str,
) -> dict:
    """A training run's evaluation of `model` on `data` (an ImageSet), fed as `model_config` says,
    this process's shard: `evaluate`'s metrics, or `evaluate_multi_label`'s at threshold 0.5."""
    shards = eval_batches(
        data,
        model_config,
        config.eval_batch_size,
        processes.device,
        rank=processes.rank,
        world_size=processes.world_size,
        num_workers=config.num_workers,
    )
    run = evaluate_multi_label if model_config.multi_label else evaluate
    return run(
        model,
        shards,
        len(data.class_names),
        processes.device,
        precision=precision,
        total=math.ceil(len(data) / processes.world_size / config.eval_batch_size),
        progress=processes.is_main,
        distributed=processes.distributed,
    )


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


def format_multi_label_report(metrics: dict, class_names: list[str]) -> str:
    """A multi-label model's loss, mAP and F1, then each class's average precision and F1."""
    width = max(len(n) for n in class_names + ["class"])
    lines = [
        f"images    {metrics['count']}",
        f"loss      {metrics['loss']:.4f}",
        f"mAP       {metrics['mAP']:.2%}",
        f"F1        {metrics['f1_micro']:.2%} micro, {metrics['f1_macro']:.2%} macro at "
        f"threshold {metrics['threshold']:g}",
        "",
        f"{'class':<{width}}  AP        F1",
    ]
    for name, ap, f1 in zip(
        class_names, metrics["per_class_ap"], metrics["per_class_f1"], strict=True
    ):
        shown = "  (none)" if ap is None else f"{ap:>8.2%}"
        lines.append(f"{name:<{width}}  {shown}  {f1:>7.2%}")
    return "\n".join(lines)


def draw_average_precision(
    metrics: dict, class_names: list[str], title: str, path: str | os.PathLike
) -> None:
    """A PNG of each class's average precision, as bars (a class without positives left empty)."""
    from matplotlib.figure import Figure

    values = [ap or 0.0 for ap in metrics["per_class_ap"]]
    fig = Figure(figsize=(min(max(4 + 0.3 * len(values), 6), 30), 4.5), layout="constrained")
    ax = fig.subplots()
    ax.bar(range(len(values)), values, color="tab:blue")
    if len(values) <= LABELLED_CONFUSION_MAX_CLASSES:
        ax.set_xticks(range(len(values)), class_names, rotation=90)
    ax.set_ylim(0, 1)
    ax.set_ylabel("average precision")
    ax.set_title(title)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))

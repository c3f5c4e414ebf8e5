"""A trained model put to use: images in (the evaluation transform of the model's config), the most
probable classes out."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..config import ModelConfig
from ..data import IMAGE_EXTENSIONS
from ..model import VisionTransformer
from ..preprocessing import crop_box, evaluation_batch
from ..runtime import autocast


def preprocess(image: np.ndarray, config: ModelConfig) -> torch.Tensor:
    """uint8 (H, W, 3) -> (3, img_size, img_size): the evaluation transform of the model whose
    config this is (`preprocessing.py`)."""
    return evaluation_batch(torch.from_numpy(image.copy())[None], config)[0]


def seen_part(image: np.ndarray, config: ModelConfig) -> np.ndarray:
    """The part of uint8 (H, W, 3) that `preprocess` feeds the model (its centre crop, or all of
    it), for drawing a map of the patches over."""
    top, left, h, w = (round(v) for v in crop_box(image.shape[0], image.shape[1], config))
    return image[top : top + h, left : left + w]


def list_images(arguments: list[str]) -> tuple[list[Path], list[str]]:
    """(image files, problems): files as given, folders searched recursively for image extensions;
    a missing path or a folder without images is a problem, reported by name."""
    files, problems = [], []
    for argument in arguments:
        path = Path(argument)
        if path.is_dir():
            found = sorted(
                p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
            )
            files += found
            if not found:
                problems.append(
                    f"{path}: no images in this folder (looked for {', '.join(IMAGE_EXTENSIONS)})"
                )
        elif path.is_file():
            files.append(path)
        else:
            problems.append(f"{path}: no such file or folder")
    return files, problems


def top_classes(
    logits: torch.Tensor, class_names: list[str], top_k: int, threshold: float | None = None
) -> list[list[tuple[str, int, float]]]:
    """For each row of (B, classes) logits, its top-k (class name, index, probability), most
    probable first; with `threshold` (a multi-label model's), every class whose own sigmoid
    probability reaches it instead."""
    if threshold is not None:
        probabilities = logits.float().sigmoid()
        return [
            sorted(
                ((class_names[i], i, p) for i, p in enumerate(row) if p >= threshold),
                key=lambda entry: -entry[2],
            )
            for row in probabilities.tolist()
        ]
    top = logits.float().softmax(dim=-1).topk(min(top_k, len(class_names)), dim=-1)
    return [
        [(class_names[i], i, p) for i, p in zip(idx, probs, strict=False)]
        for idx, probs in zip(top.indices.tolist(), top.values.tolist(), strict=False)
    ]


@torch.no_grad()
def predict(
    model: VisionTransformer,
    images: torch.Tensor,
    class_names: list[str],
    *,
    top_k: int,
    device: torch.device,
    precision: str,
    threshold: float = 0.5,
) -> list[list[tuple[str, int, float]]]:
    """For each of a batch of preprocessed images, its top-k (class name, index, probability), most
    probable first; for a multi-label model every class over `threshold`."""
    with autocast(device, precision):
        logits = model(images.to(device))
    multi = threshold if model.config.multi_label else None
    return top_classes(logits, class_names, top_k, multi)


@torch.no_grad()
def predict_with_attention(
    model: VisionTransformer, images: torch.Tensor, *, device: torch.device, precision: str
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One forward pass: (B, classes) logits and every layer's (B, heads, T, T) attention
    weights."""
    with autocast(device, precision):
        return model(images.to(device), return_attention=True)

"""The 224 px crop alone, for benchmarks/data.py: vitlab.augment.crop_and_resize against the same crop as two batched
matmuls and as one F.grid_sample (vitlab's two former formulations), and merely writing a fresh output."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vitlab.augment import crop_and_resize, resized_crop_boxes


def grid_sample_crop(
    images: torch.Tensor, boxes: torch.Tensor, size: int, flip: torch.Tensor
) -> torch.Tensor:
    """The same crop as one F.grid_sample (bilinear, align_corners=False, border), vitlab's former formulation."""
    B, _, H, W = images.shape
    top, left, h, w = boxes.to(images.device, images.dtype).unbind(1)
    steps = (torch.arange(size, device=images.device, dtype=images.dtype) + 0.5) / size
    xs = (left[:, None] + steps * w[:, None]) / W * 2 - 1  # (B, size), in grid_sample's [-1, 1]
    ys = (top[:, None] + steps * h[:, None]) / H * 2 - 1
    xs = torch.where(flip.to(images.device)[:, None], xs.flip(1), xs)
    grid = torch.stack(
        [xs[:, None, :].expand(B, size, size), ys[:, :, None].expand(B, size, size)], dim=-1
    )
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def matmul_crop(
    images: torch.Tensor, boxes: torch.Tensor, size: int, flip: torch.Tensor
) -> torch.Tensor:
    """The same crop as two batched matmuls, out = Ry @ image @ Rx^T with per-sample tent matrices, vitlab's former formulation."""
    B, C, H, W = images.shape
    top, left, h, w = boxes.to(images.device, torch.float32).unbind(1)
    steps = (torch.arange(size, device=images.device, dtype=torch.float32) + 0.5) / size

    # (B, size, in_size)
    def tents(start: torch.Tensor, length: torch.Tensor, in_size: int) -> torch.Tensor:
        centres = (start[:, None] + steps * length[:, None] - 0.5).clamp(0, in_size - 1)
        return (
            (1 - (centres[..., None] - torch.arange(in_size, device=images.device)).abs())
            .clamp(min=0)
            .to(images.dtype)
        )

    rows, cols = tents(top, h, H), tents(left, w, W)
    cols = torch.where(flip.to(images.device)[:, None, None], cols.flip(1), cols)
    x = torch.matmul(rows[:, None], images)  # (B, C, size, W)
    return torch.bmm(x.reshape(B, C * size, W), cols.transpose(1, 2)).view(B, C, size, size)


class Kernel:
    """A pipeline of benchmarks/data.py that computes one crop of a batch a call."""

    in_flight = 0

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def __init__(self, name: str, fn):
        self.name, self.fn = name, fn

    def next(self):
        return self.fn()


def crop_kernels(x: torch.Tensor, min_scale: float) -> tuple[list, float]:
    """The crop's ways as pipelines on the float batch `x`, random resized crops of at least
    `min_scale` of it, and their largest difference from vitlab's."""
    g, batch, device = torch.Generator().manual_seed(0), x.shape[0], x.device
    boxes = resized_crop_boxes(batch, x.shape[2], x.shape[3], (min_scale, 1.0), g)
    flip = torch.rand(batch, generator=g) < 0.5
    size = 224
    ours = crop_and_resize(x, boxes, size, flip)
    difference = max(
        (ours - other(x, boxes, size, flip)).abs().max().item()
        for other in (matmul_crop, grid_sample_crop)
    )
    kernels = [
        Kernel("vitlab.augment.crop_and_resize", lambda: crop_and_resize(x, boxes, size, flip)),
        Kernel("two batched matmuls", lambda: matmul_crop(x, boxes, size, flip)),
        Kernel("one F.grid_sample", lambda: grid_sample_crop(x, boxes, size, flip)),
        Kernel(
            "write a fresh output only",
            lambda: torch.empty(batch, 3, size, size, device=device).fill_(0.0),
        ),
    ]
    return kernels, difference

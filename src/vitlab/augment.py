"""Training augmentation of whole batches with tensor operations, on any device.

The dataset's uint8 images are turned into normalised float batches and augmented in one go per batch (the
cifar10-airbench way) rather than per image in Python. Every random choice is drawn on the CPU from a generator
seeded by (seed, step), so that any slice of a batch (a process's share, an accumulation step) is reproducible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def to_float(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) normalised with mean and std 0.5, as the seed."""
    return images.permute(0, 3, 1, 2).to(dtype).div_(127.5).sub_(1.0)


def resized_crop_boxes(batch: int, height: int, width: int, scale: tuple[float, float], generator: torch.Generator) -> torch.Tensor:
    """torchvision's RandomResizedCrop box sampling, for a whole batch: area fraction from `scale`,
    log-uniform aspect ratio in [3/4, 4/3], ten tries, then the centre crop. Returns (B, 4) = (top, left, h, w)."""
    tries = 10
    area = height * width * torch.empty(batch, tries).uniform_(*scale, generator=generator)
    log_ratio = torch.empty(batch, tries).uniform_(math.log(3 / 4), math.log(4 / 3), generator=generator)
    ratio = torch.exp(log_ratio)
    w = torch.sqrt(area * ratio).round()
    h = torch.sqrt(area / ratio).round()
    ok = (w > 0) & (h > 0) & (w <= width) & (h <= height)
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((batch,), -1))
    u = torch.rand(batch, 2, generator=generator)
    rows = torch.arange(batch)
    h_sel, w_sel = h[rows, first.clamp(min=0)], w[rows, first.clamp(min=0)]
    # Fallback when no try fits: the largest centred crop whose ratio is clamped to [3/4, 4/3].
    in_ratio = width / height
    if in_ratio < 3 / 4:
        fallback_h, fallback_w = round(width / (3 / 4)), width
    elif in_ratio > 4 / 3:
        fallback_h, fallback_w = height, round(height * 4 / 3)
    else:
        fallback_h, fallback_w = height, width
    found = first >= 0
    h_sel = torch.where(found, h_sel, torch.tensor(float(fallback_h)))
    w_sel = torch.where(found, w_sel, torch.tensor(float(fallback_w)))
    top = torch.where(found, torch.floor(u[:, 0] * (height - h_sel + 1)), torch.floor((height - h_sel) / 2))
    left = torch.where(found, torch.floor(u[:, 1] * (width - w_sel + 1)), torch.floor((width - w_sel) / 2))
    return torch.stack([top, left, h_sel, w_sel], dim=1)


def crop_and_resize(images: torch.Tensor, boxes: torch.Tensor, size: int, flip: torch.Tensor) -> torch.Tensor:
    """Bilinear crop-and-resize of float (B, C, H, W) to (B, C, size, size); boxes (B, 4) = (top, left, h, w); `flip` mirrors.

    grid_sample's sampling (bilinear, align_corners=False, border padding) done separably. The columns: one batched
    matmul with per-sample interpolation matrices (B, W, size), on the small input. The rows: each output row is
    the weighted sum of its two nearest input rows, an embedding_bag over the rows, which writes the large output
    once instead of spending H multiply-adds on each of its pixels as a second matmul would (2.4x faster in fp32
    on a CPU, 224 px from 32 px) or working out four taps per pixel as one grid_sample does."""
    B, C, H, W = images.shape
    # Sampling positions in fp32 even for bf16 images: bf16 cannot tell pixel 31.5 from 31.6.
    top, left, h, w = boxes.to(images.device, torch.float32).unbind(1)
    steps = (torch.arange(size, device=images.device, dtype=torch.float32) + 0.5) / size  # output pixel centres in [0, 1]

    def centres(start: torch.Tensor, length: torch.Tensor, in_size: int) -> torch.Tensor:
        # (B, size): each output pixel's centre mapped into the box, in input pixels, clamped to the border pixels
        return (start[:, None] + steps * length[:, None] - 0.5).clamp(0, in_size - 1)

    x = centres(left, w, W)
    x = torch.where(flip.to(images.device)[:, None], x.flip(1), x)
    # (B, W, size): an input column's weight in an output column is 1 - their distance (the tent), 0 beyond 1.
    cols = (x[:, None, :] - torch.arange(W, device=images.device, dtype=torch.float32)[:, None]).abs_().neg_().add_(1)
    resized = torch.bmm(images.reshape(B, C * H, W), cols.clamp_(min=0).to(images.dtype))  # (B, C*H, size)

    y = centres(top, h, H)
    above = y.floor().clamp_(max=max(H - 2, 0))  # the lower of the two rows, so that the upper one exists
    below = (above + 1).clamp_(max=H - 1)
    first_row = torch.arange(B * C, device=images.device).view(B, C, 1) * H  # of each image channel in `resized`
    index = torch.stack([first_row + above.long()[:, None], first_row + below.long()[:, None]], dim=-1)  # (B, C, size, 2)
    weight = torch.stack([above + 1 - y, y - above], dim=-1).to(images.dtype)[:, None].expand(B, C, size, 2)
    out = F.embedding_bag(index.view(-1, 2), resized.view(B * C * H, size), per_sample_weights=weight.reshape(-1, 2), mode="sum")
    return out.view(B, C, size, size)


def pad_crop(images: torch.Tensor, padding: int, offsets: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Random crop after reflection padding (the usual 32 px CIFAR augmentation); offsets (B, 2) in [0, 2*padding]."""
    B, C, H, W = images.shape
    padded = F.pad(images, (padding,) * 4, mode="reflect")
    rows = offsets[:, 0, None].to(images.device) + torch.arange(H, device=images.device)  # (B, H)
    cols = offsets[:, 1, None].to(images.device) + torch.arange(W, device=images.device)  # (B, W)
    cols = torch.where(flip.to(images.device)[:, None], cols.flip(1), cols)
    batch = torch.arange(B, device=images.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


@dataclass(frozen=True)
class Augmentation:
    img_size: int
    kind: str = "resized_crop"  # "resized_crop" (the seed's), "pad_crop" (32 px training), "none"
    min_scale: float = 0.05  # RandomResizedCrop's smallest area fraction (the seed's 0.05)
    hflip: bool = True  # the official fine-tuning flips; the seed did not
    pad: int = 4
    dtype: torch.dtype = torch.float32  # bf16 when training in bf16: the model would round to it anyway, and it halves the work

    def random_params(self, batch: int, height: int, width: int, generator: torch.Generator) -> dict:
        """Every random choice for a batch, drawn on the CPU so that any slice of it is reproducible."""
        flip = (torch.rand(batch, generator=generator) < 0.5) if self.hflip else torch.zeros(batch, dtype=torch.bool)
        if self.kind == "resized_crop":
            return {"flip": flip, "boxes": resized_crop_boxes(batch, height, width, (self.min_scale, 1.0), generator)}
        if self.kind == "pad_crop":
            return {"flip": flip, "offsets": torch.randint(0, 2 * self.pad + 1, (batch, 2), generator=generator)}
        return {"flip": flip}

    def apply(self, images: torch.Tensor, params: dict) -> torch.Tensor:
        """uint8 (B, H, W, 3) on any device -> normalised float (B, 3, img_size, img_size)."""
        x = to_float(images, self.dtype)
        if self.kind == "resized_crop":
            return crop_and_resize(x, params["boxes"], self.img_size, params["flip"])
        if self.kind == "pad_crop":
            x = pad_crop(x, self.pad, params["offsets"], params["flip"])
        else:
            x = torch.where(params["flip"].to(x.device)[:, None, None, None], x.flip(3), x)
        return resize(x, self.img_size)


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Evaluation transform: the whole image resized to size x size (the seed's Resize), bilinear."""
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=x.shape[-1] > size)

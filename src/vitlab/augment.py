"""Training augmentation of whole batches with tensor operations, on any device.

The dataset's uint8 images are turned into float batches normalised as the model's images are
(`preprocessing.py`) and augmented in one go per batch (the cifar10-airbench way) rather than per
image in Python. Every random choice is drawn on
the CPU from a generator seeded by (seed, step), so that any slice of a batch (a process's share, an
accumulation step) is reproducible.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import ModelConfig
from .preprocessing import resize, to_float
from .randaugment import RANDAUGMENT_OPS, randaugment


def resized_crop_boxes(
    batch: int, height: int, width: int, scale: tuple[float, float], generator: torch.Generator
) -> torch.Tensor:
    """torchvision's RandomResizedCrop box sampling, for a whole batch: area fraction from `scale`,
    log-uniform aspect ratio in [3/4, 4/3], ten tries, then the centre crop. Returns (B, 4) = (top,
    left, h, w)."""
    tries = 10
    area = height * width * torch.empty(batch, tries).uniform_(*scale, generator=generator)
    log_ratio = torch.empty(batch, tries).uniform_(
        math.log(3 / 4), math.log(4 / 3), generator=generator
    )
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
    top = torch.where(
        found, torch.floor(u[:, 0] * (height - h_sel + 1)), torch.floor((height - h_sel) / 2)
    )
    left = torch.where(
        found, torch.floor(u[:, 1] * (width - w_sel + 1)), torch.floor((width - w_sel) / 2)
    )
    return torch.stack([top, left, h_sel, w_sel], dim=1)


def crop_and_resize(
    images: torch.Tensor, boxes: torch.Tensor, size: int, flip: torch.Tensor
) -> torch.Tensor:
    """Bilinear crop-and-resize of float (B, C, H, W) to (B, C, size, size); boxes (B, 4) = (top,
    left, h, w); `flip` mirrors.

    grid_sample's sampling (bilinear, align_corners=False, border padding) done separably. The
    columns: one batched matmul with per-sample interpolation matrices (B, W, size), on the small
    input. The rows: each output row is the weighted sum of its two nearest input rows, an
    embedding_bag over the rows, which writes the large output once instead of spending H
    multiply-adds on each of its pixels as a second matmul would (2.4x faster in fp32 on a CPU, 224
    px from 32 px) or working out four taps per pixel as one grid_sample does."""
    B, C, H, W = images.shape
    # Sampling positions in fp32 even for bf16 images: bf16 cannot tell pixel 31.5 from 31.6.
    top, left, h, w = boxes.to(images.device, torch.float32).unbind(1)
    # Output pixel centres in [0, 1].
    steps = (torch.arange(size, device=images.device, dtype=torch.float32) + 0.5) / size

    def centres(start: torch.Tensor, length: torch.Tensor, in_size: int) -> torch.Tensor:
        # (B, size): each output pixel's centre mapped into the box, in input pixels, clamped to the
        # border pixels
        return (start[:, None] + steps * length[:, None] - 0.5).clamp(0, in_size - 1)

    x = centres(left, w, W)
    x = torch.where(flip.to(images.device)[:, None], x.flip(1), x)
    # (B, W, size): an input column's weight in an output column is 1 - their distance (the tent), 0
    # beyond 1.
    cols = (
        (x[:, None, :] - torch.arange(W, device=images.device, dtype=torch.float32)[:, None])
        .abs_()
        .neg_()
        .add_(1)
    )
    # (B, C*H, size)
    resized = torch.bmm(images.reshape(B, C * H, W), cols.clamp_(min=0).to(images.dtype))

    return _two_row_taps(resized, centres(top, h, H), C, H).view(B, C, size, size)


def _two_row_taps(resized: torch.Tensor, y: torch.Tensor, C: int, H: int) -> torch.Tensor:
    """Each output row of `resized` (B, C*H, size) as the tent-weighted sum of the two input rows
    around its centre `y` (B, size), one embedding_bag over the rows."""
    B, size = y.shape
    # The lower of the two rows, so that the upper one exists.
    above = y.floor().clamp_(max=max(H - 2, 0))
    below = (above + 1).clamp_(max=H - 1)
    # The first row of each image channel in `resized`.
    first_row = torch.arange(B * C, device=y.device).view(B, C, 1) * H
    rows = [first_row + above.long()[:, None], first_row + below.long()[:, None]]
    index = torch.stack(rows, dim=-1)  # (B, C, size, 2)
    weight = torch.stack([above + 1 - y, y - above], dim=-1).to(resized.dtype)
    weight = weight[:, None].expand(B, C, size, 2)
    return F.embedding_bag(
        index.view(-1, 2),
        resized.view(B * C * H, size),
        per_sample_weights=weight.reshape(-1, 2),
        mode="sum",
    )


def pad_crop(
    images: torch.Tensor, padding: int, offsets: torch.Tensor, flip: torch.Tensor
) -> torch.Tensor:
    """Random crop after reflection padding (the usual 32 px CIFAR augmentation); offsets (B, 2) in
    [0, 2*padding]."""
    B, C, H, W = images.shape
    padded = F.pad(images, (padding,) * 4, mode="reflect")
    rows = offsets[:, 0, None].to(images.device) + torch.arange(H, device=images.device)  # (B, H)
    cols = offsets[:, 1, None].to(images.device) + torch.arange(W, device=images.device)  # (B, W)
    cols = torch.where(flip.to(images.device)[:, None], cols.flip(1), cols)
    batch = torch.arange(B, device=images.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


# ---------------------------------------------------------------------------------------------
# Random erasing (Zhong et al., 2020; timm's mode "rand": each box one random colour, N(0, 1) per
# channel in the normalised space, as timm draws it after its Normalize: right under any mean/std)


def erasing_boxes(
    batch: int, height: int, width: int, probability: float, generator: torch.Generator
) -> torch.Tensor:
    """(B, 7): erase?, top, left, h, w and the box's three channel values; area 2% to 1/3, aspect
    0.3 to 3.3."""
    erase = torch.rand(batch, generator=generator) < probability
    area = torch.empty(batch).uniform_(0.02, 1 / 3, generator=generator) * height * width
    ratio = torch.empty(batch).uniform_(math.log(0.3), math.log(1 / 0.3), generator=generator).exp()
    h = torch.sqrt(area * ratio).round().clamp(1, height)
    w = torch.sqrt(area / ratio).round().clamp(1, width)
    top = torch.floor(torch.rand(batch, generator=generator) * (height - h + 1))
    left = torch.floor(torch.rand(batch, generator=generator) * (width - w + 1))
    colour = torch.randn(batch, 3, generator=generator)
    return torch.cat([torch.stack([erase.float(), top, left, h, w], 1), colour], 1)


def _box_mask(boxes: torch.Tensor, height: int, width: int, device) -> torch.Tensor:
    """(B, 1, H, W) True inside each (top, left, h, w) box."""
    top, left, h, w = (boxes[:, i, None].to(device) for i in range(4))
    rows, cols = torch.arange(height, device=device), torch.arange(width, device=device)
    inside_rows = (rows >= top) & (rows < top + h)  # (B, H)
    inside_cols = (cols >= left) & (cols < left + w)  # (B, W)
    return (inside_rows[:, :, None] & inside_cols[:, None, :])[:, None]


def erase(x: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    mask = _box_mask(boxes[:, 1:5], x.shape[-2], x.shape[-1], x.device) & boxes[
        :, 0, None, None, None
    ].bool().to(x.device)
    return torch.where(mask, boxes[:, 5:8, None, None].to(x), x)


# ---------------------------------------------------------------------------------------------
# Mixup (Zhang et al., 2018) and CutMix (Yun et al., 2019), on pairs of neighbours: image 2k with 2k
# + 1. The global batch's order is already random, and a slice of even length that starts at an even
# index keeps its pairs, so a batch split over processes or accumulation steps mixes the same
# images.


def mix_params(
    pairs: int,
    size: int,
    mixup: float,
    cutmix: float,
    switch_prob: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """(pairs, 6): each pair's mixing weight, cutmix?, and its box (top, left, h, w) over `size` x
    `size` images."""
    import numpy as np

    rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=generator)))
    use_cutmix = torch.rand(pairs, generator=generator) < (
        switch_prob if mixup > 0 and cutmix > 0 else float(cutmix > 0)
    )
    alpha = torch.where(use_cutmix, cutmix, mixup)
    lam = torch.from_numpy(
        rng.beta(alpha.clamp(min=1e-6).numpy(), alpha.clamp(min=1e-6).numpy())
    ).float()
    lam = torch.where(alpha > 0, lam, torch.ones(pairs))
    # CutMix's box: a (1 - lam) share of the area, centred anywhere, clipped
    side = (1 - lam).sqrt() * size
    centre = torch.randint(0, size, (pairs, 2), generator=generator).float()
    low = (centre - torch.div(side.round(), 2, rounding_mode="floor")[:, None]).clamp(0, size)
    high = (centre + torch.div(side.round(), 2, rounding_mode="floor")[:, None]).clamp(0, size)
    box = torch.cat([low, high - low], 1)  # top, left, h, w
    lam = torch.where(use_cutmix, 1 - box[:, 2] * box[:, 3] / size**2, lam)
    return torch.cat([lam[:, None], use_cutmix.float()[:, None], box], 1)


def mix(
    x: torch.Tensor, labels: torch.Tensor, params: torch.Tensor, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each pair's images mixed (or one's box pasted into the other) and their labels by the same
    weight: class indices (B,) as one-hot rows, or a multi-label set's multi-hot rows (B, classes)."""
    B = x.shape[0]
    partner = torch.arange(B, device=x.device) ^ 1
    lam = params[:, 0].repeat_interleave(2).to(x.device)
    cut = params[:, 1].repeat_interleave(2).bool().to(x.device)[:, None, None, None]
    # (B, 1, H, W)
    inside = _box_mask(params[:, 2:6].repeat_interleave(2, 0), x.shape[-2], x.shape[-1], x.device)
    # Each pixel's weight of its own image: lam for a mixup pair, 1 outside the box and 0 inside for
    # a CutMix pair.
    own = torch.where(cut, (~inside).to(x.dtype), lam.view(-1, 1, 1, 1).to(x.dtype))
    mixed = torch.lerp(x[partner], x, own)  # one pass over the batch: partner + own * (x - partner)
    targets = labels.float() if labels.dim() == 2 else F.one_hot(labels, num_classes).float()
    return mixed, lam[:, None] * targets + (1 - lam[:, None]) * targets[partner]


@dataclass(frozen=True)
class Augmentation:
    """A training augmentation, in the order of timm's and torchvision's pipelines: the crop and
    flip, then RandAugment, then random erasing, then (over pairs of images) mixup or CutMix. The
    names are TrainConfig's, whose help says what each does."""

    img_size: int
    augment: str = "resized_crop"  # "resized_crop" (the tutorial's), "pad_crop" (32 px), "none"
    min_scale: float = 0.05  # RandomResizedCrop's smallest area fraction (the tutorial's 0.05)
    hflip: bool = True  # the official fine-tuning flips; the tutorial did not
    pad: int = 4  # pad_crop's reflection padding
    # bf16 when training in bf16: the model would round to it anyway, and it halves the work
    dtype: torch.dtype = torch.float32
    randaugment: tuple[int, int] | None = None  # (operations per image, magnitude of 30)
    random_erasing: float = 0.0  # share of images with a box erased
    mixup: float = 0.0  # Beta(alpha, alpha) of the mixing weight; 0: off
    cutmix: float = 0.0
    mixup_switch_prob: float = 0.5  # with both on: the share of pairs cut-mixed rather than mixed
    # How the model's images are normalised (its ModelConfig's, which the pretrained file sets)
    image_mean: tuple[float, float, float] = ModelConfig.image_mean
    image_std: tuple[float, float, float] = ModelConfig.image_std

    @classmethod
    def from_config(
        cls, config, model: ModelConfig, dtype: torch.dtype = torch.float32
    ) -> Augmentation:
        """The augmentation a TrainConfig asks for, of images fed to `model`, producing batches in
        `dtype`."""
        # A constant, the caller's, parsed from "N,M", and the model's
        own = ("pad", "dtype", "randaugment", "image_mean", "image_std")
        values = {
            f.name: getattr(config, f.name) for f in dataclasses.fields(cls) if f.name not in own
        }
        return cls(
            **values,
            dtype=dtype,
            randaugment=config.randaugment_ops(),
            image_mean=model.image_mean,
            image_std=model.image_std,
        )

    @property
    def mixes(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0

    def random_params(
        self, batch: int, height: int, width: int, generator: torch.Generator
    ) -> dict:
        """Every random choice for a batch of images (not the mixing), drawn on the CPU so that any
        slice is reproducible."""
        flip = torch.rand(batch, generator=generator) < 0.5
        params = {"flip": flip if self.hflip else torch.zeros(batch, dtype=torch.bool)}
        if self.augment == "resized_crop":
            scale = (self.min_scale, 1.0)
            params["boxes"] = resized_crop_boxes(batch, height, width, scale, generator)
        elif self.augment == "pad_crop":
            params["offsets"] = torch.randint(0, 2 * self.pad + 1, (batch, 2), generator=generator)
        if self.randaugment:
            shape = (batch, self.randaugment[0])
            params["ra_ops"] = torch.randint(0, len(RANDAUGMENT_OPS), shape, generator=generator)
            params["ra_signs"] = torch.randint(0, 2, shape, generator=generator) * 2 - 1
        if self.random_erasing > 0:
            size, share = self.img_size, self.random_erasing
            params["erasing"] = erasing_boxes(batch, size, size, share, generator)
        return params

    def apply(self, images: torch.Tensor, params: dict) -> torch.Tensor:
        """uint8 (B, H, W, 3) on any device -> augmented normalised float (B, 3, img_size,
        img_size)."""
        x = to_float(images, self.image_mean, self.image_std, dtype=self.dtype)
        return self.finish(self.crop(x, params), params)

    def crop(self, x: torch.Tensor, params: dict) -> torch.Tensor:
        """The crop (or padded crop, or none) and flip of float (B, 3, H, W), resized to img_size."""
        if self.augment == "resized_crop":
            return crop_and_resize(x, params["boxes"], self.img_size, params["flip"])
        if self.augment == "pad_crop":
            x = pad_crop(x, self.pad, params["offsets"], params["flip"])
        else:
            x = torch.where(params["flip"].to(x.device)[:, None, None, None], x.flip(3), x)
        return resize(x, (self.img_size, self.img_size), "bilinear")

    def finish(self, x: torch.Tensor, params: dict) -> torch.Tensor:
        """RandAugment and random erasing of normalised float images already cropped to img_size
        (the streaming path crops each image itself, anti-aliased, from any size)."""
        if self.randaugment:
            ops, signs, magnitude = params["ra_ops"].T, params["ra_signs"].T, self.randaugment[1]
            x = randaugment(x, ops, signs, magnitude, mean=self.image_mean, std=self.image_std)
        return erase(x, params["erasing"]) if self.random_erasing > 0 else x

    def mix_params(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        """The mixing of a global batch, per pair of images; draw from its own generator (see
        `mix`)."""
        mixup, cutmix, switch = self.mixup, self.cutmix, self.mixup_switch_prob
        return mix_params(batch // 2, self.img_size, mixup, cutmix, switch, generator)

"""Training augmentation of whole batches with tensor operations, on any device.

The dataset's uint8 images are turned into normalised float batches and augmented in one go per
batch (the cifar10-airbench way) rather than per image in Python. Every random choice is drawn on
the CPU from a generator seeded by (seed, step), so that any slice of a batch (a process's share, an
accumulation step) is reproducible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def to_float(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) normalised with mean and std 0.5, as the
    tutorial."""
    return images.permute(0, 3, 1, 2).to(dtype).div_(127.5).sub_(1.0)


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
    steps = (
        torch.arange(size, device=images.device, dtype=torch.float32) + 0.5
    ) / size  # output pixel centres in [0, 1]

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
    resized = torch.bmm(
        images.reshape(B, C * H, W), cols.clamp_(min=0).to(images.dtype)
    )  # (B, C*H, size)

    y = centres(top, h, H)
    above = y.floor().clamp_(
        max=max(H - 2, 0)
    )  # the lower of the two rows, so that the upper one exists
    below = (above + 1).clamp_(max=H - 1)
    first_row = (
        torch.arange(B * C, device=images.device).view(B, C, 1) * H
    )  # of each image channel in `resized`
    index = torch.stack(
        [first_row + above.long()[:, None], first_row + below.long()[:, None]], dim=-1
    )  # (B, C, size, 2)
    weight = (
        torch.stack([above + 1 - y, y - above], dim=-1)
        .to(images.dtype)[:, None]
        .expand(B, C, size, 2)
    )
    out = F.embedding_bag(
        index.view(-1, 2),
        resized.view(B * C * H, size),
        per_sample_weights=weight.reshape(-1, 2),
        mode="sum",
    )
    return out.view(B, C, size, size)


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
# RandAugment (Cubuk et al., 2020) on whole batches: each image its own operations, in [0, 1] space.
# The operations and their ranges at magnitude M of 30 are torchvision's RandAugment; geometric ones
# fill grey.

RANDAUGMENT_OPS = (
    "identity",
    "shear_x",
    "shear_y",
    "translate_x",
    "translate_y",
    "rotate",
    "brightness",
    "color",
    "contrast",
    "sharpness",
    "posterize",
    "solarize",
    "autocontrast",
    "equalize",
)
_GEOMETRIC = RANDAUGMENT_OPS[1:6]
MAX_MAGNITUDE = 30


def _blend(image: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """image * factor + other * (1 - factor), clamped to [0, 1]; factor (B,) per image."""
    return (other + factor.view(-1, 1, 1, 1) * (image - other)).clamp_(0, 1)


def _grey(y: torch.Tensor) -> torch.Tensor:
    return (0.2989 * y[:, 0] + 0.587 * y[:, 1] + 0.114 * y[:, 2]).unsqueeze(
        1
    )  # (B, 1, H, W), torchvision's luma


def _sharpness(y: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with PIL's smoothing filter (centre 5, neighbours 1, over 13), border pixels left as
    they are: the 3x3 sum by an average pool, many times faster on a CPU than a grouped
    convolution."""
    smooth = y.clone()
    smooth[:, :, 1:-1, 1:-1] = (F.avg_pool2d(y, 3, stride=1) * 9 + 4 * y[:, :, 1:-1, 1:-1]) / 13
    return _blend(y, smooth, factor)


def _posterize(y: torch.Tensor, bits: int) -> torch.Tensor:
    step = 2.0 ** (8 - bits)
    return torch.floor(torch.round(y * 255) / step) * step / 255


def _autocontrast(y: torch.Tensor) -> torch.Tensor:
    low, high = y.amin(dim=(2, 3), keepdim=True), y.amax(dim=(2, 3), keepdim=True)
    flat = high <= low  # a constant channel stays as it is
    return torch.where(flat, y, (y - low) / torch.where(flat, torch.ones_like(high), high - low))


def _equalize(y: torch.Tensor) -> torch.Tensor:
    from torchvision.transforms.v2 import functional as TF

    return TF.equalize((y * 255).round_().to(torch.uint8)).to(y.dtype) / 255


def _affine(y: torch.Tensor, op: torch.Tensor, amount: torch.Tensor) -> torch.Tensor:
    """Shears, translations (amount in pixels) and rotations (degrees), one per image; uncovered
    pixels grey."""
    B, _, H, W = y.shape
    theta = torch.eye(2, 3).repeat(B, 1, 1)
    radians = amount * math.pi / 180
    cos, sin = radians.cos(), radians.sin()
    geometric = {
        "shear_x": ((0, 1), amount),
        "shear_y": ((1, 0), amount),
        "translate_x": ((0, 2), 2 * amount / W),
        "translate_y": ((1, 2), 2 * amount / H),
    }
    for name, ((row, col), value) in geometric.items():
        mine = op == RANDAUGMENT_OPS.index(name)
        theta[mine, row, col] = value[mine]
    rotating = op == RANDAUGMENT_OPS.index("rotate")
    theta[rotating, :, :2] = torch.stack(
        [torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], 1
    )[rotating]
    grid = F.affine_grid(theta.to(y), [B, 3, H, W], align_corners=False)
    return (
        F.grid_sample(y - 0.5, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        + 0.5
    )


def _magnitude(op: str, level: float, size: int) -> float:
    """torchvision's RandAugment range for `op` at `level` in [0, 1] (magnitude / 30)."""
    return {
        "shear_x": 0.3,
        "shear_y": 0.3,
        "translate_x": 150 / 331 * size,
        "translate_y": 150 / 331 * size,
        "rotate": 30.0,
        "brightness": 0.9,
        "color": 0.9,
        "contrast": 0.9,
        "sharpness": 0.9,
    }.get(op, 0.0) * level


# Each colour operation of images y in [0, 1], given the signed amount (B,) and the level (magnitude
# / 30).
_COLOUR_OPS = {
    "brightness": lambda y, amount, level: _blend(y, torch.zeros_like(y), 1 + amount),
    "color": lambda y, amount, level: _blend(y, _grey(y), 1 + amount),
    "contrast": lambda y, amount, level: _blend(
        y, _grey(y).mean(dim=(1, 2, 3), keepdim=True), 1 + amount
    ),
    "sharpness": lambda y, amount, level: _sharpness(y, 1 + amount),
    "posterize": lambda y, amount, level: _posterize(y, 8 - round(4 * level)),
    "solarize": lambda y, amount, level: torch.where(y >= 1 - level, 1 - y, y),
    "autocontrast": lambda y, amount, level: _autocontrast(y),
    "equalize": lambda y, amount, level: _equalize(y),
}


def randaugment(
    x: torch.Tensor, ops: torch.Tensor, signs: torch.Tensor, magnitude: int
) -> torch.Tensor:
    """Normalised float (B, 3, S, S) with `ops` (rounds, B) indices into RANDAUGMENT_OPS applied in
    turn, each at `magnitude` (of 30) with `signs` (rounds, B) of +1 or -1 for the signed ones."""
    level = magnitude / MAX_MAGNITUDE
    ranges = torch.tensor([_magnitude(name, level, x.shape[-1]) for name in RANDAUGMENT_OPS])
    y = x.float().add(1).div_(2)  # [-1, 1] -> [0, 1]
    for op, sign in zip(
        ops, signs, strict=False
    ):  # each round, on the CPU: which image takes which operation
        amount = sign.float() * ranges[op]
        geometric = (op >= 1) & (op <= len(_GEOMETRIC))
        if geometric.any():
            y[geometric.to(y.device)] = _affine(
                y[geometric.to(y.device)], op[geometric], amount[geometric]
            )
        for name, apply in _COLOUR_OPS.items():
            mine = op == RANDAUGMENT_OPS.index(name)
            if mine.any():
                y[mine.to(y.device)] = apply(y[mine.to(y.device)], amount[mine].to(y.device), level)
    return y.mul_(2).sub_(1).to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Random erasing (Zhong et al., 2020; timm's mode "rand": each box one random colour)


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
    side = (
        1 - lam
    ).sqrt() * size  # CutMix's box: a (1 - lam) share of the area, centred anywhere, clipped
    centre = torch.randint(0, size, (pairs, 2), generator=generator).float()
    low = (centre - torch.div(side.round(), 2, rounding_mode="floor")[:, None]).clamp(0, size)
    high = (centre + torch.div(side.round(), 2, rounding_mode="floor")[:, None]).clamp(0, size)
    box = torch.cat([low, high - low], 1)  # top, left, h, w
    lam = torch.where(use_cutmix, 1 - box[:, 2] * box[:, 3] / size**2, lam)
    return torch.cat([lam[:, None], use_cutmix.float()[:, None], box], 1)


def mix(
    x: torch.Tensor, labels: torch.Tensor, params: torch.Tensor, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each pair's images mixed (or one's box pasted into the other) and their one-hot labels by the
    same weight."""
    B = x.shape[0]
    partner = torch.arange(B, device=x.device) ^ 1
    lam = params[:, 0].repeat_interleave(2).to(x.device)
    cut = params[:, 1].repeat_interleave(2).bool().to(x.device)[:, None, None, None]
    inside = _box_mask(
        params[:, 2:6].repeat_interleave(2, 0), x.shape[-2], x.shape[-1], x.device
    )  # (B, 1, H, W)
    # Each pixel's weight of its own image: lam for a mixup pair, 1 outside the box and 0 inside for
    # a CutMix pair.
    own = torch.where(cut, (~inside).to(x.dtype), lam.view(-1, 1, 1, 1).to(x.dtype))
    mixed = torch.lerp(x[partner], x, own)  # one pass over the batch: partner + own * (x - partner)
    targets = F.one_hot(labels, num_classes).float()
    return mixed, lam[:, None] * targets + (1 - lam[:, None]) * targets[partner]


@dataclass(frozen=True)
class Augmentation:
    img_size: int
    kind: str = (
        "resized_crop"  # "resized_crop" (the tutorial's), "pad_crop" (32 px training), "none"
    )
    min_scale: float = 0.05  # RandomResizedCrop's smallest area fraction (the tutorial's 0.05)
    hflip: bool = True  # the official fine-tuning flips; the tutorial did not
    pad: int = 4
    dtype: torch.dtype = (
        torch.float32
    )  # bf16 when training in bf16: the model would round to it anyway, and it halves the work
    randaugment: tuple[int, int] | None = None  # (operations per image, magnitude of 30)
    random_erasing: float = 0.0  # share of images with a box erased
    mixup: float = 0.0  # Beta(alpha, alpha) of the mixing weight; 0: off
    cutmix: float = 0.0
    cutmix_switch_prob: float = 0.5  # with both on: the share of pairs cut-mixed rather than mixed

    @property
    def mixes(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0

    def random_params(
        self, batch: int, height: int, width: int, generator: torch.Generator
    ) -> dict:
        """Every random choice for a batch of images (not the mixing), drawn on the CPU so that any
        slice is reproducible."""
        flip = (
            (torch.rand(batch, generator=generator) < 0.5)
            if self.hflip
            else torch.zeros(batch, dtype=torch.bool)
        )
        params = {"flip": flip}
        if self.kind == "resized_crop":
            params["boxes"] = resized_crop_boxes(
                batch, height, width, (self.min_scale, 1.0), generator
            )
        elif self.kind == "pad_crop":
            params["offsets"] = torch.randint(0, 2 * self.pad + 1, (batch, 2), generator=generator)
        if self.randaugment:
            rounds = self.randaugment[0]
            params["ra_ops"] = torch.randint(
                0, len(RANDAUGMENT_OPS), (batch, rounds), generator=generator
            )
            params["ra_signs"] = torch.randint(0, 2, (batch, rounds), generator=generator) * 2 - 1
        if self.random_erasing > 0:
            params["erasing"] = erasing_boxes(
                batch, self.img_size, self.img_size, self.random_erasing, generator
            )
        return params

    def apply(self, images: torch.Tensor, params: dict) -> torch.Tensor:
        """uint8 (B, H, W, 3) on any device -> normalised float (B, 3, img_size, img_size).
        RandAugment runs on the stored images, before the crop: at 224 px from CIFAR's 32 px images
        it costs 1/49 of what it would after."""
        x = to_float(images, self.dtype)
        if self.randaugment:
            x = randaugment(x, params["ra_ops"].T, params["ra_signs"].T, self.randaugment[1])
        if self.kind == "resized_crop":
            x = crop_and_resize(x, params["boxes"], self.img_size, params["flip"])
        else:
            if self.kind == "pad_crop":
                x = pad_crop(x, self.pad, params["offsets"], params["flip"])
            else:
                x = torch.where(params["flip"].to(x.device)[:, None, None, None], x.flip(3), x)
            x = resize(x, self.img_size)
        return erase(x, params["erasing"]) if self.random_erasing > 0 else x

    def finish(self, x: torch.Tensor, params: dict) -> torch.Tensor:
        """RandAugment and random erasing of normalised float images already cropped to img_size:
        the streaming path, where each image is cropped (anti-aliased, from any size) before it is
        augmented."""
        if self.randaugment:
            x = randaugment(x, params["ra_ops"].T, params["ra_signs"].T, self.randaugment[1])
        return erase(x, params["erasing"]) if self.random_erasing > 0 else x

    def mix_params(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        """The mixing of a global batch, per pair of images; draw from its own generator (see
        `mix`)."""
        return mix_params(
            batch // 2, self.img_size, self.mixup, self.cutmix, self.cutmix_switch_prob, generator
        )


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Evaluation transform: the whole image resized to size x size (the tutorial's Resize),
    bilinear."""
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(
        x, size=(size, size), mode="bilinear", align_corners=False, antialias=x.shape[-1] > size
    )

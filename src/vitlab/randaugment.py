"""RandAugment (Cubuk et al., 2020) on whole batches: each image its own operations, in [0, 1] space
(the normalised images mapped back by the model's mean and std, so that every range below holds
under any normalisation). The operations and their ranges at magnitude M of 30 are torchvision's
RandAugment; geometric ones fill grey.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .preprocessing import Triple, from_unit, to_unit

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
    # (B, 1, H, W), torchvision's luma
    return (0.2989 * y[:, 0] + 0.587 * y[:, 1] + 0.114 * y[:, 2]).unsqueeze(1)


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
    x: torch.Tensor,
    ops: torch.Tensor,
    signs: torch.Tensor,
    magnitude: int,
    *,
    mean: Triple,
    std: Triple,
) -> torch.Tensor:
    """Float (B, 3, S, S) normalised with `mean` and `std` (the official 0.5: [-1, 1]) with `ops`
    (rounds, B) indices into RANDAUGMENT_OPS applied in turn, each at `magnitude` (of 30) with
    `signs` (rounds, B) of +1 or -1 for the signed ones."""
    level = magnitude / MAX_MAGNITUDE
    ranges = torch.tensor([_magnitude(name, level, x.shape[-1]) for name in RANDAUGMENT_OPS])
    y = to_unit(x, mean, std)
    # Each round, on the CPU: which image takes which operation
    for op, sign in zip(ops, signs, strict=False):
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
    return from_unit(y, mean, std).to(x.dtype)

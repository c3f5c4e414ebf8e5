"""How images are fed to a model, from its `ModelConfig`: normalised with its `image_mean` and
`image_std`, and for evaluation resized as `resize`, `crop_pct` and `interpolation` say, then
centre-cropped to `img_size` (timm's evaluation transform). The same functions serve train's
validation and test, `vitlab eval`, predict, attention, the demo and the exports' metadata; the
training augmentation (`augment.py`) normalises with the same numbers.

The official defaults (mean and std 0.5: images in [-1, 1]; the whole image squashed to img_size,
bilinear) compute what vitlab always computed, bit for bit.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .config import ModelConfig

Triple = tuple[float, float, float]


def _per_channel(values: list[float], like: torch.Tensor) -> float | torch.Tensor:
    """One Python number where every channel has the same (the official 0.5), else (3, 1, 1). The
    number keeps vitlab's arithmetic exactly on every device: CUDA divides by a Python number as a
    product with its reciprocal, by a tensor truly."""
    if len(set(values)) == 1:
        return values[0]
    return torch.tensor(values, dtype=torch.float32, device=like.device).view(3, 1, 1)


def normalise(
    x: torch.Tensor, mean: Triple, std: Triple, *, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """uint8 (..., 3, H, W) -> (x / 255 - mean) / std in `dtype`, computed as x / (255 std) -
    mean / std (mean and std 0.5: x / 127.5 - 1, images in [-1, 1])."""
    scale = _per_channel([255 * s for s in std], x)
    shift = _per_channel([m / s for m, s in zip(mean, std, strict=True)], x)
    return x.to(dtype).div_(scale).sub_(shift)


def to_float(
    images: torch.Tensor, mean: Triple, std: Triple, *, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """uint8 (B, H, W, 3), the datasets' layout -> normalised float (B, 3, H, W)."""
    return normalise(images.permute(0, 3, 1, 2), mean, std, dtype=dtype)


def to_unit(x: torch.Tensor, mean: Triple, std: Triple) -> torch.Tensor:
    """Normalised images -> float32 in [0, 1] (the pixel / 255 they came from), a new tensor."""
    shift = _per_channel([m / s for m, s in zip(mean, std, strict=True)], x)
    return x.float().add(shift).mul_(_per_channel(list(std), x))


def from_unit(y: torch.Tensor, mean: Triple, std: Triple) -> torch.Tensor:
    """Images in [0, 1] -> normalised, in place (`to_unit`'s inverse)."""
    shift = _per_channel([m / s for m, s in zip(mean, std, strict=True)], y)
    return y.div_(_per_channel(list(std), y)).sub_(shift)


# ---------------------------------------------------------------------------------------------
# Evaluation's resize and centre crop


def resized_side(config: ModelConfig) -> int:
    """The side evaluation resizes to before its centre crop: timm's scale_size, floor(img_size /
    crop_pct) (224 at crop_pct 0.875: 256)."""
    return math.floor(config.img_size / config.crop_pct)


def resized_shape(height: int, width: int, config: ModelConfig) -> tuple[int, int]:
    """(height, width) an image of that size is resized to: squashed to a square, or its shorter
    side to `resized_side` and the longer in proportion, truncated (torchvision's Resize(int))."""
    side = resized_side(config)
    if config.resize == "squash":
        return side, side
    if width <= height:
        return int(side * height / width), side
    return side, int(side * width / height)


def resize(x: torch.Tensor, size: tuple[int, int], interpolation: str) -> torch.Tensor:
    """(..., C, H, W) uint8 or float resized to `size` (height, width), antialiased as PIL's
    filters, which timm's and transformers' transforms use (bicubic's a = -0.5: torch's plain
    kernel has -0.75). A float bilinear enlargement keeps the plain kernel: the same tent filter,
    and vitlab's arithmetic bit for bit."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    if x.dtype == torch.uint8:  # torchvision's uint8 kernels round and clamp as PIL does
        mode = InterpolationMode(interpolation)
        return TF.resize(x, list(size), interpolation=mode, antialias=True)
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    shrinking = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    # TF.resize's own call for float32, here for bf16 too (which it would round-trip through fp32)
    antialias = shrinking or interpolation == "bicubic"
    batch = x.reshape(-1, *x.shape[-3:])
    out = F.interpolate(
        batch, size=size, mode=interpolation, align_corners=False, antialias=antialias
    )
    return out.reshape(*x.shape[:-2], *size)


def fit(x: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """(..., 3, H, W), uint8 or float -> (..., 3, img_size, img_size): resized as the config says,
    then its centre (torchvision's center_crop)."""
    from torchvision.transforms.v2 import functional as TF

    shape = resized_shape(x.shape[-2], x.shape[-1], config)
    resized = resize(x, shape, config.interpolation)
    return TF.center_crop(resized, [config.img_size, config.img_size])


def evaluation_batch(images: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """uint8 (B, H, W, 3) on any device -> the model's input, float32 (B, 3, img_size, img_size),
    one batched resize for images of one size. Bicubic overshoots the pixels' range, which PIL
    (timm's and transformers' transforms) clamps as it resizes, as torchvision's uint8 kernels do:
    resized as uint8, then normalised (within 2 levels of PIL's, tests/test_preprocessing.py).
    Bilinear stays in range: normalised, then resized, vitlab's arithmetic as it always was."""
    mean, std = config.image_mean, config.image_std
    if config.interpolation == "bilinear":
        return fit(to_float(images, mean, std), config)
    return normalise(fit(images.permute(0, 3, 1, 2), config), mean, std)


def crop_box(height: int, width: int, config: ModelConfig) -> tuple[float, float, float, float]:
    """(top, left, h, w) in an image's own pixels: the part of it evaluation feeds the model."""
    resized_h, resized_w = resized_shape(height, width, config)
    size = config.img_size
    # torchvision's centre-crop anchor
    top, left = round((resized_h - size) / 2), round((resized_w - size) / 2)
    scale_y, scale_x = height / resized_h, width / resized_w
    return top * scale_y, left * scale_x, size * scale_y, size * scale_x


def describe(config: ModelConfig) -> str:
    """One line: how images are fed."""
    side, size = resized_side(config), config.img_size
    how = "squashed to" if config.resize == "squash" else "shorter side to"
    crop = "" if side == size else f", centre {size} px"
    numbers = ", ".join(f"{v:g}" for v in config.image_mean)
    spread = ", ".join(f"{v:g}" for v in config.image_std)
    return (
        f"images {how} {side} px ({config.interpolation}){crop}; (pixel / 255 - mean) / std with "
        f"mean ({numbers}), std ({spread})"
    )


def metadata(config: ModelConfig) -> dict[str, str]:
    """How an exported model's images are fed, as text for ONNX metadata and TorchScript's extra
    files."""
    return {
        "input": (
            f"float32 (batch, 3, {config.img_size}, {config.img_size}) RGB: {describe(config)}"
        ),
        "img_size": str(config.img_size),
        "image_mean": ",".join(repr(v) for v in config.image_mean),
        "image_std": ",".join(repr(v) for v in config.image_std),
        "resize": config.resize,
        "crop_pct": repr(config.crop_pct),
        "interpolation": config.interpolation,
    }

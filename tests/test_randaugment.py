"""RandAugment on whole batches: each operation against torchvision's, each image its own
operation, the identity at magnitude 0."""

from __future__ import annotations

import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from vitlab.randaugment import RANDAUGMENT_OPS, randaugment

from conftest import unit_images
from rounding import assert_within, sum_bound, ulps

OFFICIAL = dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))  # images in [-1, 1]


def formula_bound(images: torch.Tensor) -> float:
    """Two float32 formulas of one pixel operation, vitlab's on [-1, 1] mapped to [0, 1] and torchvision's on [0, 1]:
    each side at most four roundings of values up to 2 in size, and one sum over an image's pixels at most (the grey
    mean of contrast; the 3x3 blur of sharpness sums fewer)."""
    pixels = images[0].numel()
    return float(sum_bound(pixels, 2.0) + ulps(torch.tensor(2.0), torch.float32, 8))


def one_op(name: str, x: torch.Tensor, magnitude: int, sign: int = 1) -> torch.Tensor:
    ops = torch.full((1, x.shape[0]), RANDAUGMENT_OPS.index(name))
    return randaugment(x, ops, torch.full_like(ops, sign), magnitude, **OFFICIAL)


@pytest.mark.parametrize(
    "name, reference",
    [
        ("brightness", lambda y, f: TF.adjust_brightness(y, f)),
        ("color", lambda y, f: TF.adjust_saturation(y, f)),
        ("contrast", lambda y, f: TF.adjust_contrast(y, f)),
        ("sharpness", lambda y, f: TF.adjust_sharpness(y, f)),
    ],
)
@pytest.mark.parametrize("sign", [1, -1])
def test_colour_operations_are_torchvisions(name, reference, sign):
    # At magnitude 9 of 30 the factor is 1 +/- 0.9 * 9 / 30, as in torchvision's RandAugment.
    y, x = unit_images()
    got = (one_op(name, x, 9, sign) + 1) / 2
    assert_within(got, reference(y, 1 + sign * 0.27), formula_bound(y), name)


def test_posterize_solarize_autocontrast_equalize_are_torchvisions():
    y, x = unit_images()
    as_uint8 = (y * 255).round().to(torch.uint8)
    to_unit = lambda z: (z + 1) / 2  # noqa: E731
    bound = formula_bound(y)
    assert_within(
        to_unit(one_op("posterize", as_uint8.float() / 127.5 - 1, 15)),
        TF.posterize(as_uint8, 6).float() / 255,
        bound,
    )
    assert_within(to_unit(one_op("solarize", x, 12)), TF.solarize(y, 1 - 12 / 30), bound)
    assert_within(to_unit(one_op("autocontrast", x, 5)), TF.autocontrast(y), bound)
    assert_within(
        to_unit(one_op("equalize", as_uint8.float() / 127.5 - 1, 5)),
        TF.equalize(as_uint8).float() / 255,
        bound,
    )


@pytest.mark.parametrize("name", ["shear_x", "shear_y", "translate_x", "translate_y", "rotate"])
def test_geometric_operations_move_pixels_and_are_the_identity_at_magnitude_0(name):
    _, x = unit_images()
    torch.testing.assert_close(one_op(name, x, 0), x, rtol=0, atol=1e-5)
    moved = one_op(name, x, 20)
    assert (moved - x).abs().mean() > 0.05
    assert moved.min() >= -1 - 1e-6 and moved.max() <= 1 + 1e-6


def test_each_image_takes_its_own_operation_and_the_identity_changes_nothing():
    _, x = unit_images(batch=6)
    ops = torch.tensor(
        [[0, RANDAUGMENT_OPS.index("solarize"), 0, RANDAUGMENT_OPS.index("rotate"), 0, 0]]
    )
    out = randaugment(x, ops, torch.ones_like(ops), 15, **OFFICIAL)
    unchanged = ops[0] == 0
    assert torch.equal(out[unchanged], x[unchanged])
    assert all((out[i] - x[i]).abs().max() > 0.1 for i in range(6) if not unchanged[i])


@pytest.mark.parametrize("name", RANDAUGMENT_OPS)
def test_every_operation_is_the_same_under_another_normalisation(name):
    # Images of 8-bit levels normalised with ImageNet's mean and std (DINOv2's, DeiT's) take each
    # operation as the same images in [-1, 1] do: the operations run on [0, 1] either way.
    levels = torch.randint(0, 256, (4, 3, 12, 12), generator=torch.Generator().manual_seed(1))
    y = levels.float() / 255
    imagenet = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in imagenet.values())
    ops = torch.full((1, 4), RANDAUGMENT_OPS.index(name))
    signs = torch.tensor([[1, -1, 1, -1]])
    official = (randaugment(y * 2 - 1, ops, signs, 13, **OFFICIAL) + 1) / 2
    other = randaugment((y - mean) / std, ops, signs, 13, **imagenet) * std + mean
    # Each way to [0, 1] and back rounds values below 5 (1 / 0.225) a few times, which the blends
    # scale by at most 1.4: within 16 float32 units of 5. No level sits at a threshold (posterize,
    # solarize and equalize round or compare levels k / 255).
    assert_within(other, official, 16 * 2**-24 * 5, name)

"""RandAugment on whole batches: each operation against torchvision's, each image its own
operation, the identity at magnitude 0."""

from __future__ import annotations

import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from vitlab.randaugment import RANDAUGMENT_OPS, randaugment

from conftest import unit_images
from rounding import assert_within, sum_bound, ulps


def formula_bound(images: torch.Tensor) -> float:
    """Two float32 formulas of one pixel operation, vitlab's on [-1, 1] mapped to [0, 1] and torchvision's on [0, 1]:
    each side at most four roundings of values up to 2 in size, and one sum over an image's pixels at most (the grey
    mean of contrast; the 3x3 blur of sharpness sums fewer)."""
    pixels = images[0].numel()
    return float(sum_bound(pixels, 2.0) + ulps(torch.tensor(2.0), torch.float32, 8))


def one_op(name: str, x: torch.Tensor, magnitude: int, sign: int = 1) -> torch.Tensor:
    ops = torch.full((1, x.shape[0]), RANDAUGMENT_OPS.index(name))
    return randaugment(x, ops, torch.full_like(ops, sign), magnitude)


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
    out = randaugment(x, ops, torch.ones_like(ops), 15)
    unchanged = ops[0] == 0
    assert torch.equal(out[unchanged], x[unchanged])
    assert all((out[i] - x[i]).abs().max() > 0.1 for i in range(6) if not unchanged[i])

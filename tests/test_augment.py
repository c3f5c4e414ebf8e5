"""The batched augmentations: crop-and-resize against grid_sample, the crop boxes' sampling, pad-crop, the
normalisation, the seeded draws and bf16 batches."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vitlab.augment import Augmentation, crop_and_resize, pad_crop, resized_crop_boxes, to_float
from vitlab.data import step_generator


def test_crop_and_resize_full_box_is_identity_and_flip_mirrors():
    g = torch.Generator().manual_seed(0)
    images = torch.randn(3, 3, 8, 8, generator=g)
    boxes = torch.tensor([[0.0, 0.0, 8.0, 8.0]] * 3)
    out = crop_and_resize(images, boxes, 8, torch.zeros(3, dtype=torch.bool))
    torch.testing.assert_close(out, images, rtol=0, atol=1e-5)
    flipped = crop_and_resize(images, boxes, 8, torch.tensor([True, False, True]))
    torch.testing.assert_close(flipped[0], images[0].flip(-1), rtol=0, atol=1e-5)
    torch.testing.assert_close(flipped[1], images[1], rtol=0, atol=1e-5)
    torch.testing.assert_close(flipped[2], images[2].flip(-1), rtol=0, atol=1e-5)


def test_crop_and_resize_takes_the_box():
    # A box of whole pixels at the same size: exactly those pixels.
    images = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    boxes = torch.tensor([[2.0, 1.0, 4.0, 4.0], [0.0, 4.0, 4.0, 4.0]])
    out = crop_and_resize(images, boxes, 4, torch.zeros(2, dtype=torch.bool))
    torch.testing.assert_close(out[0], images[0, :, 2:6, 1:5], rtol=0, atol=1e-4)
    torch.testing.assert_close(out[1], images[1, :, 0:4, 4:8], rtol=0, atol=1e-4)


@pytest.mark.parametrize("shape", [(6, 3, 32, 32, 224), (5, 2, 20, 45, 17), (4, 1, 1, 9, 5), (3, 2, 9, 1, 6), (2, 3, 90, 60, 32)])
def test_crop_and_resize_samples_as_grid_sample(shape):
    # The reference: one grid_sample over an affine grid that maps the output onto the box, mirrored
    # where flipped. Covers up- and downsampling, non-square images and one-pixel-high or -wide ones.
    B, C, H, W, size = shape
    g = torch.Generator().manual_seed(sum(shape))
    images = torch.randn(B, C, H, W, generator=g)
    boxes = resized_crop_boxes(B, H, W, (0.05, 1.0), g)
    flip = torch.arange(B) % 2 == 0
    top, left, h, w = boxes.unbind(1)
    theta = torch.zeros(B, 2, 3)
    theta[:, 0, 0] = torch.where(flip, -w / W, w / W)
    theta[:, 0, 2] = (2 * left + w) / W - 1
    theta[:, 1, 1] = h / H
    theta[:, 1, 2] = (2 * top + h) / H - 1
    grid = F.affine_grid(theta, [B, C, size, size], align_corners=False)
    expected = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    torch.testing.assert_close(crop_and_resize(images, boxes, size, flip), expected, rtol=0, atol=1e-4)  # positions in fp32
    # bf16 images give bf16 output, within bf16's rounding of inputs, weights and the intermediate.
    out = crop_and_resize(images.bfloat16(), boxes, size, flip)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, rtol=0, atol=0.05)


def test_resized_crop_boxes_lie_inside_and_respect_the_scale():
    H, W, scale = 20, 30, (0.1, 0.5)
    boxes = resized_crop_boxes(2000, H, W, scale, torch.Generator().manual_seed(0))
    top, left, h, w = boxes.unbind(1)
    assert boxes.shape == (2000, 4)
    assert torch.equal(boxes, boxes.round())  # whole pixels
    assert (top >= 0).all() and (left >= 0).all() and (h >= 1).all() and (w >= 1).all()
    assert (top + h <= H).all() and (left + w <= W).all()
    area = h * w / (H * W)
    # Sides are rounded to whole pixels: allow that much around the range.
    assert (area >= scale[0] * 0.8).all() and (area <= scale[1] * 1.2).all()
    assert area.min() < 0.13 and area.max() > 0.45  # the whole range is used
    ratio = w / h
    assert (ratio >= 0.75 * 0.85).all() and (ratio <= 4 / 3 * 1.15).all()
    # Deterministic per generator seed.
    assert torch.equal(boxes, resized_crop_boxes(2000, H, W, scale, torch.Generator().manual_seed(0)))


def test_resized_crop_boxes_fall_back_to_the_centre_crop():
    # A 10x40 image cannot hold a full-area crop with ratio in [3/4, 4/3]: the centred 10x13 crop.
    boxes = resized_crop_boxes(5, 10, 40, (1.0, 1.0), torch.Generator().manual_seed(0))
    assert boxes.tolist() == [[0.0, 13.0, 10.0, 13.0]] * 5
    boxes = resized_crop_boxes(4, 12, 12, (1.0, 1.0), torch.Generator().manual_seed(0))
    assert (boxes == torch.tensor([0.0, 0.0, 12.0, 12.0])).all()


def test_pad_crop_at_offset_pad_is_identity():
    images = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    pad = 3
    centre = torch.full((4, 2), pad)
    assert torch.equal(pad_crop(images, pad, centre, torch.zeros(4, dtype=torch.bool)), images)
    assert torch.equal(pad_crop(images, pad, centre, torch.ones(4, dtype=torch.bool)), images.flip(-1))
    # Offset (0, 2*pad): shifted by pad pixels up-left / down-right into the reflected border.
    padded = torch.nn.functional.pad(images, (pad,) * 4, mode="reflect")
    offsets = torch.tensor([[0, 0], [2 * pad, 2 * pad], [0, 2 * pad], [1, 5]])
    out = pad_crop(images, pad, offsets, torch.zeros(4, dtype=torch.bool))
    for i, (r, c) in enumerate(offsets.tolist()):
        assert torch.equal(out[i], padded[i, :, r : r + 8, c : c + 8])


def test_to_float_normalises_to_minus_one_one():
    x = torch.tensor([0, 255, 127], dtype=torch.uint8).reshape(1, 1, 3, 1).expand(1, 1, 3, 3).contiguous()
    y = to_float(x)
    assert y.shape == (1, 3, 1, 3)
    for channel in range(3):  # (B, H=1, W=3, C=3) -> (B, C, H, W); pixel values along W
        torch.testing.assert_close(y[0, channel, 0], torch.tensor([-1.0, 1.0, 127 / 127.5 - 1]))


def test_random_params_are_those_of_the_seeded_generator():
    aug = Augmentation(8, "resized_crop", min_scale=0.5)
    a = aug.random_params(6, 8, 8, step_generator(1, 3))
    b = aug.random_params(6, 8, 8, step_generator(1, 3))
    c = aug.random_params(6, 8, 8, step_generator(1, 4))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["boxes"], c["boxes"])


@pytest.mark.parametrize("kind, size", [("resized_crop", 224), ("pad_crop", 32), ("none", 32)])
def test_bf16_augmentation_matches_fp32_to_bf16_precision(kind, size):
    # bf16 training takes its batches in bf16; they must be the fp32 batches, rounded, not shifted crops.
    images = torch.randint(0, 256, (6, 32, 32, 3), dtype=torch.uint8)
    fp32 = Augmentation(size, kind)
    params = fp32.random_params(6, 32, 32, torch.Generator().manual_seed(5))
    reference = fp32.apply(images, params)
    half = Augmentation(size, kind, dtype=torch.bfloat16).apply(images, params)
    assert half.dtype == torch.bfloat16
    assert (half.float() - reference).abs().max() < 1e-2


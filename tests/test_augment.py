"""The batched augmentations: crop-and-resize against grid_sample, the crop boxes' sampling,
pad-crop, the seeded draws, bf16 batches, the order of the steps, random erasing,
mixup and CutMix."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vitlab.augment import (
    Augmentation,
    crop_and_resize,
    erase,
    erasing_boxes,
    mix,
    mix_params,
    pad_crop,
    resized_crop_boxes,
)
from vitlab.randaugment import RANDAUGMENT_OPS
from vitlab.randomness import generator

from conftest import unit_images
from rounding import assert_within, sum_bound, ulps


def test_crop_and_resize_full_box_is_identity_and_flip_mirrors():
    g = torch.Generator().manual_seed(0)
    images = torch.randn(3, 3, 8, 8, generator=g)
    boxes = torch.tensor([[0.0, 0.0, 8.0, 8.0]] * 3)
    # Whole-pixel positions (binary fractions): weights of exactly 1 and 0, so the pixels are copied exactly.
    out = crop_and_resize(images, boxes, 8, torch.zeros(3, dtype=torch.bool))
    assert torch.equal(out, images)
    flipped = crop_and_resize(images, boxes, 8, torch.tensor([True, False, True]))
    assert torch.equal(flipped[0], images[0].flip(-1))
    assert torch.equal(flipped[1], images[1])
    assert torch.equal(flipped[2], images[2].flip(-1))


def test_crop_and_resize_takes_the_box():
    # A box of whole pixels at the same size: exactly those pixels.
    images = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    boxes = torch.tensor([[2.0, 1.0, 4.0, 4.0], [0.0, 4.0, 4.0, 4.0]])
    out = crop_and_resize(images, boxes, 4, torch.zeros(2, dtype=torch.bool))
    assert torch.equal(out[0], images[0, :, 2:6, 1:5])
    assert torch.equal(out[1], images[1, :, 0:4, 4:8])


@pytest.mark.parametrize(
    "shape",
    [(6, 3, 32, 32, 224), (5, 2, 20, 45, 17), (4, 1, 1, 9, 5), (3, 2, 9, 1, 6), (2, 3, 90, 60, 32)],
)
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
    expected = F.grid_sample(
        images, grid, mode="bilinear", padding_mode="border", align_corners=False
    )
    # Each side works out the sampling positions in float32 in its own way (a few roundings of positions up to the
    # image's side), which moves a value by at most that distance times the steepest step between neighbours, and
    # then sums at most two taps per direction (a W-term matmul of tents here).
    largest, steepest = (
        images.abs().max(),
        max(images.diff(dim=d).abs().max() if images.shape[d] > 1 else 0 for d in (2, 3)),
    )
    moved = float(ulps(torch.tensor(float(max(H, W))), torch.float32, 8)) * 2 * steepest
    bound = moved + sum_bound(W, largest) + sum_bound(4, largest)
    assert_within(crop_and_resize(images, boxes, size, flip), expected, bound, "fp32")
    # bf16 images give bf16 output, within bf16's rounding of the inputs, the weights of each stage, the intermediate
    # and the output: five roundings of values up to the largest pixel, on top of the float32 bound.
    out = crop_and_resize(images.bfloat16(), boxes, size, flip)
    assert out.dtype == torch.bfloat16
    assert_within(out, expected, bound + ulps(largest, torch.bfloat16, 5 / 2), "bf16")


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
    assert torch.equal(
        boxes, resized_crop_boxes(2000, H, W, scale, torch.Generator().manual_seed(0))
    )


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
    assert torch.equal(
        pad_crop(images, pad, centre, torch.ones(4, dtype=torch.bool)), images.flip(-1)
    )
    # Offset (0, 2*pad): shifted by pad pixels up-left / down-right into the reflected border.
    padded = torch.nn.functional.pad(images, (pad,) * 4, mode="reflect")
    offsets = torch.tensor([[0, 0], [2 * pad, 2 * pad], [0, 2 * pad], [1, 5]])
    out = pad_crop(images, pad, offsets, torch.zeros(4, dtype=torch.bool))
    for i, (r, c) in enumerate(offsets.tolist()):
        assert torch.equal(out[i], padded[i, :, r : r + 8, c : c + 8])


def test_random_params_are_those_of_the_seeded_generator():
    aug = Augmentation(8, "resized_crop", min_scale=0.5)
    a = aug.random_params(6, 8, 8, generator(1, "augmentation", 3))
    b = aug.random_params(6, 8, 8, generator(1, "augmentation", 3))
    c = aug.random_params(6, 8, 8, generator(1, "augmentation", 4))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["boxes"], c["boxes"])


@pytest.mark.parametrize("augment, size", [("resized_crop", 224), ("pad_crop", 32), ("none", 32)])
def test_bf16_augmentation_matches_fp32_to_bf16_precision(augment, size):
    # bf16 training takes its batches in bf16; they must be the fp32 batches, rounded, not shifted crops.
    images = torch.randint(0, 256, (6, 32, 32, 3), dtype=torch.uint8)
    fp32 = Augmentation(size, augment)
    params = fp32.random_params(6, 32, 32, torch.Generator().manual_seed(5))
    reference = fp32.apply(images, params)
    half = Augmentation(size, augment, dtype=torch.bfloat16).apply(images, params)
    assert half.dtype == torch.bfloat16
    # At most five bf16 roundings of pixels in [-1, 1] (input, two stages' weights, intermediate, output), against a
    # half-pixel shift that would move them by tenths.
    assert_within(half, reference, ulps(torch.tensor(1.0), torch.bfloat16, 5 / 2))


# ---------------------------------------------------------------------------------------------
# Random erasing, mixup and CutMix


def test_random_erasing_boxes_one_colour_in_a_share_of_the_images():
    _, x = unit_images(batch=400, size=16)
    none = erasing_boxes(400, 16, 16, 0.0, torch.Generator().manual_seed(1))
    torch.testing.assert_close(erase(x, none), x, rtol=0, atol=0)
    boxes = erasing_boxes(400, 16, 16, 0.25, torch.Generator().manual_seed(1))
    out = erase(x, boxes)
    changed = (out != x).flatten(1).any(1)
    assert torch.equal(changed, boxes[:, 0].bool()) and 0.15 < changed.float().mean() < 0.35
    for i in changed.nonzero().flatten()[:20].tolist():
        top, left, h, w = (int(v) for v in boxes[i, 1:5])
        # The area's range, rounded and clipped to the image
        assert 0.02 * 256 - 2 <= h * w <= 256 / 3 + 2 * 16
        region = out[i, :, top : top + h, left : left + w]
        torch.testing.assert_close(region, boxes[i, 5:8, None, None].expand_as(region))


def test_mixup_with_weight_one_is_the_identity_and_targets_are_one_hot():
    _, x = unit_images(batch=6)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    off = mix_params(
        3, 12, mixup=0.0, cutmix=0.0, switch_prob=0.5, generator=torch.Generator().manual_seed(0)
    )
    images, targets = mix(x, labels, off, 3)
    torch.testing.assert_close(images, x, rtol=0, atol=0)
    assert torch.equal(targets, F.one_hot(labels, 3).float())


def test_mixup_blends_each_pair_and_its_labels_by_one_weight():
    _, x = unit_images(batch=8)
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    params = mix_params(
        4, 12, mixup=0.8, cutmix=0.0, switch_prob=0.5, generator=torch.Generator().manual_seed(2)
    )
    images, targets = mix(x, labels, params, 4)
    for pair in range(4):
        lam, (a, b) = params[pair, 0].item(), (2 * pair, 2 * pair + 1)
        torch.testing.assert_close(images[a], lam * x[a] + (1 - lam) * x[b])
        torch.testing.assert_close(images[b], lam * x[b] + (1 - lam) * x[a])
        assert targets[a, labels[a]] == pytest.approx(lam) and targets[
            a, labels[b]
        ] == pytest.approx(1 - lam)
    torch.testing.assert_close(targets.sum(1), torch.ones(8))


def test_cutmix_pastes_the_partners_box_and_weighs_labels_by_its_area():
    _, x = unit_images(batch=8, size=16)
    labels = torch.arange(8) % 4
    params = mix_params(
        4, 16, mixup=0.0, cutmix=1.0, switch_prob=0.5, generator=torch.Generator().manual_seed(3)
    )
    assert params[:, 1].bool().all()  # only CutMix on
    images, targets = mix(x, labels, params, 4)
    for pair in range(4):
        top, left, h, w = (int(v) for v in params[pair, 2:6])
        a, b = 2 * pair, 2 * pair + 1
        inside = torch.zeros(16, 16, dtype=torch.bool)
        inside[top : top + h, left : left + w] = True
        assert torch.equal(images[a][:, inside], x[b][:, inside]) and torch.equal(
            images[a][:, ~inside], x[a][:, ~inside]
        )
        assert targets[a, labels[a]] == pytest.approx(1 - h * w / 256)


def test_mixing_a_slice_of_the_batch_equals_slicing_the_mixed_batch():
    # A process's share (or an accumulation step) of even length mixes the same pairs as the whole batch.
    _, x = unit_images(batch=8)
    labels = torch.arange(8) % 3
    params = mix_params(
        4, 12, mixup=0.5, cutmix=1.0, switch_prob=0.5, generator=torch.Generator().manual_seed(4)
    )
    whole, whole_targets = mix(x, labels, params, 3)
    part, part_targets = mix(x[4:8], labels[4:8], params[2:4], 3)
    torch.testing.assert_close(part, whole[4:8], rtol=0, atol=0)
    torch.testing.assert_close(part_targets, whole_targets[4:8], rtol=0, atol=0)


def test_the_new_options_off_draw_and_compute_what_the_plain_augmentation_does():
    images = torch.randint(
        0, 256, (6, 16, 16, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(5)
    )
    plain = Augmentation(16, "pad_crop")
    params = plain.random_params(6, 16, 16, generator(1, "augmentation", 2))
    assert set(params) == {"flip", "offsets"}
    with_off = Augmentation(
        16, "pad_crop", randaugment=None, random_erasing=0.0, mixup=0.0, cutmix=0.0
    )
    torch.testing.assert_close(
        with_off.apply(images, with_off.random_params(6, 16, 16, generator(1, "augmentation", 2))),
        plain.apply(images, params),
    )
    assert not with_off.mixes


def test_randaugment_runs_after_the_crop():
    # Autocontrast stretches each channel of the image it is given to [-1, 1]: of the crop, so every
    # channel of every output spans the whole range; had it run on the stored image, a crop of it
    # would not.
    images = torch.randint(0, 256, (8, 32, 32, 3), dtype=torch.uint8)
    aug = Augmentation(16, "resized_crop", min_scale=0.05, randaugment=(1, 9))
    params = aug.random_params(8, 32, 32, generator(3, "augmentation", 0))
    params["ra_ops"].fill_(RANDAUGMENT_OPS.index("autocontrast"))
    out = aug.apply(images, params)
    span = out.amax(dim=(2, 3)) - out.amin(dim=(2, 3))
    assert_within(span, torch.full_like(span, 2.0), ulps(torch.tensor(2.0), torch.float32, 8))


def test_augmentation_normalises_as_the_model_is_fed():
    from vitlab.config import ModelConfig, TrainConfig
    from vitlab.preprocessing import to_float

    model = ModelConfig(image_mean=(0.485, 0.456, 0.406), image_std=(0.229, 0.224, 0.225))
    config = TrainConfig(augment="none", hflip=False, img_size=8)
    aug = Augmentation.from_config(config, model)
    assert (aug.image_mean, aug.image_std) == (model.image_mean, model.image_std)
    images = torch.randint(0, 256, (2, 8, 8, 3), dtype=torch.uint8)
    params = aug.random_params(2, 8, 8, generator(0, "augmentation", 0))
    expected = to_float(images, model.image_mean, model.image_std)
    assert torch.equal(aug.apply(images, params), expected)
    # The official default: images in [-1, 1]
    assert Augmentation(8).image_mean == Augmentation(8).image_std == (0.5, 0.5, 0.5)


def test_mixing_multi_hot_rows_blends_them_by_the_images_weights():
    # A multi-label batch's labels are (B, classes) rows: each pair's rows mixed by its images' weight
    _, x = unit_images(batch=8, size=16)
    g = torch.Generator().manual_seed(6)
    rows = (torch.rand(8, 5, generator=g) < 0.5).float()
    params = mix_params(4, 16, mixup=0.8, cutmix=1.0, switch_prob=0.5, generator=g)
    images, targets = mix(x, rows, params, 5)
    for pair in range(4):
        lam, (a, b) = params[pair, 0].item(), (2 * pair, 2 * pair + 1)
        torch.testing.assert_close(targets[a], lam * rows[a] + (1 - lam) * rows[b])
        torch.testing.assert_close(targets[b], lam * rows[b] + (1 - lam) * rows[a])
    # One-hot rows mix exactly as their class indices do
    labels = torch.arange(8) % 5
    _, from_indices = mix(x, labels, params, 5)
    _, from_rows = mix(x, F.one_hot(labels, 5).float(), params, 5)
    torch.testing.assert_close(from_rows, from_indices, rtol=0, atol=0)

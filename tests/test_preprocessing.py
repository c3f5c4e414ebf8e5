"""How images are fed (preprocessing.py): the official default is the formula vitlab always computed,
bit for bit, on every path; each family's transform, read from its timm file, is timm's own
evaluation transform within the rounding of PIL's 8-bit resize; the part of an image the model
sees; what the exports say."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from vitlab.app.inference import seen_part
from vitlab.batches import StreamingImages
from vitlab.config import ModelConfig
from vitlab.data import ImageSet
from vitlab.formats.checkpoints import load_model
from vitlab.preprocessing import (
    crop_box,
    describe,
    evaluation_batch,
    from_unit,
    metadata,
    to_float,
    to_unit,
)

from parity import timm_model

OFFICIAL = ModelConfig(img_size=16)
IMAGENET = dict(image_mean=(0.485, 0.456, 0.406), image_std=(0.229, 0.224, 0.225))


def todays_normalise(x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """vitlab's formula before the families: x / 127.5 - 1."""
    return x.to(dtype).div_(127.5).sub_(1.0)


def todays_resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """vitlab's evaluation resize before the families: the whole image, bilinear, antialiased when
    it shrinks."""
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(
        x, size=(size, size), mode="bilinear", align_corners=False, antialias=x.shape[-1] > size
    )


def random_images(batch: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, height, width, 3), generator=g, dtype=torch.uint8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_official_normalisation_is_todays_formula_bit_for_bit(dtype):
    every = torch.arange(256, dtype=torch.uint8).view(1, 16, 16, 1).expand(2, 16, 16, 3)
    mean, std = OFFICIAL.image_mean, OFFICIAL.image_std
    x = to_float(every, mean, std, dtype=dtype)
    assert x.dtype == dtype and torch.equal(x, todays_normalise(every.permute(0, 3, 1, 2), dtype))
    # RandAugment's way to [0, 1] and back: (x + 1) / 2 and y * 2 - 1, as it always was
    unit = to_unit(x, mean, std)
    assert torch.equal(unit, x.float().add(1).div_(2))
    assert torch.equal(from_unit(unit.clone(), mean, std), unit.mul(2).sub(1))


def test_to_float_puts_channels_first():
    x = torch.tensor([0, 255, 127], dtype=torch.uint8).reshape(1, 1, 3, 1).expand(1, 1, 3, 3)
    y = to_float(x.contiguous(), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert y.shape == (1, 3, 1, 3)
    for channel in range(3):  # (B, H=1, W=3, C=3) -> (B, C, H, W); pixel values along W
        torch.testing.assert_close(y[0, channel, 0], torch.tensor([-1.0, 1.0, 127 / 127.5 - 1]))


@pytest.mark.parametrize("shape", [(16, 16), (12, 12), (40, 40), (24, 40), (10, 13)])
def test_official_evaluation_is_todays_transform_bit_for_bit(shape, tmp_path):
    images = random_images(3, *shape)
    expected = todays_resize(todays_normalise(images.permute(0, 3, 1, 2)), 16)
    # In memory (eval_batches, train's validation, predict, attention, the demo)
    assert torch.equal(evaluation_batch(images, OFFICIAL), expected)
    # Streamed from disk: uint8 resized (antialiased, torchvision), then normalised
    paths = [str(tmp_path / f"{i}.png") for i in range(3)]
    for image, path in zip(images, paths, strict=True):
        Image.fromarray(image.numpy()).save(path)
    streamed = StreamingImages(
        ImageSet(torch.zeros(3, dtype=torch.long), ["a"], paths=paths), OFFICIAL
    )
    uint8 = images.permute(0, 3, 1, 2)
    for i in range(3):
        todays = todays_normalise(TF.resize(uint8[i], [16, 16], antialias=True))
        assert torch.equal(streamed[(i, 0)][0], todays)


# Each family's timm architecture: its file's pretrained_cfg says how its images are fed
FAMILY_ARCHITECTURES = {
    "DINOv2": "vit_small_patch14_dinov2",
    "CLIP (OpenAI)": "vit_base_patch16_clip_quickgelu_224",
    "SigLIP": "vit_base_patch16_siglip_224",
    "DeiT": "deit_tiny_patch16_224",
    "DeiT III": "deit3_small_patch16_224",
    "MAE": "vit_base_patch16_224.mae",
}


def smooth_image(height: int, width: int, seed: int) -> np.ndarray:
    """A smooth photo-like image in 32..223 (bicubic rings stay inside 0..255)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(32, 224, (height // 16 + 2, width // 16 + 2, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC))


@pytest.mark.parametrize("family", list(FAMILY_ARCHITECTURES))
def test_each_familys_transform_is_timms(family, tmp_path, randomise):
    timm = pytest.importorskip("timm")
    from timm.data import create_transform, resolve_data_config

    arch = FAMILY_ARCHITECTURES[family]
    size = timm.models.get_pretrained_cfg(arch).input_size[-1]
    reference = timm_model(arch, size, randomise, depth=1)
    timm.models.save_for_hf(reference, tmp_path / "folder", safe_serialization=True)
    config = load_model(tmp_path / "folder")[0].config  # how vitlab read its images to be fed
    data_config = resolve_data_config({}, model=reference)
    transform = create_transform(**data_config)
    assert (config.image_mean, config.image_std) == (data_config["mean"], data_config["std"])
    assert (config.crop_pct, config.interpolation) == (
        data_config["crop_pct"],
        data_config["interpolation"],
    )
    rng = np.random.default_rng(0)
    worst = 0.0
    for image in (
        smooth_image(250, 333, 1),
        smooth_image(61, 40, 2),
        rng.integers(0, 256, (200, 300, 3), dtype=np.uint8),  # noise: bicubic rings clamped
        rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),
    ):
        expected = transform(Image.fromarray(image))
        got = evaluation_batch(torch.from_numpy(image.copy())[None], config)[0]
        # PIL resizes in two passes, each rounded to 8 bits (and clamped); torchvision's uint8
        # kernels do too, with other fixed-point weights: a level apart after the first pass,
        # carried by the second pass's weights (their absolute sum at most 1.25 for bicubic's
        # a = -0.5), and a level after the second. In the model's units: levels / (255 std).
        std = torch.tensor(config.image_std).view(3, 1, 1)
        in_levels = (got - expected).abs() * 255 * std
        assert bool((in_levels <= 1.25 + 1 + 1e-3).all()), family
        worst = max(worst, float(in_levels.max()))
    print(f"{family}: vitlab's transform within {worst:.2f} levels of timm's (PIL) on 4 images")


def test_the_part_of_an_image_the_model_sees():
    # The official squash sees all of it
    assert crop_box(200, 300, OFFICIAL) == (0.0, 0.0, 200.0, 300.0)
    # DeiT's: the shorter side to 256, the centre 224, of a 200 x 300 image: 256 x 384, the crop at
    # (16, 80), in the image's pixels 12.5, 62.5 and 175 on each side
    deit = ModelConfig(img_size=224, resize="shorter_side", crop_pct=0.875, **IMAGENET)
    assert crop_box(200, 300, deit) == (12.5, 62.5, 175.0, 175.0)
    # What attention and the demo draw the map over: that square, in whole pixels
    image = np.arange(200 * 300 * 3, dtype=np.int64).reshape(200, 300, 3)
    assert np.array_equal(seen_part(image, deit), image[12:187, 62:237])
    assert (
        seen_part(image, OFFICIAL) is not None and seen_part(image, OFFICIAL).shape == image.shape
    )


def test_describe_and_metadata_say_how_images_are_fed():
    deit = ModelConfig(img_size=224, resize="shorter_side", crop_pct=0.875, **IMAGENET)
    line = describe(deit)
    assert "shorter side to 256 px (bilinear), centre 224 px" in line
    assert "mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225)" in line
    fed = metadata(deit)
    assert fed["image_mean"] == "0.485,0.456,0.406" and fed["crop_pct"] == "0.875"
    assert describe(OFFICIAL).startswith("images squashed to 16 px (bilinear);")


def test_normalisation_with_other_numbers_is_the_formula():
    images = random_images(2, 8, 8)
    got = to_float(images, IMAGENET["image_mean"], IMAGENET["image_std"])
    y = images.permute(0, 3, 1, 2).double() / 255
    mean = torch.tensor(IMAGENET["image_mean"], dtype=torch.float64).view(3, 1, 1)
    std = torch.tensor(IMAGENET["image_std"], dtype=torch.float64).view(3, 1, 1)
    # Two float32 roundings of values up to 2.7 / 0.225 in size
    torch.testing.assert_close(got.double(), (y - mean) / std, rtol=0, atol=4 * 2**-24 * 12)
    back = to_unit(got, IMAGENET["image_mean"], IMAGENET["image_std"])
    torch.testing.assert_close(back.double(), y, rtol=0, atol=4 * 2**-24 * 12)

"""Datasets: image folders and their errors, decoding, and the held-out split. Everything on tiny
in-memory data or a few dozen PNG/JPEG files made in tmp_path."""

from __future__ import annotations

import io
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vitlab import data as vdata
from vitlab.batches import eval_batches
from vitlab.config import ModelConfig
from vitlab.data import (
    DataError,
    ImageSet,
    load_datasets,
    load_image_folder,
    load_labelled,
    read_image,
    split_validation,
    training_data,
)

CLASSES = ("cat", "dog", "eel")


def make_image_folder(root, classes=CLASSES, per_class=12, size=16, seed=0, ext="png"):
    """`root/<class>/<i>.<ext>` of random RGB images, seeded."""
    rng = np.random.default_rng(seed)
    for c in classes:
        folder = root / c
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
                folder / f"{i:03d}.{ext}"
            )
    return root


def random_imageset(n=20, size=8, classes=3, seed=0) -> ImageSet:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=g)
    return ImageSet(torch.arange(n) % classes, [f"c{i}" for i in range(classes)], images)


# ---------------------------------------------------------------------------------------------
# Image folders


def test_a_folders_digest_is_the_same_however_the_folder_is_named(tmp_path, monkeypatch):
    root = make_image_folder(tmp_path / "data", per_class=2, size=8)
    monkeypatch.chdir(root)
    spelled = {load_image_folder(p).digest() for p in (root, Path("."), Path("../data"))}
    moved = load_image_folder(root.rename(tmp_path / "moved")).digest()
    assert spelled == {moved}
    (tmp_path / "moved" / CLASSES[0] / "000.png").rename(tmp_path / "moved" / CLASSES[1] / "x.png")
    assert load_image_folder(tmp_path / "moved").digest() != moved


def test_class_folder_layout(tmp_path):
    root = make_image_folder(tmp_path / "flat", per_class=5, size=16)
    data = load_image_folder(root)
    assert data.class_names == list(CLASSES)
    assert (
        data.images is not None
        and data.images.shape == (15, 16, 16, 3)
        and data.images.dtype == torch.uint8
    )
    assert data.labels.tolist() == [0] * 5 + [1] * 5 + [2] * 5
    # The decoded pixels are the files' pixels.
    first = np.asarray(Image.open(root / "cat" / "000.png").convert("RGB"))
    assert np.array_equal(data.images[0].numpy(), first)

    train, val, test = load_datasets("imagefolder", str(root), 0.2, seed=1)
    assert test is None and len(train) == 12 and len(val) == 3
    assert train.class_names == val.class_names == list(CLASSES)


@pytest.mark.parametrize("held_out", ["val", "test"])
def test_train_and_val_layout(tmp_path, held_out):
    make_image_folder(tmp_path / "train", per_class=6, seed=0)
    make_image_folder(tmp_path / held_out, per_class=2, seed=1)
    train, val, test = load_datasets("imagefolder", str(tmp_path), 0.0, seed=0)
    assert len(train) == 18 and test is None
    # val_split 0: the held-out folder validates
    assert len(val) == 6 and val.class_names == list(CLASSES)
    train, val, test = load_datasets("imagefolder", str(tmp_path), 1 / 6, seed=0)
    assert (len(train), len(val), len(test)) == (15, 3, 6)


def test_val_folder_with_other_classes_is_refused(tmp_path):
    make_image_folder(tmp_path / "train", per_class=2)
    make_image_folder(tmp_path / "val", classes=("cat", "dog"), per_class=2)
    with pytest.raises(DataError, match="differ from the model.s"):
        load_datasets("imagefolder", str(tmp_path), 0.0, seed=0)


def test_val_split_zero_without_a_val_folder_is_refused(tmp_path):
    make_image_folder(tmp_path, per_class=2)
    with pytest.raises(DataError, match="no val/ or test/ folder"):
        load_datasets("imagefolder", str(tmp_path), 0.0, seed=0)


def test_grayscale_palette_and_rgba_images_become_rgb(tmp_path):
    rng = np.random.default_rng(3)
    folder = tmp_path / "modes" / "only"
    folder.mkdir(parents=True)
    gray = Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8), mode="L")
    palette = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).convert("P")
    rgba = Image.fromarray(rng.integers(0, 256, (16, 16, 4), dtype=np.uint8), mode="RGBA")
    rgb = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    for name, image in (("a_gray", gray), ("b_palette", palette), ("c_rgba", rgba), ("d_rgb", rgb)):
        image.save(folder / f"{name}.png")
    rgb.save(folder / "e_rgb.jpg", quality=95)
    for name, image in (("a_gray", gray), ("b_palette", palette), ("c_rgba", rgba)):
        array = read_image(str(folder / f"{name}.png"))
        assert array.shape == (16, 16, 3) and array.dtype == np.uint8
        assert np.array_equal(array, np.asarray(image.convert("RGB")))
    gray_rgb = read_image(str(folder / "a_gray.png"))
    assert np.array_equal(gray_rgb[..., 0], gray_rgb[..., 1]) and np.array_equal(
        gray_rgb[..., 0], np.asarray(gray)
    )
    data = load_image_folder(tmp_path / "modes")
    assert data.images.shape == (5, 16, 16, 3)


def png_claiming(path: Path, width: int, height: int) -> Path:
    """A 1 x 1 PNG whose header claims another size: opening it reads the size, decoding it would fail."""
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((1, 1, 3), dtype=np.uint8)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    header = b"IHDR" + struct.pack(">II", width, height) + bytes(data[24:29])
    data[12:33] = header + struct.pack(">I", zlib.crc32(header))
    path.write_bytes(bytes(data))
    return path


def test_read_image_refuses_a_huge_image_from_its_header(tmp_path):
    path = png_claiming(tmp_path / "large.png", 9_000, 5_000)
    with pytest.raises(
        DataError,
        match=r"large.png: 9000 x 5000 pixels, more than the 40,000,000 accepted; make it smaller",
    ):
        read_image(str(path), max_pixels=40_000_000)


def test_file_that_is_not_an_image_is_named(tmp_path):
    root = make_image_folder(tmp_path / "bad", per_class=3)
    bogus = root / "dog" / "zz_broken.png"
    bogus.write_bytes(np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8).tobytes())
    with pytest.raises(DataError) as info:
        load_image_folder(root)
    assert str(bogus) in str(info.value) and "not a readable image" in str(info.value)
    assert "\n" not in str(info.value)


def test_file_that_is_not_an_image_is_named_when_streaming(tmp_path, monkeypatch):
    monkeypatch.setattr(vdata, "IN_MEMORY_LIMIT_BYTES", 0)
    root = make_image_folder(tmp_path / "bad", per_class=3)
    bogus = root / "eel" / "zz_broken.jpg"
    bogus.write_bytes(b"this is not a jpeg at all" * 20)
    with pytest.raises(DataError) as info:
        load_image_folder(root)
    assert str(bogus) in str(info.value)


def test_empty_folders_are_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        load_image_folder(tmp_path / "empty")
    (tmp_path / "classes_only" / "a").mkdir(parents=True)
    (tmp_path / "classes_only" / "b").mkdir(parents=True)
    (tmp_path / "classes_only" / "a" / "notes.txt").write_text("not an image extension")
    with pytest.raises(DataError, match="no images"):
        load_image_folder(tmp_path / "classes_only")
    with pytest.raises(DataError, match="no such folder"):
        load_image_folder(tmp_path / "missing")


def test_an_image_past_the_decompression_bomb_limit_is_refused_in_one_line(tmp_path):
    bomb = png_claiming(tmp_path / "bomb.png", 15_000, 12_000)  # 180 megapixels
    with pytest.raises(DataError) as info:
        read_image(str(bomb))
    assert (
        str(info.value)
        == f"{bomb}: an image of more than 179 megapixels, refused (a decompression bomb, or a photo to downscale first)"
    )


@pytest.mark.parametrize("ext", ["jpg", "png"])
def test_a_large_photo_is_decoded_small_when_its_size_is_given(tmp_path, ext):
    # An 8000x6000 photo for a 224 px model: JPEG decodes at 1/8 scale, other formats are box-filtered after decoding,
    # each to no less than twice the model's side; without a size the image is whole.
    path = tmp_path / f"photo.{ext}"
    gradient = np.linspace(0, 255, 8000, dtype=np.uint8)
    Image.fromarray(np.stack([np.broadcast_to(gradient, (6000, 8000))] * 3, axis=-1)).save(path)
    small = read_image(str(path), size=224)
    assert min(small.shape[:2]) >= 448 and max(small.shape[:2]) <= 1600, small.shape
    assert read_image(str(path)).shape == (6000, 8000, 3)
    assert read_image(str(path), size=4000).shape == (6000, 8000, 3)  # already under twice the side


def test_a_truncated_jpeg_in_a_streamed_folder_is_named_before_training(tmp_path, monkeypatch):
    # Image.verify passes a JPEG cut short; the pre-check decodes it, so the file is named before step 1.
    monkeypatch.setattr(vdata, "IN_MEMORY_LIMIT_BYTES", 0)
    root = make_image_folder(tmp_path / "cut", per_class=3, ext="jpg")
    truncated = root / "dog" / "zz_cut.jpg"
    whole = tmp_path / "whole.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(
        whole, quality=95
    )
    truncated.write_bytes(whole.read_bytes()[:1500])
    with pytest.raises(DataError) as info:
        load_image_folder(root)
    assert str(info.value).startswith(f"{truncated}: not a readable image")


@pytest.mark.parametrize("workers", [0, 2])
def test_an_image_that_goes_bad_mid_run_is_named_in_one_line(tmp_path, monkeypatch, workers):
    monkeypatch.setattr(vdata, "IN_MEMORY_LIMIT_BYTES", 0)
    root = make_image_folder(tmp_path / "later", per_class=2)
    data = load_image_folder(root)
    (root / "cat" / "000.png").write_bytes(b"overwritten since the run began")
    with pytest.raises(DataError) as info:
        list(
            eval_batches(
                data, ModelConfig(img_size=16), 8, torch.device("cpu"), num_workers=workers
            )
        )
    assert str(info.value).startswith(
        f"{root / 'cat' / '000.png'}: not a readable image"
    ) and "\n" not in str(info.value)


def test_empty_class_folders_are_named_and_one_class_does_not_train(tmp_path):
    root = make_image_folder(tmp_path / "gap", per_class=2)
    (root / "yak").mkdir()
    with pytest.raises(DataError, match=r"class folder without images: yak \(looked for"):
        load_image_folder(root)
    only = tmp_path / "only"
    make_image_folder(only, classes=("cat",), per_class=4)
    # A folder to evaluate on may hold one class ...
    assert load_image_folder(only).class_names == ["cat"]
    with pytest.raises(
        DataError, match="one class \\(cat\\); a classifier needs at least 2 classes to train on"
    ):
        load_datasets("imagefolder", str(only), 0.25, 0)  # ... a training set may not


def test_mixed_sizes_stream(tmp_path):
    root = make_image_folder(tmp_path / "mixed", per_class=2, size=16)
    Image.fromarray(np.zeros((20, 12, 3), dtype=np.uint8)).save(root / "cat" / "zz_other_size.png")
    data = load_image_folder(root)
    assert data.images is None and len(data.paths) == 7
    batches = list(
        eval_batches(data, ModelConfig(img_size=16), 4, torch.device("cpu"), num_workers=0)
    )
    assert [tuple(x.shape) for x, _ in batches] == [(4, 3, 16, 16), (3, 3, 16, 16)]


# ---------------------------------------------------------------------------------------------
# Held-out validation


def test_split_validation_is_deterministic_disjoint_and_complete():
    data = ImageSet(
        torch.arange(50),
        ["x"],
        torch.arange(50).view(50, 1, 1, 1).expand(50, 1, 1, 3).to(torch.uint8),
    )
    train, val = split_validation(data, 0.2, seed=4)
    assert len(val) == 10 and len(train) == 40
    t, v = set(train.labels.tolist()), set(val.labels.tolist())
    assert not (t & v) and t | v == set(range(50))
    # Images move with their labels
    assert torch.equal(train.images[:, 0, 0, 0].long(), train.labels)
    train2, val2 = split_validation(data, 0.2, seed=4)
    assert torch.equal(val.labels, val2.labels) and torch.equal(train.labels, train2.labels)
    _, val3 = split_validation(data, 0.2, seed=5)
    assert not torch.equal(val.labels, val3.labels)
    assert val.labels.tolist() == sorted(val.labels.tolist())  # kept in file order


def test_split_validation_refuses_an_empty_side():
    data = random_imageset(n=10)
    with pytest.raises(DataError, match="val_split"):
        split_validation(data, 0.01, seed=0)
    with pytest.raises(DataError, match="val_split"):
        split_validation(data, 0.99, seed=0)


def test_unknown_dataset_is_refused(tmp_path):
    with pytest.raises(DataError, match="unknown dataset"):
        load_datasets("mnist", str(tmp_path), 0.1, seed=0)


# ---------------------------------------------------------------------------------------------
# Labels CSVs as a run's data (--labels, --test_labels)


def labels_csvs(root, n_train=20, n_test=4):
    """root/train.csv and root/test.csv over random 8 px PNGs, rows `path,label;label`: image i has
    cat if i % 2 == 0, dog if i % 3 == 0 (none where neither)."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    rows = []
    for i in range(n_train + n_test):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(
            root / "images" / f"{i}.png"
        )
        classes = [c for c, k in (("cat", 2), ("dog", 3)) if i % k == 0]
        rows.append(f"images/{i}.png,{';'.join(classes)}\n")
    (root / "train.csv").write_text("".join(rows[:n_train]))
    (root / "test.csv").write_text("".join(rows[n_train:]))
    return root / "train.csv", root / "test.csv"


def test_labelled_data_carves_its_validation_from_the_training_csv_by_the_seed(tmp_path):
    train_csv, test_csv = labels_csvs(tmp_path)
    train, val, test = load_labelled(
        str(train_csv), str(test_csv), multi_label=True, val_split=0.25, seed=3
    )
    assert train.class_names == val.class_names == test.class_names == ["cat", "dog"]
    assert (len(train), len(val), len(test)) == (15, 5, 4)
    assert set(train.paths).isdisjoint(val.paths)
    assert sorted(train.paths + val.paths) == sorted(
        str(tmp_path / "images" / f"{i}.png") for i in range(20)
    )
    for data in (train, val, test):  # each image keeps its own multi-hot row
        for path, row in zip(data.paths, data.labels.tolist(), strict=True):
            i = int(path.rsplit("/", 1)[1].split(".")[0])
            assert row == [float(i % 2 == 0), float(i % 3 == 0)]
    # The same seed carves the same split, as for a folder; another seed another
    again = load_labelled(str(train_csv), "", multi_label=True, val_split=0.25, seed=3)
    assert again[1].paths == val.paths and again[2] is None
    other = load_labelled(str(train_csv), "", multi_label=True, val_split=0.25, seed=4)
    assert other[1].paths != val.paths
    # With val_split 0 the test CSV is the validation
    train0, val0, test0 = load_labelled(
        str(train_csv), str(test_csv), multi_label=True, val_split=0.0, seed=3
    )
    assert len(train0) == 20 and val0.paths == test.paths and test0 is None


def test_training_data_reads_a_runs_csvs(tmp_path):
    from vitlab.config import TrainConfig

    train_csv, test_csv = labels_csvs(tmp_path)
    config = TrainConfig.from_dict(
        dict(
            name="x",
            dataset="imagefolder",
            labels=str(train_csv),
            test_labels=str(test_csv),
            multi_label=True,
            val_split=0.25,
        )
    )
    train, val, test = training_data(config)
    assert train.labels.shape == (15, 2) and val.labels.dtype == torch.float32 and len(test) == 4


@pytest.mark.parametrize(
    "change, expected",
    [
        (dict(test="images/0.png,horse\n"), "labels ['horse'] are not among the 2 classes"),
        (dict(train_name="missing.csv"), "missing.csv: no such labels file"),
        (dict(val_split=0.0, test=None), "--val_split 0 validates on the test images"),
        (dict(multi_label=False), "has not one label; --multi_label takes several"),
    ],
)
def test_bad_labelled_data_is_one_line(tmp_path, change, expected):
    train_csv, test_csv = labels_csvs(tmp_path)
    if "test" in change and change["test"] is not None:
        test_csv.write_text(change["test"])
    with pytest.raises(DataError, match=re.escape(expected)):
        load_labelled(
            str(tmp_path / change.get("train_name", "train.csv")),
            "" if change.get("test", "") is None else str(test_csv),
            multi_label=change.get("multi_label", True),
            val_split=change.get("val_split", 0.25),
            seed=0,
        )

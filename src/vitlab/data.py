"""Datasets: CIFAR (downloaded by torchvision) and folders of images, read into an `ImageSet`.

Small datasets (CIFAR, folders of same-sized images) are decoded once into one uint8 tensor, which
`batches.py` keeps on the training device and augments per batch (the cifar10-airbench way).
Larger folders, or folders of mixed sizes, keep their paths and stream from disk. Every image is
checked readable before a run starts, so a bad file is named at once, not mid-run.
"""

from __future__ import annotations

import hashlib
import json
import os
import urllib.error
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import randomness
from .config import DATASETS, TrainConfig
from .errors import DataError

IMAGE_EXTENSIONS = (
    ".jpg",
    ".jpeg",
    ".png",
    ".webp",
    ".bmp",
    ".gif",
    ".tif",
    ".tiff",
    ".ppm",
    ".pgm",
)
IN_MEMORY_LIMIT_BYTES = 4 << 30  # a decoded dataset above this streams from disk instead
# PIL's decompression-bomb limit (2 x Image.MAX_IMAGE_PIXELS): larger images are refused
MAX_PIXELS = 2 * 89_478_485


@dataclass
class ImageSet:
    """Images and labels. `images` is a uint8 (N, H, W, 3) tensor, or None with `paths` set for
    streaming; a folder's `paths` are kept either way (CIFAR's images have none)."""

    labels: torch.Tensor  # (N,) int64 class indices, or a multi-label set's (N, classes) float 0/1
    class_names: list[str]
    images: torch.Tensor | None = None
    paths: list[str] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor) -> ImageSet:
        images = self.images[index] if self.images is not None else None
        paths = [self.paths[i] for i in index.tolist()] if self.paths is not None else None
        return ImageSet(self.labels[index], self.class_names, images, paths)

    def digest(self) -> str:
        """SHA-256 of the class names, the labels and the files' names relative to their common
        folder: what a resumed run checks its training images against (the folder may move; an
        image relabelled, added or removed changes it)."""
        names = []
        if self.paths:
            # Absolute and normalised, so that `data`, `./data` and `/home/me/data` name alike
            absolute = [os.path.abspath(p) for p in self.paths]
            root = os.path.commonpath([os.path.dirname(p) for p in absolute])
            names = [p[len(root) :] for p in absolute]
        listed = json.dumps([self.class_names, self.labels.tolist(), names])
        return hashlib.sha256(listed.encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# Reading datasets

_CIFAR = {"cifar10": "CIFAR10", "cifar100": "CIFAR100"}


def load_cifar(name: str, root: str | os.PathLike, train: bool) -> ImageSet:
    import torchvision

    cls = getattr(torchvision.datasets, _CIFAR[name])
    try:
        dataset = cls(root=str(root), train=train, download=True)
    except (urllib.error.URLError, OSError) as e:
        raise DataError(
            f"could not download {name} ({getattr(e, 'reason', e)}); download {cls.url} by hand "
            f"and put it in {root}/"
        ) from None
    except RuntimeError as e:
        raise DataError(
            f"{name} in {root}: {e}; delete the damaged files and run again to download afresh"
        ) from None
    return ImageSet(
        torch.as_tensor(np.asarray(dataset.targets), dtype=torch.int64),
        list(dataset.classes),
        torch.from_numpy(dataset.data),
    )


def cifar_on_disk(name: str, root: str | os.PathLike) -> bool:
    """Whether CIFAR `name` was downloaded into `root` (its folder is there; `load_cifar` then
    checks its files)."""
    import torchvision

    return (Path(root) / getattr(torchvision.datasets, _CIFAR[name]).base_folder).is_dir()


def _list_folder(root: Path) -> tuple[list[str], list[int], list[str]]:
    # Not torchvision's find_classes/make_dataset: they count hidden folders (.ipynb_checkpoints, .git)
    # as classes, and raise FileNotFoundError where vitlab's DataError belongs.
    if not root.is_dir():
        raise DataError(f"{root}: no such folder")
    class_names = sorted(
        d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")
    )
    if not class_names:
        raise DataError(f"{root}: no class folders (expected {root}/<class>/<image>)")
    paths, labels, empty = [], [], []
    for label, name in enumerate(class_names):
        found = [
            os.path.join(d, f)
            for d, _, files in sorted(os.walk(root / name))
            for f in sorted(files)
            if f.lower().endswith(IMAGE_EXTENSIONS)
        ]
        paths += found
        labels += [label] * len(found)
        if not found:
            empty.append(name)
    looked_for = f"looked for {', '.join(IMAGE_EXTENSIONS)}"
    if not paths:
        raise DataError(f"{root}: no images in its class folders ({looked_for})")
    if empty:
        raise DataError(
            f"{root}: class folder{'s' if len(empty) > 1 else ''} without images: "
            f"{', '.join(empty[:5])} ({looked_for}); remove or fill them"
        )
    return paths, labels, class_names


def _open_image(path: str, action):
    """`action(image)` on the opened image; any failure to decode (unknown format, truncated,
    corrupt, over PIL's decompression-bomb limit of MAX_PIXELS) is a one-line DataError naming the
    file."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            # Up to MAX_PIXELS: decoded, drafted where it can be
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                return action(image)
    except DataError:
        raise
    except Image.DecompressionBombError:
        raise DataError(
            f"{path}: an image of more than {MAX_PIXELS / 1e6:.0f} megapixels, refused (a "
            "decompression bomb, or a photo to downscale first)"
        ) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as e:
        raise DataError(f"{path}: not a readable image ({e})") from None


def read_image(path: str, size: int | None = None, max_pixels: int | None = None) -> np.ndarray:
    """An image file as uint8 (H, W, 3) RGB: grayscale, palette and alpha converted; unreadable, or
    larger than `max_pixels` (checked from its header, before decoding) -> DataError. With `size`
    (the side it will be resized to), a large image is decoded smaller, to about twice that side at
    least: JPEG by its own reduced-scale decoding, others by an integer box filter, so that a
    64-megapixel photo costs tens of megabytes instead of gigabytes."""

    def decode(image) -> np.ndarray:
        width, height = image.size
        if max_pixels is not None and width * height > max_pixels:
            raise DataError(
                f"{path}: {width} x {height} pixels, more than the {max_pixels:,} accepted; make "
                "it smaller"
            )
        if size is not None:
            # JPEG: decode at 1/2, 1/4 or 1/8 scale, never below 2 x size
            image.draft("RGB", (2 * size, 2 * size))
        image = image.convert("RGB")
        factor = min(image.size) // (2 * size) if size is not None else 1
        return np.asarray(image.reduce(factor) if factor > 1 else image)

    return _open_image(path, decode)


def load_image_folder(root: str | os.PathLike, class_names: list[str] | None = None) -> ImageSet:
    """`<root>/<class>/<image>`: decoded into memory when every image has one size and they fit,
    else streamed."""
    root = Path(root)
    paths, labels, found = _list_folder(root)
    if class_names is not None and found != class_names:
        missing, extra = (
            sorted(set(class_names) - set(found)),
            sorted(set(found) - set(class_names)),
        )
        detail = (
            f"missing {missing[:5]}, unknown {extra[:5]}"
            if missing or extra
            else "same names in another order"
        )
        raise DataError(
            f"{root}: its class folders differ from the model's {len(class_names)} classes "
            f"({detail})"
        )
    return _read_images(paths, torch.tensor(labels), found)


def _read_images(paths: list[str], labels: torch.Tensor, class_names: list[str]) -> ImageSet:
    """Images decoded into memory when they all have one size and fit, else checked readable and
    kept as paths to stream."""
    first = read_image(paths[0])
    if first.nbytes * len(paths) <= IN_MEMORY_LIMIT_BYTES:
        images = np.empty((len(paths), *first.shape), dtype=np.uint8)
        for i, path in enumerate(paths):
            image = read_image(path)
            if image.shape != first.shape:
                break  # mixed sizes: stream with per-image transforms instead
            images[i] = image
        else:
            return ImageSet(labels, class_names, torch.from_numpy(images), paths)
    for path in paths:  # streaming: fail now, by name, rather than mid-run in a worker
        _check_readable(path)
    return ImageSet(labels, class_names, paths=paths)


def load_image_list(
    csv_path: str | os.PathLike, *, multi_label: bool, class_names: list[str] | None = None
) -> ImageSet:
    """The images a CSV names, paths relative to its folder, with their classes: rows `path,label`
    or `path,label;label;...`, or a header `path,<class>,<class>,...` over rows of 0s and 1s. One
    class an image, or with `multi_label` any number as a multi-hot (N, classes) float tensor.
    `class_names`: the classes a model was trained on, else those the file names, sorted."""
    rows, header = _read_csv(Path(csv_path))
    if header:  # multi-hot columns
        names = header[1:]
        sets = [
            [n for n, v in zip(names, row[1:], strict=True) if v.strip() == "1"] for row in rows
        ]
    else:
        names = sorted({c for row in rows for c in row[1].split(";") if c})
        sets = [[c for c in row[1].split(";") if c] for row in rows]
    class_names = class_names or names
    unknown = sorted({c for labels in sets for c in labels} - set(class_names))
    if unknown:
        raise DataError(
            f"{csv_path}: labels {unknown[:5]} are not among the {len(class_names)} classes"
        )
    index = {c: i for i, c in enumerate(class_names)}
    if multi_label:
        labels = torch.zeros(len(rows), len(class_names))
        for i, row_labels in enumerate(sets):
            labels[i, [index[c] for c in row_labels]] = 1.0
    else:
        several = next((r[0] for r, c in zip(rows, sets, strict=True) if len(c) != 1), None)
        if several is not None:
            raise DataError(f"{csv_path}: {several} has not one label; --multi_label takes several")
        labels = torch.tensor([index[c[0]] for c in sets])
    folder = Path(csv_path).parent
    return _read_images([str(folder / row[0]) for row in rows], labels, class_names)


def _read_csv(path: Path) -> tuple[list[list[str]], list[str] | None]:
    """(rows, header or None): a header is a first row `path,...` of more than two columns."""
    import csv

    if not path.is_file():
        raise DataError(f"{path}: no such labels file")
    try:
        with open(path, newline="") as f:
            rows = [r for r in csv.reader(f) if r and any(v.strip() for v in r)]
    except (UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: not a readable CSV ({e})") from None
    header = rows[0] if rows and rows[0][0].strip().lower() == "path" else None
    rows = rows[1:] if header else rows
    width = len(header) if header and len(header) > 2 else 2
    bad = next((i for i, r in enumerate(rows) if len(r) != width), None)
    if not rows or bad is not None:
        where = f"row {bad + 1 + bool(header)} has {len(rows[bad])} columns" if rows else "no rows"
        raise DataError(f"{path}: {where}; expected path,label;label;... or a header of classes")
    return rows, header if width > 2 else None


def _check_readable(path: str) -> None:
    """Decode the file (a JPEG at 1/8 scale, which still reads all of it), so that a truncated or
    corrupt one is named now rather than when a step first samples it."""

    def decode(image) -> None:
        image.draft("RGB", (1, 1))
        image.load()

    _open_image(path, decode)


def split_validation(data: ImageSet, fraction: float, seed: int) -> tuple[ImageSet, ImageSet]:
    """A held-out validation split drawn from the random seed (the official recipe holds out 2%)."""
    n_val = int(round(len(data) * fraction))
    if not 0 < n_val < len(data):
        raise DataError(
            f"val_split {fraction} of {len(data)} images leaves {n_val} for validation; choose a "
            "larger fraction or 0"
        )
    order = torch.randperm(len(data), generator=randomness.generator(seed, "validation_split"))
    return data.subset(order[n_val:].sort().values), data.subset(order[:n_val].sort().values)


def held_out_folder(root: Path) -> Path | None:
    """An image folder's own test split: its val/ or test/ subfolder, the first that exists."""
    return next((root / d for d in ("val", "test") if (root / d).is_dir()), None)


def load_datasets(
    dataset: str, data_dir: str, val_split: float, seed: int
) -> tuple[ImageSet, ImageSet, ImageSet | None]:
    """(train, validation, test). With val_split 0 the test split is the validation, as in the
    tutorial. An image folder trains on its train/ subfolder and tests on its val/ or test/ one
    where it has them, else trains on the whole."""
    if dataset not in DATASETS:
        raise DataError(f"unknown dataset {dataset!r}; choose {', '.join(DATASETS)}")
    if dataset in _CIFAR:
        train, test = load_cifar(dataset, data_dir, True), load_cifar(dataset, data_dir, False)
    elif (Path(data_dir) / "train").is_dir():
        train = load_image_folder(Path(data_dir) / "train")
        test_dir = held_out_folder(Path(data_dir))
        test = load_image_folder(test_dir, train.class_names) if test_dir else None
    else:
        train, test = load_image_folder(data_dir), None
    no_test = (
        f"{data_dir} has no val/ or test/ folder; use --val_split > 0 to hold out part of train"
    )
    return _held_out(train, test, data_dir, val_split, seed, no_test)


def load_labelled(
    labels: str, test_labels: str, *, multi_label: bool, val_split: float, seed: int
) -> tuple[ImageSet, ImageSet, ImageSet | None]:
    """(train, validation, test) from labels CSVs (`load_image_list`): the validation split carved
    from `labels`' images as from a folder's, the test images `test_labels`' (classes: those
    `labels` names), or with val_split 0 the test images are the validation, as in the tutorial."""
    train = load_image_list(labels, multi_label=multi_label)
    test = (
        load_image_list(test_labels, multi_label=multi_label, class_names=train.class_names)
        if test_labels
        else None
    )
    no_test = (
        "--val_split 0 validates on the test images: pass --test_labels CSV, or --val_split > 0"
    )
    return _held_out(train, test, labels, val_split, seed, no_test)


def training_data(config: TrainConfig) -> tuple[ImageSet, ImageSet, ImageSet | None]:
    """A run's (train, validation, test): from its --labels CSVs, or from its dataset."""
    if config.labels:
        return load_labelled(
            config.labels,
            config.test_labels,
            multi_label=config.multi_label,
            val_split=config.val_split,
            seed=config.seed,
        )
    return load_datasets(config.dataset, config.data_dir, config.val_split, config.seed)


def _held_out(
    train: ImageSet, test: ImageSet | None, where, val_split: float, seed: int, no_test: str
) -> tuple[ImageSet, ImageSet, ImageSet | None]:
    """(train, validation, test): the validation split carved from `train` by the seed, or with
    val_split 0 the test images (`no_test` says what to do where there are none)."""
    if len(train.class_names) < 2:
        raise DataError(
            f"{where}: one class ({train.class_names[0]}); a classifier needs at least 2 "
            "classes to train on"
        )
    if val_split == 0:
        if test is None:
            raise DataError(no_test)
        return train, test, None
    train, val = split_validation(train, val_split, seed)
    return train, val, test


def load_split(dataset: str, data_dir: str | os.PathLike, split: str) -> ImageSet:
    """One split as it is, nothing held out: CIFAR's train or test split, an image folder's train/
    (or the whole folder, if it has no train/) or its val/ or test/ subfolder."""
    if dataset not in DATASETS:
        raise DataError(f"unknown dataset {dataset!r}; choose {', '.join(DATASETS)}")
    if dataset in _CIFAR:
        return load_cifar(dataset, data_dir, train=split == "train")
    root = Path(data_dir)
    if split == "train":
        return load_image_folder(root / "train" if (root / "train").is_dir() else root)
    held_out = held_out_folder(root)
    if held_out is None:
        raise DataError(f"{root}: no val/ or test/ folder for the test split")
    return load_image_folder(held_out)


def image_names(data: ImageSet, dataset: str, split: str) -> list[str]:
    """Each image's path, or `<dataset>/<split>/<index>` for CIFAR's."""
    return data.paths or [f"{dataset}/{split}/{i}" for i in range(len(data))]


def load_test_split(dataset: str, data_dir: str | os.PathLike, class_names: list[str]) -> ImageSet:
    """The images to evaluate a trained model on: CIFAR's test split, or an image folder (its val/
    or test/ subfolder when it has one, else the whole folder), whose classes must be the
    model's."""
    if dataset not in DATASETS:
        raise DataError(f"unknown dataset {dataset!r}; choose {', '.join(DATASETS)}")
    if dataset in _CIFAR:
        data = load_cifar(dataset, data_dir, train=False)
        if data.class_names != class_names:
            raise DataError(
                f"{dataset}: classes {data.class_names} differ from the checkpoint's classes "
                f"{class_names}"
            )
        return data
    return load_image_folder(held_out_folder(Path(data_dir)) or Path(data_dir), class_names)

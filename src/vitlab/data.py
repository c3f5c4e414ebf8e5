"""Datasets and the input pipeline.

Small datasets (CIFAR, folders of same-sized images) are decoded once into one uint8 tensor that
lives on the training device and is augmented per batch with tensor operations (the
cifar10-airbench way): the pipeline costs a few milliseconds a batch. Larger folders stream
through a DataLoader with workers. Both draw every random choice from (seed, step), so a resumed
run sees exactly the batches and crops the uninterrupted run would have seen, and a batch split
over processes or accumulation steps is the same batch.
"""

from __future__ import annotations

import os
import urllib.error
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .augment import Augmentation, mix, resize, to_float
from .config import DATASETS
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
MAX_PIXELS = (
    2 * 89_478_485
)  # PIL's decompression-bomb limit (2 x Image.MAX_IMAGE_PIXELS): larger images are refused


@dataclass
class ImageSet:
    """Images and labels. `images` is a uint8 (N, H, W, 3) tensor, or None with `paths` set for
    streaming."""

    labels: torch.Tensor  # (N,) int64
    class_names: list[str]
    images: torch.Tensor | None = None
    paths: list[str] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor) -> ImageSet:
        images = self.images[index] if self.images is not None else None
        paths = [self.paths[i] for i in index.tolist()] if self.paths is not None else None
        return ImageSet(self.labels[index], self.class_names, images, paths)


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
            warnings.simplefilter(
                "ignore", Image.DecompressionBombWarning
            )  # up to MAX_PIXELS: decoded, drafted where it can be
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
            image.draft(
                "RGB", (2 * size, 2 * size)
            )  # JPEG: decode at 1/2, 1/4 or 1/8 scale, never below 2 x size
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
    first = read_image(paths[0])
    if first.nbytes * len(paths) <= IN_MEMORY_LIMIT_BYTES:
        images = np.empty((len(paths), *first.shape), dtype=np.uint8)
        for i, path in enumerate(paths):
            image = read_image(path)
            if image.shape != first.shape:
                break  # mixed sizes: stream with per-image transforms instead
            images[i] = image
        else:
            return ImageSet(torch.tensor(labels), found, torch.from_numpy(images))
    for path in paths:  # streaming: fail now, by name, rather than mid-run in a worker
        _check_readable(path)
    return ImageSet(torch.tensor(labels), found, paths=paths)


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
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
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
    if len(train.class_names) < 2:
        raise DataError(
            f"{data_dir}: one class ({train.class_names[0]}); a classifier needs at least 2 "
            "classes to train on"
        )
    if val_split == 0:
        if test is None:
            raise DataError(
                f"{data_dir} has no val/ or test/ folder; use --val_split > 0 to hold out part of "
                "train"
            )
        return train, test, None
    train, val = split_validation(train, val_split, seed)
    return train, val, test


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


# ---------------------------------------------------------------------------------------------
# Batches: which images, in which order, from (seed, step) alone.


def batch_indices(num_images: int, batch_size: int, step: int, seed: int) -> torch.Tensor:
    """Images of global batch `step`: epochs are seeded permutations, consumed batch after batch
    (a batch that crosses an epoch's end takes the rest from the next permutation)."""
    start = step * batch_size
    pieces, epoch = [], start // num_images
    offset = start - epoch * num_images
    while sum(len(p) for p in pieces) < batch_size:
        order = torch.randperm(
            num_images, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)
        )
        take = min(batch_size - sum(len(p) for p in pieces), num_images - offset)
        pieces.append(order[offset : offset + take])
        epoch, offset = epoch + 1, 0
    return torch.cat(pieces)


def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """A CPU generator for the random choices of global batch `step`; `stream` separates independent
    kinds of choice."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step + 1 + stream * 2**48)


# ---------------------------------------------------------------------------------------------
# Streaming: per-image decoding and transforms in DataLoader workers, seeded per image.


class StreamingImages(torch.utils.data.Dataset):
    """Items are (index, seed) pairs; each image is decoded and transformed with its own generator.
    Without augmentation (evaluation) the whole image is resized to img_size."""

    def __init__(self, data: ImageSet, img_size: int, augmentation: Augmentation | None):
        self.data, self.img_size, self.augmentation = data, img_size, augmentation

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        from torchvision.transforms.v2 import functional as TF

        index, seed = item
        # Evaluation resizes the whole image: a large one may be decoded smaller; training crops
        # need every pixel.
        image = torch.from_numpy(
            read_image(
                self.data.paths[index], self.img_size if self.augmentation is None else None
            ).copy()
        )
        x = image.permute(2, 0, 1)  # (3, H, W) uint8
        aug = self.augmentation
        if aug is None:
            x = TF.resize(x, [self.img_size, self.img_size], antialias=True)
        elif aug.kind == "resized_crop":  # antialiased, for large photos scaled down
            params = aug.random_params(
                1, x.shape[1], x.shape[2], torch.Generator().manual_seed(seed)
            )
            top, left, h, w = (int(v) for v in params["boxes"][0])
            x = TF.resized_crop(x, top, left, h, w, [self.img_size, self.img_size], antialias=True)
            x = x.flip(2) if params["flip"][0] else x
            return aug.finish(x.float().div_(127.5).sub_(1.0)[None], params)[0], self.data.labels[
                index
            ]
        else:
            params = aug.random_params(
                1, x.shape[1], x.shape[2], torch.Generator().manual_seed(seed)
            )
            return aug.apply(image[None], params)[0], self.data.labels[index]
        return x.float().div_(127.5).sub_(1.0), self.data.labels[index]


# ---------------------------------------------------------------------------------------------
# Batches for one process


class TrainBatches:
    """This process's share of global batch `step`, as normalised float images and labels on
    `device` (with mixup or CutMix, mixed images and their soft labels, (B, classes)).

    The global batch and every augmentation choice come from (seed, step); process `rank` of
    `world_size` takes its contiguous slice, so any split of the batch sees the same images."""

    def __init__(
        self,
        data: ImageSet,
        augmentation: Augmentation,
        batch_size: int,
        seed: int,
        device: torch.device,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 2,
    ):
        self.data, self.augmentation, self.batch_size, self.seed = (
            data,
            augmentation,
            batch_size,
            seed,
        )
        self.device, self.rank, self.world_size, self.num_workers = (
            device,
            rank,
            world_size,
            num_workers,
        )
        self.local = batch_size // world_size
        if data.images is not None:
            self.images = data.images.to(device)  # the whole dataset, uint8, on the training device
            self.labels = data.labels.to(device)

    def _share(self, step: int) -> tuple[torch.Tensor, slice]:
        index = batch_indices(len(self.data), self.batch_size, step, self.seed)
        return index, slice(self.rank * self.local, (self.rank + 1) * self.local)

    def get(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        index, mine = self._share(step)
        _, H, W, _ = self.images.shape
        params = self.augmentation.random_params(
            self.batch_size, H, W, step_generator(self.seed, step)
        )
        params = {k: v[mine] for k, v in params.items()}
        index = index[mine].to(self.device)
        return self.mixed(
            step, self.augmentation.apply(self.images[index], params), self.labels[index]
        )

    def mixed(
        self, step: int, images: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mixup or CutMix of this process's share, its pairs' choices drawn for the whole batch
        (`augment.mix`)."""
        if not self.augmentation.mixes:
            return images, labels
        params = self.augmentation.mix_params(
            self.batch_size, step_generator(self.seed, step, stream=1)
        )
        mine = slice(self.rank * self.local // 2, (self.rank + 1) * self.local // 2)
        return mix(images, labels, params[mine], len(self.data.class_names))

    def __call__(self, start_step: int, end_step: int):
        """Batches of steps [start_step, end_step): from memory, or streamed by DataLoader
        workers."""
        if self.data.images is not None:
            yield from (self.get(step) for step in range(start_step, end_step))
            return

        def items(step: int) -> list[tuple[int, int]]:
            index, mine = self._share(step)
            seeds = torch.randint(
                0, 2**62, (self.batch_size,), generator=step_generator(self.seed, step)
            )
            return list(zip(index[mine].tolist(), seeds[mine].tolist(), strict=False))

        loader = torch.utils.data.DataLoader(
            StreamingImages(self.data, self.augmentation.img_size, self.augmentation),
            batch_sampler=(items(step) for step in range(start_step, end_step)),
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
            generator=step_generator(
                self.seed, start_step, stream=2
            ),  # not torch's global generator: dropout's own
        )
        for step, (x, y) in enumerate(_named_failures(loader), start=start_step):
            yield self.mixed(
                step,
                x.to(self.device, self.augmentation.dtype, non_blocking=True),
                y.to(self.device, non_blocking=True),
            )


def eval_batches(
    data: ImageSet,
    img_size: int,
    batch_size: int,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 2,
):
    """(images, labels) batches of this process's shard (every world_size-th image), resized to
    img_size."""
    shard = torch.arange(rank, len(data), world_size)
    if data.images is not None:
        for start in range(0, len(shard), batch_size):
            index = shard[start : start + batch_size]
            yield (
                resize(to_float(data.images[index].to(device)), img_size),
                data.labels[index].to(device),
            )
        return
    loader = torch.utils.data.DataLoader(
        StreamingImages(data, img_size, None),
        batch_size=batch_size,
        num_workers=num_workers,
        sampler=[(i, 0) for i in shard.tolist()],
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(0),
    )
    for x, y in _named_failures(loader):
        yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def _named_failures(loader: torch.utils.data.DataLoader):
    """The loader's batches. A DataError raised in a worker (an image that became unreadable since
    the run began) comes back wrapped in a worker traceback: re-raised as its own one line, which
    names the file."""
    try:
        yield from loader
    except DataError as e:
        raise DataError(str(e).strip().splitlines()[-1].split("DataError: ", 1)[-1]) from None

"""Datasets and the input pipeline.

Small datasets (CIFAR, folders of same-sized images) are decoded once into one uint8 tensor that
lives on the training device and is augmented per batch with tensor operations (the
cifar10-airbench way): the pipeline costs a few milliseconds a batch. Larger folders stream
through a DataLoader with workers. Both draw every random choice from (seed, step), so a resumed
run sees exactly the batches and crops the uninterrupted run would have seen, and a batch split
over processes or accumulation steps is the same batch.
"""

from __future__ import annotations

import math
import os
import urllib.error
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")
IN_MEMORY_LIMIT_BYTES = 4 << 30  # a decoded dataset above this streams from disk instead


@dataclass
class ImageSet:
    """Images and labels. `images` is a uint8 (N, H, W, 3) tensor, or None with `paths` set for streaming."""

    labels: torch.Tensor  # (N,) int64
    class_names: list[str]
    images: torch.Tensor | None = None
    paths: list[str] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor) -> "ImageSet":
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
            f"could not download {name} ({getattr(e, 'reason', e)}); download {cls.url} by hand and put it in {root}/"
        ) from None
    except RuntimeError as e:
        raise DataError(f"{name} in {root}: {e}; delete the damaged files and run again to download afresh") from None
    return ImageSet(torch.as_tensor(np.asarray(dataset.targets), dtype=torch.int64), list(dataset.classes), torch.from_numpy(dataset.data))


def _list_folder(root: Path) -> tuple[list[str], list[int], list[str]]:
    if not root.is_dir():
        raise DataError(f"{root}: no such folder")
    class_names = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not class_names:
        raise DataError(f"{root}: no class folders (expected {root}/<class>/<image>)")
    paths, labels = [], []
    for label, name in enumerate(class_names):
        for dirpath, _, files in sorted(os.walk(root / name)):
            for f in sorted(files):
                if f.lower().endswith(IMAGE_EXTENSIONS):
                    paths.append(os.path.join(dirpath, f))
                    labels.append(label)
    if not paths:
        raise DataError(f"{root}: no images in its class folders (looked for {', '.join(IMAGE_EXTENSIONS)})")
    return paths, labels, class_names


def read_image(path: str) -> np.ndarray:
    """An image file as uint8 (H, W, 3) RGB: grayscale, palette and alpha converted; unreadable -> DataError."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DataError(f"{path}: not a readable image ({e})") from None


def load_image_folder(root: str | os.PathLike, class_names: list[str] | None = None) -> ImageSet:
    """`<root>/<class>/<image>`: decoded into memory when every image has one size and they fit, else streamed."""
    root = Path(root)
    paths, labels, found = _list_folder(root)
    if class_names is not None and found != class_names:
        missing, extra = sorted(set(class_names) - set(found)), sorted(set(found) - set(class_names))
        detail = f"missing {missing[:5]}, unknown {extra[:5]}" if missing or extra else "same names in another order"
        raise DataError(f"{root}: its class folders differ from the model's {len(class_names)} classes ({detail})")
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
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.verify()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DataError(f"{path}: not a readable image ({e})") from None


def split_validation(data: ImageSet, fraction: float, seed: int) -> tuple[ImageSet, ImageSet]:
    """A held-out validation split chosen from the seed (the official recipe holds out 2%)."""
    n_val = int(round(len(data) * fraction))
    if not 0 < n_val < len(data):
        raise DataError(f"val_split {fraction} of {len(data)} images leaves {n_val} for validation; choose a larger fraction or 0")
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    return data.subset(order[n_val:].sort().values), data.subset(order[:n_val].sort().values)


def load_datasets(dataset: str, data_dir: str, val_split: float, seed: int) -> tuple[ImageSet, ImageSet, ImageSet | None]:
    """(train, validation, test). With val_split 0 the test split is the validation, as in the seed."""
    if dataset in _CIFAR:
        train, test = load_cifar(dataset, data_dir, True), load_cifar(dataset, data_dir, False)
    elif dataset == "imagefolder":
        root = Path(data_dir)
        if (root / "train").is_dir():
            train = load_image_folder(root / "train")
            test_dir = next((root / d for d in ("val", "test") if (root / d).is_dir()), None)
            test = load_image_folder(test_dir, train.class_names) if test_dir else None
        else:
            train, test = load_image_folder(root), None
    else:
        raise DataError(f"unknown dataset {dataset!r}; choose cifar10, cifar100 or imagefolder")
    if val_split == 0:
        if test is None:
            raise DataError(f"{data_dir} has no val/ or test/ folder; use --val_split > 0 to hold out part of train")
        return train, test, None
    train, val = split_validation(train, val_split, seed)
    return train, val, test


# ---------------------------------------------------------------------------------------------
# Batches: which images, in which order, from (seed, step) alone.

def batch_indices(num_images: int, batch_size: int, step: int, seed: int) -> torch.Tensor:
    """Images of global batch `step`: epochs are seeded permutations, consumed batch after batch
    (a batch that crosses an epoch's end takes the rest from the next permutation)."""
    start = step * batch_size
    pieces, epoch = [], start // num_images
    offset = start - epoch * num_images
    while sum(len(p) for p in pieces) < batch_size:
        order = torch.randperm(num_images, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        take = min(batch_size - sum(len(p) for p in pieces), num_images - offset)
        pieces.append(order[offset : offset + take])
        epoch, offset = epoch + 1, 0
    return torch.cat(pieces)


def step_generator(seed: int, step: int, device: torch.device | str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + step + 1)


# ---------------------------------------------------------------------------------------------
# Augmentation of uint8 batches with tensor operations

def to_float(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) normalised with mean and std 0.5, as the seed."""
    return images.permute(0, 3, 1, 2).to(dtype).div_(127.5).sub_(1.0)


def resized_crop_boxes(batch: int, height: int, width: int, scale: tuple[float, float], generator: torch.Generator) -> torch.Tensor:
    """torchvision's RandomResizedCrop box sampling, for a whole batch: area fraction from `scale`,
    log-uniform aspect ratio in [3/4, 4/3], ten tries, then the centre crop. Returns (B, 4) = (top, left, h, w)."""
    tries = 10
    area = height * width * torch.empty(batch, tries).uniform_(*scale, generator=generator)
    log_ratio = torch.empty(batch, tries).uniform_(math.log(3 / 4), math.log(4 / 3), generator=generator)
    ratio = torch.exp(log_ratio)
    w = torch.sqrt(area * ratio).round()
    h = torch.sqrt(area / ratio).round()
    ok = (w > 0) & (h > 0) & (w <= width) & (h <= height)
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((batch,), -1))
    u = torch.rand(batch, 2, generator=generator)
    rows = torch.arange(batch)
    h_sel, w_sel = h[rows, first.clamp(min=0)], w[rows, first.clamp(min=0)]
    # Fallback when no try fits: the largest centred crop whose ratio is clamped to [3/4, 4/3].
    in_ratio = width / height
    if in_ratio < 3 / 4:
        fallback_h, fallback_w = round(width / (3 / 4)), width
    elif in_ratio > 4 / 3:
        fallback_h, fallback_w = height, round(height * 4 / 3)
    else:
        fallback_h, fallback_w = height, width
    found = first >= 0
    h_sel = torch.where(found, h_sel, torch.tensor(float(fallback_h)))
    w_sel = torch.where(found, w_sel, torch.tensor(float(fallback_w)))
    top = torch.where(found, torch.floor(u[:, 0] * (height - h_sel + 1)), torch.floor((height - h_sel) / 2))
    left = torch.where(found, torch.floor(u[:, 1] * (width - w_sel + 1)), torch.floor((width - w_sel) / 2))
    return torch.stack([top, left, h_sel, w_sel], dim=1)


def crop_and_resize(images: torch.Tensor, boxes: torch.Tensor, size: int, flip: torch.Tensor) -> torch.Tensor:
    """Bilinear crop-and-resize of float (B, C, H, W) to (B, C, size, size); boxes (B, 4) = (top, left, h, w); `flip` mirrors.

    grid_sample's sampling (bilinear, align_corners=False, border padding) done separably. The columns: one batched
    matmul with per-sample interpolation matrices (B, W, size), on the small input. The rows: each output row is
    the weighted sum of its two nearest input rows, an embedding_bag over the rows, which writes the large output
    once instead of spending H multiply-adds on each of its pixels as a second matmul would (2.4x faster in fp32
    on a CPU, 224 px from 32 px) or working out four taps per pixel as one grid_sample does."""
    B, C, H, W = images.shape
    # Sampling positions in fp32 even for bf16 images: bf16 cannot tell pixel 31.5 from 31.6.
    top, left, h, w = boxes.to(images.device, torch.float32).unbind(1)
    steps = (torch.arange(size, device=images.device, dtype=torch.float32) + 0.5) / size  # output pixel centres in [0, 1]

    def centres(start: torch.Tensor, length: torch.Tensor, in_size: int) -> torch.Tensor:
        # (B, size): each output pixel's centre mapped into the box, in input pixels, clamped to the border pixels
        return (start[:, None] + steps * length[:, None] - 0.5).clamp(0, in_size - 1)

    x = centres(left, w, W)
    x = torch.where(flip.to(images.device)[:, None], x.flip(1), x)
    # (B, W, size): an input column's weight in an output column is 1 - their distance (the tent), 0 beyond 1.
    cols = (x[:, None, :] - torch.arange(W, device=images.device, dtype=torch.float32)[:, None]).abs_().neg_().add_(1)
    resized = torch.bmm(images.reshape(B, C * H, W), cols.clamp_(min=0).to(images.dtype))  # (B, C*H, size)

    y = centres(top, h, H)
    above = y.floor().clamp_(max=max(H - 2, 0))  # the lower of the two rows, so that the upper one exists
    below = (above + 1).clamp_(max=H - 1)
    first_row = torch.arange(B * C, device=images.device).view(B, C, 1) * H  # of each image channel in `resized`
    index = torch.stack([first_row + above.long()[:, None], first_row + below.long()[:, None]], dim=-1)  # (B, C, size, 2)
    weight = torch.stack([above + 1 - y, y - above], dim=-1).to(images.dtype)[:, None].expand(B, C, size, 2)
    out = F.embedding_bag(index.view(-1, 2), resized.view(B * C * H, size), per_sample_weights=weight.reshape(-1, 2), mode="sum")
    return out.view(B, C, size, size)


def pad_crop(images: torch.Tensor, padding: int, offsets: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Random crop after reflection padding (the usual 32 px CIFAR augmentation); offsets (B, 2) in [0, 2*padding]."""
    B, C, H, W = images.shape
    padded = F.pad(images, (padding,) * 4, mode="reflect")
    rows = offsets[:, 0, None].to(images.device) + torch.arange(H, device=images.device)  # (B, H)
    cols = offsets[:, 1, None].to(images.device) + torch.arange(W, device=images.device)  # (B, W)
    cols = torch.where(flip.to(images.device)[:, None], cols.flip(1), cols)
    batch = torch.arange(B, device=images.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


@dataclass(frozen=True)
class Augmentation:
    img_size: int
    kind: str = "resized_crop"  # "resized_crop" (the seed's), "pad_crop" (32 px training), "none"
    min_scale: float = 0.05  # RandomResizedCrop's smallest area fraction (the seed's 0.05)
    hflip: bool = True  # the official fine-tuning flips; the seed did not
    pad: int = 4
    dtype: torch.dtype = torch.float32  # bf16 when training in bf16: the model would round to it anyway, and it halves the work

    def random_params(self, batch: int, height: int, width: int, generator: torch.Generator) -> dict:
        """Every random choice for a batch, drawn on the CPU so that any slice of it is reproducible."""
        flip = (torch.rand(batch, generator=generator) < 0.5) if self.hflip else torch.zeros(batch, dtype=torch.bool)
        if self.kind == "resized_crop":
            return {"flip": flip, "boxes": resized_crop_boxes(batch, height, width, (self.min_scale, 1.0), generator)}
        if self.kind == "pad_crop":
            return {"flip": flip, "offsets": torch.randint(0, 2 * self.pad + 1, (batch, 2), generator=generator)}
        return {"flip": flip}

    def apply(self, images: torch.Tensor, params: dict) -> torch.Tensor:
        """uint8 (B, H, W, 3) on any device -> normalised float (B, 3, img_size, img_size)."""
        x = to_float(images, self.dtype)
        if self.kind == "resized_crop":
            return crop_and_resize(x, params["boxes"], self.img_size, params["flip"])
        if self.kind == "pad_crop":
            x = pad_crop(x, self.pad, params["offsets"], params["flip"])
        else:
            x = torch.where(params["flip"].to(x.device)[:, None, None, None], x.flip(3), x)
        return resize(x, self.img_size)


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Evaluation transform: the whole image resized to size x size (the seed's Resize), bilinear."""
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=x.shape[-1] > size)


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
        image = torch.from_numpy(read_image(self.data.paths[index]).copy())  # (H, W, 3)
        x = image.permute(2, 0, 1)  # (3, H, W) uint8
        aug = self.augmentation
        if aug is None:
            x = TF.resize(x, [self.img_size, self.img_size], antialias=True)
        elif aug.kind == "resized_crop":  # antialiased, for large photos scaled down
            params = aug.random_params(1, x.shape[1], x.shape[2], torch.Generator().manual_seed(seed))
            top, left, h, w = (int(v) for v in params["boxes"][0])
            x = TF.resized_crop(x, top, left, h, w, [self.img_size, self.img_size], antialias=True)
            x = x.flip(2) if params["flip"][0] else x
        else:
            params = aug.random_params(1, x.shape[1], x.shape[2], torch.Generator().manual_seed(seed))
            return aug.apply(image[None], params)[0], self.data.labels[index]
        return x.float().div_(127.5).sub_(1.0), self.data.labels[index]


# ---------------------------------------------------------------------------------------------
# Batches for one process

class TrainBatches:
    """This process's share of global batch `step`, as normalised float images and labels on `device`.

    The global batch and every augmentation choice come from (seed, step); process `rank` of
    `world_size` takes its contiguous slice, so any split of the batch sees the same images."""

    def __init__(self, data: ImageSet, augmentation: Augmentation, batch_size: int, seed: int, device: torch.device,
                 rank: int = 0, world_size: int = 1, num_workers: int = 2):  # fmt: skip
        self.data, self.augmentation, self.batch_size, self.seed = data, augmentation, batch_size, seed
        self.device, self.rank, self.world_size, self.num_workers = device, rank, world_size, num_workers
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
        params = self.augmentation.random_params(self.batch_size, H, W, step_generator(self.seed, step))
        params = {k: v[mine] for k, v in params.items()}
        index = index[mine].to(self.device)
        return self.augmentation.apply(self.images[index], params), self.labels[index]

    def __call__(self, start_step: int, end_step: int):
        """Batches of steps [start_step, end_step): from memory, or streamed by DataLoader workers."""
        if self.data.images is not None:
            yield from (self.get(step) for step in range(start_step, end_step))
            return
        def items(step: int) -> list[tuple[int, int]]:
            index, mine = self._share(step)
            seeds = torch.randint(0, 2**62, (self.batch_size,), generator=step_generator(self.seed, step))
            return list(zip(index[mine].tolist(), seeds[mine].tolist()))

        loader = torch.utils.data.DataLoader(
            StreamingImages(self.data, self.augmentation.img_size, self.augmentation),
            batch_sampler=(items(step) for step in range(start_step, end_step)),
            num_workers=self.num_workers, pin_memory=self.device.type == "cuda",
        )  # fmt: skip
        for x, y in loader:
            yield x.to(self.device, self.augmentation.dtype, non_blocking=True), y.to(self.device, non_blocking=True)


def eval_batches(data: ImageSet, img_size: int, batch_size: int, device: torch.device, rank: int = 0, world_size: int = 1,
                 num_workers: int = 2):  # fmt: skip
    """(images, labels) batches of this process's shard (every world_size-th image), resized to img_size."""
    shard = torch.arange(rank, len(data), world_size)
    if data.images is not None:
        for start in range(0, len(shard), batch_size):
            index = shard[start : start + batch_size]
            yield resize(to_float(data.images[index].to(device)), img_size), data.labels[index].to(device)
        return
    loader = torch.utils.data.DataLoader(
        StreamingImages(data, img_size, None), batch_size=batch_size, num_workers=num_workers,
        sampler=[(i, 0) for i in shard.tolist()], pin_memory=device.type == "cuda",
    )  # fmt: skip
    for x, y in loader:
        yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)

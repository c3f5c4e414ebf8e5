"""The input pipeline: which images make global batch `step`, and how they reach the model.

A dataset held in memory (`ImageSet.images`) stays on the training device as one uint8 tensor and
is augmented per batch with tensor operations: a few milliseconds a batch. One that streams from
disk is decoded and cropped per image by DataLoader workers. Both draw every random choice from
(seed, step) (`randomness.py`), so a resumed run sees exactly the batches and crops the
uninterrupted run would have seen, and a batch split over processes or accumulation steps is the
same batch.
"""

from __future__ import annotations

import torch

from . import randomness
from .augment import Augmentation, mix
from .config import ModelConfig
from .data import ImageSet, read_image
from .errors import DataError
from .preprocessing import evaluation_batch, fit, normalise, resized_side


def batch_indices(num_images: int, batch_size: int, step: int, seed: int) -> torch.Tensor:
    """Images of global batch `step`: epochs are seeded permutations, consumed batch after batch
    (a batch that crosses an epoch's end takes the rest from the next permutation)."""
    start = step * batch_size
    pieces, epoch = [], start // num_images
    offset = start - epoch * num_images
    while sum(len(p) for p in pieces) < batch_size:
        order = torch.randperm(
            num_images, generator=randomness.generator(seed, "epoch_order", epoch)
        )
        take = min(batch_size - sum(len(p) for p in pieces), num_images - offset)
        pieces.append(order[offset : offset + take])
        epoch, offset = epoch + 1, 0
    return torch.cat(pieces)


# ---------------------------------------------------------------------------------------------
# Streaming: per-image decoding and transforms in DataLoader workers, seeded per image.


class StreamingImages(torch.utils.data.Dataset):
    """Items are (index, seed) pairs; each image is decoded and prepared by `preparation`: an
    Augmentation (training: each image augmented with its own generator, in the in-memory path's
    order, the crop and flip, then `Augmentation.finish`), or the ModelConfig of the model it
    feeds (evaluation: resized and cropped as it says, `preprocessing.fit`)."""

    def __init__(self, data: ImageSet, preparation: Augmentation | ModelConfig):
        self.data, self.preparation = data, preparation

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        index, seed = item
        label = self.data.labels[index]
        if isinstance(self.preparation, ModelConfig):
            config = self.preparation
            # Evaluation resizes the whole image, so a large one may be decoded smaller
            image = read_image(self.data.paths[index], resized_side(config))
            x = fit(torch.from_numpy(image.copy()).permute(2, 0, 1), config)  # (3, S, S) uint8
            return normalise(x, config.image_mean, config.image_std), label
        return self.augmented(index, seed), label

    def augmented(self, index: int, seed: int) -> torch.Tensor:
        """One training image, decoded whole (training crops need every pixel) and augmented."""
        from torchvision.transforms.v2 import functional as TF

        aug, size = self.preparation, [self.preparation.img_size] * 2
        image = read_image(self.data.paths[index])
        x = torch.from_numpy(image.copy()).permute(2, 0, 1)  # (3, H, W) uint8
        params = aug.random_params(1, x.shape[1], x.shape[2], torch.Generator().manual_seed(seed))
        if aug.augment != "resized_crop":
            return aug.apply(x.permute(1, 2, 0)[None], params)[0]
        # Anti-aliased, unlike the in-memory crop: a large photo may be scaled down many times.
        top, left, h, w = (int(v) for v in params["boxes"][0])
        x = TF.resized_crop(x, top, left, h, w, size, antialias=True)
        x = x.flip(2) if params["flip"][0] else x
        x = normalise(x[None], aug.image_mean, aug.image_std, dtype=aug.dtype)
        return aug.finish(x, params)[0]


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
        *,
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
        self.device, self.rank, self.num_workers = device, rank, num_workers
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
        generator = randomness.generator(self.seed, "augmentation", step)
        params = self.augmentation.random_params(self.batch_size, H, W, generator)
        params = {k: v[mine] for k, v in params.items()}
        index = index[mine].to(self.device)
        images = self.augmentation.apply(self.images[index], params)
        return self.mixed(step, images, self.labels[index])

    def mixed(
        self, step: int, images: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mixup or CutMix of this process's share, its pairs' choices drawn for the whole batch
        (`augment.mix`)."""
        if not self.augmentation.mixes:
            return images, labels
        generator = randomness.generator(self.seed, "mixing", step)
        params = self.augmentation.mix_params(self.batch_size, generator)
        mine = slice(self.rank * self.local // 2, (self.rank + 1) * self.local // 2)
        return mix(images, labels, params[mine], len(self.data.class_names))

    def streamed_items(self, step: int) -> list[tuple[int, int]]:
        """This process's (image index, image seed) pairs of global batch `step`."""
        index, mine = self._share(step)
        first = step * self.batch_size
        seeds = [
            randomness.stream_seed(self.seed, "image", first + i) for i in range(self.batch_size)
        ]
        return list(zip(index[mine].tolist(), seeds[mine], strict=True))

    def __call__(self, start_step: int, end_step: int):
        """Batches of steps [start_step, end_step): from memory, or streamed by DataLoader
        workers."""
        if self.data.images is not None:
            yield from (self.get(step) for step in range(start_step, end_step))
            return
        loader = torch.utils.data.DataLoader(
            StreamingImages(self.data, self.augmentation),
            batch_sampler=(self.streamed_items(step) for step in range(start_step, end_step)),
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
            # Its own generator, not torch's global one: that one is dropout's.
            generator=randomness.generator(self.seed, "loader"),
        )
        for step, (x, y) in enumerate(_named_failures(loader), start=start_step):
            x = x.to(self.device, self.augmentation.dtype, non_blocking=True)
            yield self.mixed(step, x, y.to(self.device, non_blocking=True))


def eval_batches(
    data: ImageSet,
    config: ModelConfig,
    batch_size: int,
    device: torch.device,
    *,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 2,
):
    """(images, labels) batches of this process's shard (every world_size-th image), fed as
    `config`, the model's, says (`preprocessing.py`)."""
    shard = torch.arange(rank, len(data), world_size)
    if data.images is not None:
        for start in range(0, len(shard), batch_size):
            index = shard[start : start + batch_size]
            images = evaluation_batch(data.images[index].to(device), config)
            yield images, data.labels[index].to(device)
        return
    loader = torch.utils.data.DataLoader(
        StreamingImages(data, config),
        batch_size=batch_size,
        num_workers=num_workers,
        sampler=[(i, 0) for i in shard.tolist()],
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(0),  # unused by evaluation; not the global one
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

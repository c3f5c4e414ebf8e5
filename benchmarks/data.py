"""The training input pipeline alone: vitlab's tensor augmentation against the tutorial's PIL pipeline.

Run from the repository root, in the project's environment:

    python benchmarks/data.py                                   # both sizes, 5 rounds, random CIFAR-sized images
    python benchmarks/data.py --quick                           # a few seconds per pipeline
    python benchmarks/data.py --data_dir /path/to/cifar10-train --workers 0 2 --json results/data.json
    THP_MEM_ALLOC_ENABLE=0 python benchmarks/data.py            # torch's CPU allocator on 4 KiB pages, as torch's default

What it measures: images/s of turning 32x32 uint8 images into training batches (batch 256) of normalised
float images (B, 3, S, S) and labels on the device. Random images by default (--num_images of them);
--data_dir decodes a real image folder with vitlab.data.load_image_folder and both pipelines use it.
  224 px  vitlab    batches.TrainBatches with Augmentation(224, "resized_crop", 0.05): the dataset is one
                    uint8 tensor on the device, each batch cropped and resized with tensor operations
          tutorial  Compose([RandomResizedCrop((224, 224), scale=(0.05, 1.0)), ToTensor(), Normalize([0.5]*3, [0.5]*3)])
                    on PIL images, as torchvision's CIFAR10 serves them, through a DataLoader (--workers)
  32 px   vitlab    Augmentation(32, "pad_crop"): 4 px reflection padding, random crop, flip
          tutorial  RandomCrop(32, padding=4) (zero padding), RandomHorizontalFlip, ToTensor, Normalize
and the 224 px crop on its own (--kernels): vitlab.augment.crop_and_resize, the same crop as two batched
matmuls and as one F.grid_sample (vitlab's two former formulations), and merely writing a fresh
(256, 3, 224, 224) float tensor, the floor for any pipeline that returns new memory. On a CPU that floor is set by page faults: torch frees and maps such large tensors
anew each time. vitlab, imported first, turns torch's transparent huge pages on (THP_MEM_ALLOC_ENABLE=1, unless
set otherwise) and, unless --no-keep_freed_memory, has malloc keep freed memory for reuse (vitlab.keep_freed_memory),
as the `vitlab` command does; every pipeline runs in that one process.

How: every pipeline is warmed up first, then --rounds rounds time each pipeline in turn, in an order
rotated every round (time.perf_counter, CUDA synchronised), for as many batches as last --min_seconds;
the median images/s is reported. A DataLoader with workers gets fresh workers for each measurement: they
are started and their prefetch filled and taken untimed before the clock starts, it is timed for at least
4x as many batches as it has in flight, and they are stopped when it ends, so no worker keeps decoding
while another pipeline is timed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

import vitlab  # before torch: vitlab turns torch's huge-page allocator on, as for `vitlab train`

# isort: split
import numpy as np
import torch

from vitlab import fastpaths
from vitlab.augment import Augmentation
from vitlab.batches import TrainBatches
from vitlab.data import ImageSet, load_image_folder
from vitlab.preprocessing import to_float

from crops import crop_kernels

BATCH = 256
MIN_SCALE = 0.05  # the tutorial's RandomResizedCrop scale=(0.05, 1.0)
PAD = 4  # the usual 32 px CIFAR crop padding
MEAN = STD = [0.5, 0.5, 0.5]  # the tutorial's Normalize: [0, 1] -> [-1, 1], as vitlab's to_float
# A worker DataLoader is timed for at least this many times the batches it has in flight.
IN_FLIGHT_MULTIPLE = 4


class Pipeline:
    """Something that makes batches: `next()` one; `start()` before and `stop()` after each measurement."""

    name: str
    in_flight = 0  # batches it makes ahead of being asked

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def next(self):
        raise NotImplementedError


class VitlabPipeline(Pipeline):
    """vitlab.batches.TrainBatches over the whole dataset held as one uint8 tensor on the device."""

    def __init__(
        self, data: ImageSet, size: int, device: torch.device, dtype: torch.dtype, kit: bool = False
    ):
        # fp32 batches for fp32 training; `vitlab train --precision bf16` takes its batches in bf16. With `kit`, also
        # the training kit's augmentations at DeiT's settings: RandAugment 2,9, random erasing 0.25, mixup 0.8 / CutMix 1.0.
        augment = "resized_crop" if size != 32 else "pad_crop"
        extra = dict(randaugment=(2, 9), random_erasing=0.25, mixup=0.8, cutmix=1.0) if kit else {}
        augmentation = Augmentation(
            size, augment, MIN_SCALE, hflip=True, pad=PAD, dtype=dtype, **extra
        )
        self.name = f"vitlab TrainBatches, {augment}{' + kit' if kit else ''}, {str(dtype).removeprefix('torch.')}"
        self.batches = TrainBatches(data, augmentation, batch_size=BATCH, seed=0, device=device)(
            0, 2**62
        )

    def next(self):
        return next(self.batches)


class PILImages(torch.utils.data.Dataset):
    """Items as torchvision's CIFAR10 serves them: a PIL image made from the uint8 array, then the transform."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[index])), int(self.labels[index])


class TutorialPipeline(Pipeline):
    """The tutorial's torchvision transforms on PIL images, through a DataLoader, moved to the device."""

    def __init__(self, data: ImageSet, size: int, device: torch.device, workers: int):
        from torchvision import transforms

        if size == 32:
            augment = [transforms.RandomCrop(32, padding=PAD), transforms.RandomHorizontalFlip()]
            self.name = f"torchvision PIL RandomCrop+flip, {workers} workers"
        else:
            augment = [transforms.RandomResizedCrop((size, size), scale=(MIN_SCALE, 1.0))]
            self.name = f"torchvision PIL RandomResizedCrop, {workers} workers"
        transform = transforms.Compose(
            [*augment, transforms.ToTensor(), transforms.Normalize(mean=MEAN, std=STD)]
        )
        dataset = PILImages(data.images.numpy(), data.labels.numpy(), transform)
        # Shuffled epochs back to back, drawn lazily without end: no epoch restarts inside the timings.
        sampler = torch.utils.data.RandomSampler(dataset, num_samples=2**62)
        self.loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=BATCH,
            sampler=sampler,
            num_workers=workers,
            drop_last=True,
            pin_memory=device.type == "cuda",
        )
        self.device, self.iterator = device, None
        self.in_flight = workers * self.loader.prefetch_factor if workers else 0

    def start(self) -> None:
        """Fresh workers with their prefetch filled and taken: from here on they work only while timed."""
        self.iterator = iter(self.loader)
        for _ in range(self.in_flight):
            self.next()

    def stop(self) -> None:
        """Workers shut down: they must not decode ahead while another pipeline is timed."""
        self.iterator = None

    def next(self):
        x, y = next(self.iterator)
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_for(pipeline, batches: int, device: torch.device) -> float:
    pipeline.start()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(batches):
        pipeline.next()
    synchronize(device)
    seconds = time.perf_counter() - start
    pipeline.stop()
    return seconds


def compare(
    pipelines: list, rounds: int, min_seconds: float, warmup: int, device: torch.device
) -> list[dict]:
    """Median images/s of each pipeline over rounds, timed in turn in an order rotated every round."""
    counts = []
    for p in pipelines:
        seconds_for(p, warmup, device)
        one = seconds_for(p, 1, device)
        counts.append(max(math.ceil(min_seconds / one), IN_FLIGHT_MULTIPLE * p.in_flight, 1))
    rates = [[] for _ in pipelines]
    for r in range(rounds):
        for i in [(r + k) % len(pipelines) for k in range(len(pipelines))]:
            rates[i].append(counts[i] * BATCH / seconds_for(pipelines[i], counts[i], device))
    return [
        {
            "pipeline": p.name,
            "batches_per_measurement": n,
            "images_per_second": statistics.median(v),
            "rounds": v,
        }
        for p, n, v in zip(pipelines, counts, rates, strict=False)
    ]


# ---------------------------------------------------------------------------------------------


def load_images(args: argparse.Namespace) -> tuple[ImageSet, str]:
    if args.data_dir:
        data = load_image_folder(args.data_dir)
        if data.images is None or tuple(data.images.shape[1:]) != (32, 32, 3):
            raise SystemExit(
                f"{args.data_dir}: expected a folder of 32x32 images that fits in memory"
            )
        return data, f"{len(data)} images from {args.data_dir}"
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.num_images, 32, 32, 3), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (args.num_images,), generator=g)
    return ImageSet(
        labels, [str(i) for i in range(10)], images
    ), f"{args.num_images} random 32x32 images"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    _what_to_time(p.add_argument)
    _how_to_time(p.add_argument)
    return p


def _what_to_time(add) -> None:
    add(
        "--sizes",
        type=int,
        nargs="+",
        choices=[224, 32],
        default=[224, 32],
        help="output sizes (default: both)",
    )
    add(
        "--workers",
        type=int,
        nargs="*",
        default=[0, 2],
        help="DataLoader workers of the tutorial's pipeline, one "
        "pipeline each; none given: vitlab's alone (default: 0 2)",
    )
    add(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="where batches must end up; auto: CUDA when present",
    )


def _how_to_time(add) -> None:
    on = argparse.BooleanOptionalAction
    add(
        "--threads",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help="torch.set_num_threads (default: all cores)",
    )
    add("--rounds", type=int, default=5, help="timed rounds; the median is reported (default 5)")
    add(
        "--min_seconds",
        type=float,
        default=2.0,
        help="each measurement lasts at least this long (default 2)",
    )
    add("--warmup", type=int, default=3, help="untimed batches per pipeline first (default 3)")
    add("--num_images", type=int, default=5000, help="random images to generate (default 5000)")
    add(
        "--data_dir",
        help="a folder of 32x32 images, <class>/<image> (e.g. a CIFAR-10 image folder) instead of "
        "random ones",
    )
    add("--kernels", action=on, default=True, help="also time the 224 px crop alone (default: on)")
    add(
        "--quick",
        action="store_true",
        help="3 rounds of about 0.3 s per pipeline, one warm-up batch",
    )
    add(
        "--kit",
        action=on,
        default=True,
        help="also time vitlab's pipeline with RandAugment 2,9, random erasing "
        "and mixup/CutMix (default: on)",
    )
    add(
        "--keep_freed_memory",
        action=on,
        default=True,
        help="malloc keeps freed memory for reuse, as under the "
        "`vitlab` command (vitlab.keep_freed_memory) (default: on)",
    )
    add(
        "--dtypes",
        nargs="+",
        choices=["fp32", "bf16"],
        help="vitlab's batch precisions (default: fp32, and bf16 "
        "where the hardware runs it natively)",
    )
    add("--json", type=Path, help="write every number to this JSON file")


def time_size(size: int, data: ImageSet, device: torch.device, args: argparse.Namespace) -> dict:
    """Every pipeline at one output size, printed, and vitlab's against the best of the tutorial's."""
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    ours = [
        VitlabPipeline(data, size, device, dtypes[d], kit)
        for d in args.dtypes
        for kit in ((False, True) if args.kit else (False,))
    ]
    pipelines = ours + [TutorialPipeline(data, size, device, w) for w in args.workers]
    rows = compare(pipelines, args.rounds, args.min_seconds, args.warmup, device)
    tutorial_rows = rows[len(ours) :]
    print(f"\n{size} px: images/s, median of {args.rounds} rounds")
    for row in rows:
        print(f"  {row['pipeline']:<48}{row['images_per_second']:>10.0f}")
    entry = {"pipelines": rows}
    if tutorial_rows:
        best = max(row["images_per_second"] for row in tutorial_rows)
        ratios = {row["pipeline"]: row["images_per_second"] / best for row in rows[: len(ours)]}
        entry["vitlab_vs_best_tutorial"] = ratios
        print(
            "  vitlab / best tutorial pipeline: "
            + ", ".join(
                f"{r:.1f}x ({name.removeprefix('vitlab TrainBatches, ')})"
                for name, r in ratios.items()
            )
        )
    return entry


def time_kernels(data: ImageSet, device: torch.device, args: argparse.Namespace) -> dict:
    x = to_float(data.images[:BATCH].to(device), MEAN, STD)
    kernels, difference = crop_kernels(x, MIN_SCALE)
    rows = compare(kernels, args.rounds, args.min_seconds, args.warmup, device)
    print(
        f"\n224 px crop of a float batch alone: images/s, median of {args.rounds} rounds (largest abs difference "
        f"from vitlab's crop: {difference:.1e})"
    )
    for row in rows:
        print(f"  {row['pipeline']:<48}{row['images_per_second']:>10.0f}")
    return {"rows": rows, "max_abs_difference": difference}


def main() -> None:
    args = parser().parse_args()
    kept = args.keep_freed_memory and vitlab.keep_freed_memory()
    if args.quick:
        args.rounds, args.min_seconds, args.warmup = 3, 0.3, 1
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    torch.set_num_threads(args.threads)
    data, source = load_images(args)
    thp = os.environ.get("THP_MEM_ALLOC_ENABLE", "0")
    native = fastpaths.native_bf16(device)
    print(
        f"{source}; batch {BATCH}; device {device}, {args.threads} threads, {platform.processor() or platform.machine()} "
        f"({fastpaths.instruction_set()}, native bf16: {'yes' if native else 'no'}), torch {torch.__version__}, "
        f"THP_MEM_ALLOC_ENABLE={thp}, freed memory kept for reuse: {kept}"
    )
    if args.dtypes is None:
        args.dtypes = ["fp32", "bf16"] if native else ["fp32"]
        if not native:
            print(
                "bf16 batches left out: this device only emulates bf16; --dtypes fp32 bf16 to time them anyway"
            )
    result = {
        "source": source,
        "device": str(device),
        "threads": args.threads,
        "torch": torch.__version__,
        "THP_MEM_ALLOC_ENABLE": thp,
        "freed_memory_kept": kept,
        "instruction_set": fastpaths.instruction_set(),
        "args": vars(args),
        "sizes": {str(size): time_size(size, data, device, args) for size in args.sizes},
    }
    if args.kernels:
        result["crop_kernels"] = time_kernels(data, device, args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()

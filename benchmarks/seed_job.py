"""The seed's job, end to end, beside the tutorial's own train.py: fine-tuning ViT-B/16 for 100 steps of 16
CIFAR-10 images at 224 px, then evaluating 10,000 test images.

Run from the repository root, in the project's environment:

    python benchmarks/seed_job.py DATA_DIR TUTORIAL_DIR --work WORK                  # the full job: ~40 minutes, 2-core CPU
    python benchmarks/seed_job.py DATA_DIR TUTORIAL_DIR --work WORK --num_steps 3 --test_images 200   # a dry run

DATA_DIR is a CIFAR-10 image folder, <class>/<image> (../shared/data/cifar10-train: its 50,000 training images as
JPEG); TUTORIAL_DIR a checkout of jeonsworld/ViT-pytorch, the tutorial's code, which is run where it lies and never
copied into vitlab; WORK a folder outside the repository for the data, the checkpoint, the shims and the runs.

1. The data: WORK/data/train and WORK/data/test, symbolic links into DATA_DIR. CIFAR-10's official test split is not
   given, so the last --test_images / 10 images of each class (by name) are the test split and the rest train
   (40,000 and 10,000 by default); --train_images takes fewer to train on (a dry run loads faster).
2. The checkpoint: WORK/ViT-B_16.npz, a random ViT-B/16 (seed 0, 21,843 classes as the ImageNet-21k file) in the
   official layout, written by vitlab.save_npz, since the released file cannot be downloaded everywhere. Both
   programs read it and zero its head; the accuracies then say nothing of the published ones, only that both
   programs evaluated the same images.
3. Three runs, each a fresh process, timed end to end (start-up, data, training, evaluation) with its peak resident
   memory (wait4's ru_maxrss: the largest process, data workers included):
   - vitlab, its defaults: `vitlab train --name seed --dataset imagefolder --data_dir WORK/data --pretrained_dir
     WORK/ViT-B_16.npz --num_steps 100 --eval_every 100 --val_split 0` (batch 16, precision auto), --val_split 0 so
     that it evaluates the test split, as the tutorial does;
   - vitlab, the same with --precision fp32, the tutorial's arithmetic;
   - the tutorial: `python WORK/tutorial_shims.py --name seed --dataset cifar10 --model_type ViT-B_16
     --pretrained_dir WORK/ViT-B_16.npz --train_batch_size 16 --num_steps 100 --eval_every 100 --output_dir
     WORK/runs/tutorial/output`, in WORK/runs/tutorial (its logs/ go there). Its repository's --train_batch_size
     default is 512; the seed's, the run behind the tutorial's headline, is 16.
   The shims (WORK/tutorial_shims.py, written by this script; SHIMS below) change nothing the tutorial computes: they
   stand in for Apex (imported, used only with --fp16 and --local_rank) and ml_collections (configs.py's ConfigDict,
   read by attribute), and give torchvision's CIFAR10 the image folder WORK/data/train or test instead of a
   download. train.py runs as written, on the CPU (`torch.device("cuda" if torch.cuda.is_available() else "cpu")`).
4. A table: wall time, peak memory and test accuracy of each run, and the tutorial's wall time over each vitlab
   run's. The processes inherit the environment: `ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2
   MKL_ENABLE_INSTRUCTIONS=AVX2` imitates an AVX2-only CPU for all three.

Targets (issue 28), on a quiet 2-core CPU: vitlab's defaults at least 3x faster than the tutorial where bf16 is
native, at least 1.2x in fp32. Figures: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

RUNS = ("vitlab", "vitlab-fp32", "tutorial")
CLASSES = 10
SHIMS = '''"""Runs the tutorial's train.py (jeonsworld/ViT-pytorch) as written, on a machine without Apex, ml_collections or
an internet connection. Written by vitlab's benchmarks/seed_job.py; usage: python tutorial_shims.py TRAIN.PY FLAGS..."""
import os
import runpy
import sys
import types

import torchvision

TUTORIAL, DATA = os.environ["SEED_JOB_TUTORIAL"], os.environ["SEED_JOB_DATA"]

# Apex: train.py imports amp and its DistributedDataParallel, and uses them only with --fp16 or --local_rank
apex = types.ModuleType("apex")
apex.amp = types.ModuleType("apex.amp")
apex.parallel = types.ModuleType("apex.parallel")
apex.parallel.DistributedDataParallel = None
sys.modules.update({"apex": apex, "apex.amp": apex.amp, "apex.parallel": apex.parallel})


class ConfigDict(dict):
    """ml_collections.ConfigDict as models/configs.py uses it: a dict read and written by attribute."""

    def __init__(self, values=None):
        super().__init__(values or {})

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name, value):
        self[name] = value

    def __delattr__(self, name):
        del self[name]


if "ml_collections" not in sys.modules:
    try:
        import ml_collections  # noqa: F401  the real one, where installed
    except ImportError:
        sys.modules["ml_collections"] = types.SimpleNamespace(ConfigDict=ConfigDict)


def image_folder(root, train, download, transform):
    """torchvision's CIFAR10 as utils/data_utils.py calls it: the carved image folder's train/ or test/ instead."""
    return torchvision.datasets.ImageFolder(os.path.join(DATA, "train" if train else "test"), transform=transform)


torchvision.datasets.CIFAR10 = image_folder
sys.path.insert(0, TUTORIAL)
sys.argv = [os.path.join(TUTORIAL, "train.py"), *sys.argv[1:]]
runpy.run_path(sys.argv[0], run_name="__main__")
'''


def carve(data_dir: Path, out: Path, test_images: int, train_images: int | None) -> tuple[int, int]:
    """out/train and out/test: symbolic links to DATA_DIR's images, the last test_images / 10 of each class testing;
    returns the two counts. A folder carved before with other counts is refused, not mixed."""
    per_class_test = test_images // CLASSES
    per_class_train = None if train_images is None else train_images // CLASSES
    record = out / "carved.json"
    wanted = {"data_dir": str(data_dir.resolve()), "test": per_class_test, "train": per_class_train}
    if record.exists():
        if json.loads(record.read_text()) != wanted:
            raise SystemExit(
                f"{out} holds another carving ({record.read_text().strip()}); choose another --work"
            )
    else:
        classes = sorted(d.name for d in data_dir.iterdir() if d.is_dir())
        if len(classes) != CLASSES:
            raise SystemExit(
                f"{data_dir}: expected the 10 CIFAR-10 class folders, found {len(classes)}"
            )
        for name in classes:
            images = sorted(p for p in (data_dir / name).iterdir() if p.is_file())
            if len(images) <= per_class_test:
                raise SystemExit(
                    f"{data_dir / name}: {len(images)} images, not enough for {per_class_test} to test"
                )
            test, train = (
                images[len(images) - per_class_test :],
                images[: len(images) - per_class_test],
            )
            for split, chosen in (("test", test), ("train", train[:per_class_train])):
                (out / split / name).mkdir(parents=True, exist_ok=True)
                for image in chosen:
                    (out / split / name / image.name).symlink_to(image.resolve())
        record.write_text(json.dumps(wanted) + "\n")
    return tuple(sum(1 for _ in (out / split).rglob("*.*")) for split in ("train", "test"))


def random_checkpoint(path: Path) -> None:
    """A random ViT-B/16 in the official .npz layout, with the ImageNet-21k file's 21,843-class head."""
    if path.exists():
        return
    import torch

    import vitlab

    torch.manual_seed(0)
    vitlab.save_npz(vitlab.create_model("ViT-B_16", num_classes=21843, img_size=224), path)


def commands(args: argparse.Namespace, checkpoint: Path) -> dict[str, tuple[list[str], Path]]:
    """Each run's command line and the folder it runs in."""
    steps = ["--num_steps", str(args.num_steps), "--eval_every", str(args.num_steps)]
    runs = {}
    for name, extra in (("vitlab", []), ("vitlab-fp32", ["--precision", "fp32"])):
        where = args.work / "runs" / name
        runs[name] = (
            [
                sys.executable,
                "-m",
                "vitlab.app.cli",
                "train",
                "--name",
                "seed",
                "--dataset",
                "imagefolder",
                "--data_dir",
                str(args.work / "data"),
                "--pretrained_dir",
                str(checkpoint),
                *steps,
                "--val_split",
                "0",
                "--output_dir",
                str(where / "output"),
                "--log_dir",
                str(where / "logs"),
                *extra,
            ],
            where,
        )
    where = args.work / "runs" / "tutorial"
    runs["tutorial"] = (
        [
            sys.executable,
            str(args.work / "tutorial_shims.py"),
            "--name",
            "seed",
            "--dataset",
            "cifar10",
            "--model_type",
            "ViT-B_16",
            "--pretrained_dir",
            str(checkpoint),
            "--train_batch_size",
            "16",
            *steps,
            "--output_dir",
            str(where / "output"),
        ],
        where,
    )
    return runs


def timed(command: list[str], cwd: Path, log: Path, env: dict) -> tuple[int, float, int]:
    """(exit status, wall seconds, peak resident bytes) of `command` run in `cwd`, its output to `log`."""
    cwd.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        started = time.perf_counter()
        process = subprocess.Popen(command, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    return process.returncode, wall, usage.ru_maxrss * 1024  # Linux counts kilobytes


def test_accuracy(name: str, where: Path, log: Path) -> float | None:
    """The run's test accuracy: vitlab's final_metrics.json, the tutorial's last "Valid Accuracy" line."""
    if name.startswith("vitlab"):
        return json.loads((where / "output" / "seed" / "final_metrics.json").read_text())[
            "test_accuracy"
        ]
    found = re.findall(r"Valid Accuracy: ([\d.]+)", log.read_text(errors="replace"))
    return float(found[-1]) if found else None


def machine() -> dict:
    import torch

    from vitlab.fastpaths import cpu_name, instruction_set

    isa = {
        k: os.environ[k]
        for k in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS")
        if k in os.environ
    }
    return {
        "cpu": cpu_name(),
        "instruction_set": instruction_set(),
        "torch": torch.__version__,
        "cores": len(os.sched_getaffinity(0)),
        "isa_variables": isa,
    }


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("data_dir", type=Path, help="a CIFAR-10 image folder, <class>/<image>")
    parser.add_argument("tutorial_dir", type=Path, help="a checkout of jeonsworld/ViT-pytorch")
    parser.add_argument(
        "--work", type=Path, required=True, help="a folder outside the repository for data and runs"
    )
    parser.add_argument(
        "--num_steps", type=int, default=100, help="training steps (default 100, the seed's)"
    )
    parser.add_argument(
        "--test_images",
        type=int,
        default=10000,
        help="test split, a tenth per class (default 10000)",
    )
    parser.add_argument(
        "--train_images", type=int, help="train on this many (default: every image not testing)"
    )
    parser.add_argument(
        "--runs",
        default=",".join(RUNS),
        help=f"which runs, comma-separated (default {','.join(RUNS)})",
    )
    parser.add_argument("--json", type=Path, help="write the figures to this JSON file")
    args = parser.parse_args()
    if not set(args.runs.split(",")) <= set(RUNS):
        raise SystemExit(f"--runs: choose among {', '.join(RUNS)}")
    if not (args.tutorial_dir / "train.py").is_file():
        raise SystemExit(f"{args.tutorial_dir}: no train.py (a checkout of jeonsworld/ViT-pytorch)")
    if args.work.resolve().is_relative_to(Path(__file__).resolve().parents[1]):
        raise SystemExit(
            f"--work {args.work}: keep the data and the tutorial's runs outside the repository"
        )
    return args


def print_table(runs: dict) -> None:
    print(f"\n{'run':<12} {'wall s':>8} {'peak GB':>8} {'test acc':>9} {'tutorial / this':>16}")
    for name, run in runs.items():
        ratio = (
            runs["tutorial"]["wall_seconds"] / run["wall_seconds"] if "tutorial" in runs else None
        )
        acc = f"{run['test_accuracy']:.4f}" if run["test_accuracy"] is not None else "-"
        shown = f"{ratio:.2f}x" if ratio else "-"
        print(
            f"{name:<12} {run['wall_seconds']:>8.1f} {run['peak_bytes'] / 1e9:>8.2f} {acc:>9} {shown:>16}"
        )


def main() -> None:
    args = arguments()
    args.work.mkdir(parents=True, exist_ok=True)
    train_count, test_count = carve(
        args.data_dir, args.work / "data", args.test_images, args.train_images
    )
    checkpoint = args.work / "ViT-B_16.npz"
    random_checkpoint(checkpoint)
    (args.work / "tutorial_shims.py").write_text(SHIMS)
    env = dict(
        os.environ,
        SEED_JOB_TUTORIAL=str(args.tutorial_dir.resolve()),
        SEED_JOB_DATA=str(args.work / "data"),
    )
    figures = {"machine": machine(), "train_images": train_count, "test_images": test_count}
    figures |= {"num_steps": args.num_steps, "runs": {}}
    print(f"{train_count} training and {test_count} test images; {figures['machine']}", flush=True)
    for name, (command, where) in commands(args, checkpoint).items():
        if name not in args.runs.split(","):
            continue
        log = args.work / "runs" / f"{name}.log"
        print(f"{name}: (cd {where} && {' '.join(command)}) > {log}", flush=True)
        rc, wall, peak = timed(command, where, log, env)
        if rc != 0:
            raise SystemExit(f"{name} failed (exit {rc}); its output: {log}")
        figures["runs"][name] = {"command": command, "cwd": str(where), "wall_seconds": wall}
        figures["runs"][name] |= {
            "peak_bytes": peak,
            "test_accuracy": test_accuracy(name, where, log),
        }
        print(f"{name}: {wall:.1f} s wall, {peak / 1e9:.2f} GB peak", flush=True)
    print_table(figures["runs"])
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

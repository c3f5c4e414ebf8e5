"""Time to accuracy: the scratch-cifar10-cpu recipe trained on real CIFAR-10 images on this machine's CPU.

Run from the repository root, in the project's environment, with DATA_DIR a CIFAR-10 image folder
(<class>/<image>, 50,000 training images):

    python benchmarks/cifar10_cpu.py DATA_DIR                          # 28 minutes of training: 30 with the rest
    python benchmarks/cifar10_cpu.py DATA_DIR --budget_minutes 10 --json results/cifar10_cpu.json
    python benchmarks/cifar10_cpu.py DATA_DIR --num_steps 5            # a fixed number of steps, no probe

It runs `vitlab train --recipe scratch-cifar10-cpu --dataset imagefolder --data_dir DATA_DIR --val_split 0.1
--device cpu` (5,000 of the 50,000 images held out for validation), any further flags passed on, and prints
the validation accuracy against the time spent training, then one line: best accuracy, wall time, images/s.

The budget. `vitlab train` runs a given number of steps and fits its learning-rate schedule (warmup, cosine
decay) to that number, so the budget becomes a number of steps before the run starts: a probe trains the
recipe for --probe_steps steps on random images of DATA_DIR's size (a throwaway folder; the speed does not
depend on the pictures) and times the second half of them; then num_steps = what fits the budget at that
speed, after the six evaluations of the 5,000 held-out images, each evaluated image costed at a third of a
trained one (a forward pass without the backward), divided by the share of patches training keeps (evaluation
sees all of them; --patch_drop_rate 0.5: two thirds). The recipe's warmup keeps its share of the run (200 of
3,200 steps). Loading the dataset and the probe are outside the budget; the wall time reported includes them.
Elapsed training time at each evaluation comes from metrics.jsonl: step x batch / train/images_per_second
(that speed counts every second since the first step, the evaluations before it included).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RECIPE = "scratch-cifar10-cpu"
VAL_SPLIT = 0.1  # 5,000 of CIFAR-10's 50,000 training images
EVALUATIONS = 6  # evaluations in a budgeted run, the last at the end: points on the accuracy curve
# An evaluated image costs about a third of a trained one (forward only), at the same token count
EVAL_COST = 1 / 3
PROBE_CLASSES, PROBE_IMAGES_PER_CLASS = 10, 64  # the probe's throwaway folder of random images


def recipe_value(key: str):
    from vitlab.recipes import RECIPES

    return RECIPES[RECIPE][key]


def image_files(root: Path) -> list[Path]:
    from vitlab.data import IMAGE_EXTENSIONS

    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)


def train_command(
    data_dir: Path,
    name: str,
    output_dir: Path,
    log_dir: Path,
    num_steps: int,
    eval_every: int,
    log_every: int,
    warmup_steps: int,
    extra: list[str],
) -> list[str]:
    return [
        sys.executable,
        "-m",
        "vitlab.app.cli",
        "train",
        "--recipe",
        RECIPE,
        "--name",
        name,
        "--dataset",
        "imagefolder",
        "--data_dir",
        str(data_dir),
        "--val_split",
        str(VAL_SPLIT),
        "--device",
        "cpu",
        "--num_steps",
        str(num_steps),
        "--eval_every",
        str(eval_every),
        "--log_every",
        str(log_every),
        "--warmup_steps",
        str(warmup_steps),
        "--output_dir",
        str(output_dir),
        "--log_dir",
        str(log_dir),
        *extra,
    ]


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def training_seconds(records: list[dict], step: int, batch: int) -> float | None:
    """Seconds since training started, at `step`, from its train/images_per_second record."""
    speed = next(
        (
            r["train/images_per_second"]
            for r in records
            if r["step"] == step and "train/images_per_second" in r
        ),
        None,
    )
    return step * batch / speed if speed else None


def run_batch(out: Path) -> int:
    """The batch size a run used: the recipe's, or a --train_batch_size passed on."""
    return json.loads((out / "config.json").read_text())["train_batch_size"]


def probe_speed(data_dir: Path, steps: int, extra: list[str]) -> tuple[float, int]:
    """(training images/s, batch size) of the recipe on this machine, over the second half of `steps` steps on random images."""
    from PIL import Image

    from vitlab.data import read_image

    shape = read_image(str(image_files(data_dir)[0])).shape  # the dataset's image size, (H, W, 3)
    half = max(1, steps // 2)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "images"
        rng = np.random.default_rng(0)
        for c in range(PROBE_CLASSES):
            (root / str(c)).mkdir(parents=True)
            for i in range(PROBE_IMAGES_PER_CLASS):
                Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(
                    root / str(c) / f"{i}.png"
                )
        command = train_command(
            root,
            "probe",
            Path(tmp) / "output",
            Path(tmp) / "logs",
            2 * half,
            2 * half,
            half,
            0,
            extra,
        )
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"the probe failed:\n{done.stderr[-2000:]}")
        records = read_metrics(Path(tmp) / "output" / "probe" / "metrics.jsonl")
        batch = run_batch(Path(tmp) / "output" / "probe")
    first, last = training_seconds(records, half, batch), training_seconds(records, 2 * half, batch)
    return half * batch / (last - first), batch


def kept_patches(extra: list[str]) -> float:
    """The share of patches training keeps (--patch_drop_rate among the flags, else the recipe's); evaluation keeps all."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument(
        "--patch_drop_rate",
        "--patch-drop-rate",
        type=float,
        default=recipe_value("patch_drop_rate"),
    )
    return 1 - parser.parse_known_args(extra)[0].patch_drop_rate


def steps_for_budget(
    budget_seconds: float, speed: float, batch: int, val_images: int, kept: float
) -> int:
    eval_seconds = EVALUATIONS * val_images * EVAL_COST / kept / speed
    steps = math.floor((budget_seconds - eval_seconds) * speed / batch)
    if steps < 1:
        raise SystemExit(
            f"a budget of {budget_seconds:.0f} s does not fit one step at {speed:.0f} images/s; give a larger --budget_minutes"
        )
    return steps


def parse_args() -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Any other flag is passed on to vitlab train.",
    )
    parser.add_argument("data_dir", type=Path, help="a CIFAR-10 image folder, <class>/<image>")
    parser.add_argument(
        "--budget_minutes",
        type=float,
        default=28.0,
        help="training time to fill, excluding data loading and the probe (default 28: with them, "
        "about 30)",
    )
    parser.add_argument(
        "--num_steps", type=int, help="train this many steps instead of filling a budget (no probe)"
    )
    parser.add_argument(
        "--probe_steps",
        type=int,
        default=40,
        help="training steps of the probe; the second half is timed (default 40)",
    )
    parser.add_argument("--name", help="the run's name (default: cifar10-cpu-<steps>)")
    parser.add_argument(
        "--output_dir",
        type=Path,
        default=Path("output"),
        help="vitlab train's --output_dir (default output)",
    )
    parser.add_argument(
        "--log_dir", type=Path, default=Path("logs"), help="vitlab train's --log_dir (default logs)"
    )
    parser.add_argument(
        "--json", type=Path, help="write the curve and the final numbers to this JSON file"
    )
    return parser.parse_known_args()


def plan_steps(
    args: argparse.Namespace, extra: list[str], val_images: int
) -> tuple[int, float | None]:
    """The run's steps: --num_steps, else as many as fill the budget at the probed speed."""
    if args.num_steps:
        return args.num_steps, None
    speed, batch = probe_speed(args.data_dir, args.probe_steps, extra)
    steps = steps_for_budget(
        args.budget_minutes * 60, speed, batch, val_images, kept_patches(extra)
    )
    print(
        f"probe: {speed:.0f} training images/s -> {steps} steps of {batch} fill "
        f"{args.budget_minutes:g} minutes with {EVALUATIONS} evaluations of {val_images} images"
    )
    return steps, speed


def run_and_watch(command: list[str]) -> dict[int, float]:
    """Run vitlab train, echoing its output; step -> seconds since the run was launched, when its
    evaluation line appeared."""
    started = time.perf_counter()
    seen_at = {}
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True, bufsize=1) as run:
        for line in run.stdout:
            print(line, end="", flush=True)
            found = re.match(r"step (\d+): val accuracy", line)
            if found:
                seen_at[int(found.group(1))] = time.perf_counter() - started
    if run.returncode != 0:
        raise SystemExit(f"vitlab train failed (exit {run.returncode})")
    return seen_at


def learning_curve(out: Path, seen_at: dict[int, float]) -> list[dict]:
    records, batch = read_metrics(out / "metrics.jsonl"), run_batch(out)
    return [
        {
            "step": r["step"],
            "val_accuracy": r["val/accuracy"],
            "training_seconds": training_seconds(records, r["step"], batch),
            "seconds_since_launch": seen_at.get(r["step"]),
        }
        for r in records
        if "val/accuracy" in r
    ]


def print_curve(curve: list[dict], final: dict, wall: float) -> None:
    def shown(seconds: float | None) -> str:
        return f"{seconds:.0f}" if seconds is not None else "-"

    print(f"\n{'step':>6} {'training s':>11} {'since launch s':>15} {'val accuracy':>13}")
    for point in curve:
        train_s, launch_s = shown(point["training_seconds"]), shown(point["seconds_since_launch"])
        print(f"{point['step']:>6} {train_s:>11} {launch_s:>15} {point['val_accuracy']:>13.4f}")
    print(
        f"best validation accuracy {final['best_val_accuracy']:.4f} (step {final['best_step']} of "
        f"{final['steps']}), wall time {wall:.0f} s (training {final['train_seconds']:.0f} s), "
        f"{final['images_per_second']:.0f} training images/s"
    )


def main() -> None:
    args, extra = parse_args()
    if not args.data_dir.is_dir():
        raise SystemExit(f"{args.data_dir}: no such folder")
    val_images = round(len(image_files(args.data_dir)) * VAL_SPLIT)
    launched = time.perf_counter()
    steps, speed = plan_steps(args, extra, val_images)
    # Evaluations fall on logged steps, which carry the speed
    log_every = 10 if steps >= 10 * EVALUATIONS else 1
    eval_every = max(log_every, math.ceil(steps / EVALUATIONS / log_every) * log_every)
    warmup = round(steps * recipe_value("warmup_steps") / recipe_value("num_steps"))
    name = args.name or f"cifar10-cpu-{steps}"
    command = train_command(
        args.data_dir,
        name,
        args.output_dir,
        args.log_dir,
        steps,
        eval_every,
        log_every,
        warmup,
        extra,
    )
    print("vitlab " + " ".join(command[3:]), flush=True)
    seen_at = run_and_watch(command)
    wall = time.perf_counter() - launched
    out = args.output_dir / name
    final = json.loads((out / "final_metrics.json").read_text())
    curve = learning_curve(out, seen_at)
    print_curve(curve, final, wall)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        result = {
            "command": ["vitlab", *command[3:]],
            "threads_visible": len(os.sched_getaffinity(0)),
            "budget_minutes": None if args.num_steps else args.budget_minutes,
            "probe_images_per_second": speed,
            "num_steps": steps,
            "curve": curve,
            "final": final,
            "wall_seconds": wall,
        }
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

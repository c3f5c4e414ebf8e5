"""Distillation measured (issue 27): a small ViT trained alone against the same ViT distilled from a
larger teacher trained here first, at equal steps, on CIFAR-10 at 32 px; validation accuracy on the
same held-out images.

Run from the repository root, in the project's environment, with DATA_DIR a CIFAR-10 image folder
(<class>/<image>, 50,000 training images):

    python benchmarks/distill.py DATA_DIR                       # teacher, student alone, student hard-distilled
    python benchmarks/distill.py DATA_DIR --soft                # and soft-distilled
    python benchmarks/distill.py DATA_DIR --soft --student_steps 900 --tag -900   # longer students, same teacher
    python benchmarks/distill.py DATA_DIR --teacher_steps 40 --student_steps 20   # a quick dry run

Every run is `vitlab train --recipe scratch-cifar10-cpu --dataset imagefolder --data_dir DATA_DIR
--val_split 0.1 --device cpu` (5,000 images held out from all of them, the same 5,000: the split is
drawn from the seed, 42 in every run) at --batch images a step, warmup WARMUP_SHARE of the steps,
one evaluation at the end. The teacher is the recipe's model (width 192, depth 6, 6 heads, MLP 384:
1.8 M parameters); the student is STUDENT (width 96, depth 4, 3 heads, MLP 192: 0.31 M), both with
the recipe's average pooling, so the student distils into its one head (logit distillation; a DeiT
student needs a class token). The distilled student is the student's run with `--teacher
WORK/teacher/best.pt --distillation hard` (and soft): the same seed, data order, augmentation and
steps. A run whose final_metrics.json is already in --work is reused, not rerun. Prints one line a
run, then a JSON summary (also written to WORK/summary.json).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

RECIPE = "scratch-cifar10-cpu"
VAL_SPLIT = 0.1  # 5,000 of CIFAR-10's 50,000 training images, held out from every run
WARMUP_SHARE = 1 / 12
STUDENT = ["--hidden_size", "96", "--depth", "4", "--num_heads", "3", "--mlp_dim", "192"]


def train_command(args: argparse.Namespace, name: str, steps: int, extra: list[str]) -> list[str]:
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
        str(args.data_dir),
        "--val_split",
        str(VAL_SPLIT),
        "--device",
        "cpu",
        "--train_batch_size",
        str(args.batch),
        "--num_steps",
        str(steps),
        "--warmup_steps",
        str(round(steps * WARMUP_SHARE)),
        "--eval_every",
        str(steps),
        "--output_dir",
        str(args.work),
        "--log_dir",
        str(args.work / "logs"),
        *extra,
    ]


def run(args: argparse.Namespace, name: str, steps: int, extra: list[str]) -> dict:
    """The run's final metrics, training it unless --work holds them; its output goes to
    WORK/<name>.log."""
    final = args.work / name / "final_metrics.json"
    command = train_command(args, name, steps, extra)
    if not final.exists():
        started = time.perf_counter()
        with open(args.work / f"{name}.log", "w") as log:
            done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT)
        if done.returncode:
            sys.exit(f"{name}: vitlab train exited {done.returncode}; see {args.work / name}.log")
        print(f"{name}: {(time.perf_counter() - started) / 60:.1f} min wall")
    metrics = json.loads(final.read_text())
    shown = " ".join(command[command.index("train") :])
    print(f"{name}: validation accuracy {metrics['best_val_accuracy']:.4f}  (vitlab {shown})")
    return {"command": shown, **metrics}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data_dir", type=Path, help="a CIFAR-10 image folder: <class>/<image>")
    p.add_argument("--work", type=Path, default=Path("output/distill"), help="the runs' folder")
    p.add_argument("--batch", type=int, default=128, help="images a step, every run")
    p.add_argument("--teacher_steps", type=int, default=360)
    p.add_argument("--student_steps", type=int, default=300, help="steps of each student run")
    p.add_argument("--soft", action="store_true", help="also a soft-distilled student")
    p.add_argument(
        "--tag", default="", help="appended to the students' names: runs of other lengths beside"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    results = {"teacher": run(args, "teacher", args.teacher_steps, [])}
    teacher = ["--teacher", str(args.work / "teacher" / "best.pt")]
    students = {"alone": [], "hard": [*teacher, "--distillation", "hard"]}
    if args.soft:
        students["soft"] = [*teacher, "--distillation", "soft"]
    for name, extra in students.items():
        results[name] = run(args, f"student-{name}{args.tag}", args.student_steps, STUDENT + extra)
    summary = {name: r["best_val_accuracy"] for name, r in results.items()}
    (args.work / f"summary{args.tag}.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

"""vitlab's model at two commits, timed alternately: whether a change made any cell slower.

Run from the repository root, in the project's environment:

    python benchmarks/ab.py 547d12f e157a70                   # before and after model.py's rewrite (issue 24)
    python benchmarks/ab.py main HEAD --shapes Ti/4-32 --rounds 5 --json ab.json

Each commit is checked out once, detached, in a temporary git worktree. Every round runs one fresh process per
commit and shape, in the order A B in odd rounds and B A in even ones, so that drift on the machine hits both
alike; each process imports that commit's vitlab (PYTHONPATH), builds the shape with `vitlab.create_model` and
random weights (dropout 0, exact GELU, 10 classes), and times four cells: inference in fp32 and bf16
(torch.inference_mode) and a training step in fp32 and bf16 (forward, cross-entropy, backward, SGD with momentum),
bf16 being `vitlab.runtime.autocast` over fp32 weights. A cell is warmed up twice, then repeated for at least
--seconds; its images/s is the batch over the mean time. The result: the median over rounds of each cell, and
B's over A's. Both commits must build models with `vitlab.create_model` and offer `vitlab.runtime.autocast`
(every commit since 2026-11-20). The line printed first names the CPU, instruction set and torch.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# name -> (variant, img_size, patch, width, depth, heads, mlp_dim, batch): benchmarks/models.py's shapes
SHAPES = {
    "B/16": ("B/16", 224, 16, 768, 12, 12, 3072, 16),
    "Ti/4-32": ("Ti/16", 32, 4, 192, 12, 3, 768, 256),
}
CELLS = ("infer fp32", "infer bf16", "train fp32", "train bf16")


def worker(shape: str, seconds: float) -> dict:
    """Images/s of each cell at `shape`, and the vitlab that computed them (one commit's)."""
    import vitlab  # first, as under the `vitlab` command: its allocator settings apply to torch

    vitlab.keep_freed_memory()
    import torch

    from vitlab.runtime import autocast

    variant, size, patch, width, depth, heads, mlp, batch = SHAPES[shape]
    shape_args = dict(img_size=size, patch_size=patch, hidden_size=width, depth=depth)
    model = vitlab.create_model(
        variant,
        **shape_args,
        num_heads=heads,
        mlp_dim=mlp,
        num_classes=10,
        dropout_rate=0.0,
        gelu="exact",
    )
    images, labels = torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    cpu = torch.device("cpu")

    def infer(precision: str) -> None:
        with torch.inference_mode(), autocast(cpu, precision):
            model.eval()(images)

    def train(precision: str) -> None:
        with autocast(cpu, precision):
            loss = torch.nn.functional.cross_entropy(model.train()(images).float(), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    result = {}
    for cell in CELLS:
        kind, precision = cell.split()
        step = infer if kind == "infer" else train
        for _ in range(2):
            step(precision)
        started, count = time.perf_counter(), 0
        while count == 0 or time.perf_counter() - started < seconds:
            step(precision)
            count += 1
        result[cell] = batch * count / (time.perf_counter() - started)
    return {"cells": result, "vitlab": vitlab.__file__}


def run(tree: Path, shape: str, seconds: float) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree / "src")}
    command = [sys.executable, __file__, "--worker", shape, "--seconds", str(seconds)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{tree}: {shape} failed:\n{done.stderr[-2000:]}")
    timed = json.loads(done.stdout.strip().splitlines()[-1])
    if not Path(timed["vitlab"]).resolve().is_relative_to(tree.resolve()):
        raise SystemExit(f"{tree}: the worker imported {timed['vitlab']}, not this commit's vitlab")
    return timed["cells"]


def machine() -> str:
    import torch

    model = next(
        (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line),
        "unknown CPU",
    )
    return f"{model}, {torch.backends.cpu.get_cpu_capability()}, torch {torch.__version__}"


def compare(revs: tuple[str, str], args: argparse.Namespace, trees: list[Path]) -> dict:
    figures = {rev: {s: {c: [] for c in CELLS} for s in args.shapes} for rev in revs}
    for r in range(args.rounds):
        order = (0, 1) if r % 2 == 0 else (1, 0)
        for shape in args.shapes:
            for i in order:
                for cell, value in run(trees[i], shape, args.seconds).items():
                    figures[revs[i]][shape][cell].append(value)
        print(f"round {r + 1} of {args.rounds} done", file=sys.stderr, flush=True)
    return figures


def report(revs: tuple[str, str], figures: dict, shapes: list[str]) -> None:
    a, b = revs
    print(f"{'shape':<9} {'cell':<11} {a[:12]:>12} {b[:12]:>12} {'B / A':>7}  (median images/s)")
    for shape in shapes:
        for cell in CELLS:
            ma = statistics.median(figures[a][shape][cell])
            mb = statistics.median(figures[b][shape][cell])
            print(f"{shape:<9} {cell:<11} {ma:>12.2f} {mb:>12.2f} {mb / ma:>6.3f}x")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("revs", nargs="*", help="two commits, A then B")
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--rounds", type=int, default=3, help="alternations (default 3)")
    parser.add_argument("--seconds", type=float, default=2.0, help="per cell (default 2)")
    parser.add_argument("--json", type=Path, help="write every figure to this JSON file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.seconds)))
        return
    if len(args.revs) != 2:
        parser.error("name two commits")
    revs = tuple(args.revs)
    print(machine(), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        trees = [Path(tmp, f"rev{i}") for i in range(2)]
        try:
            for tree, rev in zip(trees, revs, strict=True):
                subprocess.run(["git", "worktree", "add", "-q", "--detach", tree, rev], check=True)
            figures = compare(revs, args, trees)
        finally:
            for tree in trees:
                subprocess.run(["git", "worktree", "remove", "--force", tree], check=False)
    report(revs, figures, args.shapes)
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "figures": figures}, indent=2))


if __name__ == "__main__":
    main()

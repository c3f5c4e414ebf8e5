"""vitlab's model at two commits, timed alternately: whether a change made any cell slower.

Run from the repository root, in the project's environment:

    python benchmarks/ab.py 547d12f e157a70                   # before and after model.py's rewrite (issue 24)
    python benchmarks/ab.py main HEAD --shapes Ti/4-32 --rounds 5 --json ab.json

Each commit is checked out once, detached, in a temporary git worktree. Every round runs one fresh process per
commit and shape, in the order A B in odd rounds and B A in even ones, so that drift on the machine hits both
alike; each process imports that commit's vitlab (PYTHONPATH), builds the shape with `vitlab.create_model` and
random weights (dropout 0, exact GELU, 10 classes), and times four cells: inference in fp32 and bf16
(torch.inference_mode) and a training step in fp32 and bf16 (forward, cross-entropy, backward, SGD with momentum),
bf16 being `vitlab.runtime.autocast` over fp32 weights; with --dropout P, two more cells time the training step
of the same weights built at dropout P (the seed's 0.1: `python benchmarks/ab.py main HEAD --dropout 0.1`). A cell
is warmed up twice, then repeated for at least
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
DROPOUT_CELLS = ("drop fp32", "drop bf16")  # the training step at --dropout


def worker(shape: str, seconds: float, dropout: float) -> dict:
    """Images/s of each cell at `shape`, and the vitlab that computed them (one commit's)."""
    import vitlab  # first, as under the `vitlab` command: its allocator settings apply to torch

    vitlab.keep_freed_memory()
    import torch

    from vitlab.runtime import autocast

    variant, size, patch, width, depth, heads, mlp, batch = SHAPES[shape]
    shape_args = dict(img_size=size, patch_size=patch, hidden_size=width, depth=depth)

    def build(rate: float) -> torch.nn.Module:
        return vitlab.create_model(
            variant,
            **shape_args,
            num_heads=heads,
            mlp_dim=mlp,
            num_classes=10,
            dropout_rate=rate,
            gelu="exact",
        )

    # kind -> the model it times: "drop" the same weights at `dropout`, with its own optimizer
    models = {"infer": build(0.0)}
    models["train"] = models["infer"]
    if dropout > 0:
        models["drop"] = build(dropout)
        models["drop"].load_state_dict(models["infer"].state_dict())
    optimizers = {
        kind: torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        for kind, model in models.items()
        if kind != "infer"
    }
    images, labels = torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))
    cpu = torch.device("cpu")

    def step(kind: str, precision: str) -> None:
        if kind == "infer":
            with torch.inference_mode(), autocast(cpu, precision):
                models[kind].eval()(images)
            return
        with autocast(cpu, precision):
            logits = models[kind].train()(images)
        torch.nn.functional.cross_entropy(logits.float(), labels).backward()
        optimizers[kind].step()
        optimizers[kind].zero_grad(set_to_none=True)

    result = {}
    for cell in CELLS + (DROPOUT_CELLS if dropout > 0 else ()):
        kind, precision = cell.split()
        for _ in range(2):
            step(kind, precision)
        started, count = time.perf_counter(), 0
        while count == 0 or time.perf_counter() - started < seconds:
            step(kind, precision)
            count += 1
        result[cell] = batch * count / (time.perf_counter() - started)
    return {"cells": result, "vitlab": vitlab.__file__}


def run(tree: Path, shape: str, args: argparse.Namespace) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree / "src")}
    command = [sys.executable, __file__, "--worker", shape, "--seconds", str(args.seconds)]
    command += ["--dropout", str(args.dropout)]
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
    cells = CELLS + (DROPOUT_CELLS if args.dropout > 0 else ())
    figures = {rev: {s: {c: [] for c in cells} for s in args.shapes} for rev in revs}
    for r in range(args.rounds):
        order = (0, 1) if r % 2 == 0 else (1, 0)
        for shape in args.shapes:
            for i in order:
                for cell, value in run(trees[i], shape, args).items():
                    figures[revs[i]][shape][cell].append(value)
        print(f"round {r + 1} of {args.rounds} done", file=sys.stderr, flush=True)
    return figures


def report(revs: tuple[str, str], figures: dict, shapes: list[str]) -> None:
    a, b = revs
    print(f"{'shape':<9} {'cell':<11} {a[:12]:>12} {b[:12]:>12} {'B / A':>7}  (median images/s)")
    for shape in shapes:
        for cell in figures[a][shape]:
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
    parser.add_argument(
        "--dropout", type=float, default=0.0, help="time the training step at this dropout too"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.seconds, args.dropout)))
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

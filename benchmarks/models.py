"""vitlab's Vision Transformer against timm, torchvision and transformers, on the same shapes.

Run from the repository root, in the project's environment (timm and transformers come with `.[test]`):

    python benchmarks/models.py                                  # every shape, 5 rounds, GPU if there is one
    python benchmarks/models.py --quick                          # a minute or two on a 2-core CPU: Ti/4-32, 2 rounds
    python benchmarks/models.py --configs B/16 --rounds 7 --device cpu --threads 8 --json results/models.json
    python benchmarks/models.py --smoke                          # a few seconds: tiny shapes, checks the plumbing only

What it measures. Three shapes, each built by every implementation with random weights and 10 classes
(benchmarks/peers.py: how each is built, and where each drops): "B/16" (ViT-B/16 at 224 px, batch 16: the
tutorial's fine-tuning), "Ti/4-32" (width 192, depth 12, 3 heads, MLP 768, patch 4 at 32 px, batch 256: training
from scratch) and "DINOv2-B/14" (vitlab's dinov2-B/14 variant and timm's vit_base_patch14_dinov2, both at 224 px,
batch 16). Six cells each:
  infer fp32 / infer bf16             eval(), torch.inference_mode, one forward pass of the batch
  train fp32 / train bf16             train(), forward, cross-entropy, backward, SGD (momentum 0.9) update, zero_grad
  train+drop fp32 / train+drop bf16   the same with every implementation's hidden dropout at --dropout (0.1, the
                                      tutorial's; 0 leaves these cells out); every other cell runs without dropout
bf16 is torch.autocast (vitlab.runtime.autocast) over fp32 weights, as `vitlab train --precision bf16`; it is
left out by default where the hardware only emulates it (an AVX2 CPU: minutes per cell), `--dtypes` to choose.
Where Google released weights of the shape (B/16), a second vitlab row, "vitlab-tanh", times vitlab with the tanh
GELU those weights were trained with, vitlab's default for them; the ratio to the best peer is the first row's.
The fast paths line, printed after the warm-up, says which of vitlab's CPU fast paths won their timing at each
shape and by how much (vitlab.timings).

How. Every implementation is built and warmed up first (excluded from timing), then --rounds rounds; each
round times every cell of every implementation for the same number of iterations, in an order rotated
from round to round so that drift on the machine hits all of them alike (time.perf_counter, CUDA
synchronised). The result is the median images/s over rounds, and vitlab's ratio to the fastest peer.
Each round also times a square matrix product in fp32 and bf16 (the faster of torch.mm and, on x86 CPUs,
oneDNN's matmul), the machine's practical ceiling; every result is shown as a percentage of the FLOP-bound
limit that ceiling implies: images/s x FLOPs per image / ceiling. FLOPs per image count each multiply-add
as 2 of a ViT forward (patch embedding, qkv, attention scores and weighted sum, output projection, MLP,
head; norms, softmax and GELU left out); a training step counts 3x the forward. Peak memory of a training
step (without dropout) runs each implementation in a fresh subprocess (benchmarks/machine.py).
Every implementation runs in a process where vitlab was imported before torch, so torch's CPU allocator
uses transparent huge pages for all of them alike (THP_MEM_ALLOC_ENABLE=1 unless set otherwise), and, unless
--no-keep_freed_memory, where malloc keeps freed memory for reuse (vitlab.keep_freed_memory), as under the
`vitlab` command: for every implementation alike, the memory subprocesses included.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
from dataclasses import asdict, replace
from pathlib import Path

import vitlab  # before torch: vitlab turns torch's huge-page allocator on, for every implementation alike

# isort: split
import torch

from vitlab import fastpaths

from machine import DTYPES, Ceiling, environment, measure_memory, memory_worker, print_memory
from peers import (
    IMPLEMENTATIONS,
    PEERS,
    SHAPES,
    SMOKE_CHANGES,
    Runner,
    available,
    forward_flops,
    timed_on,
)

TRAIN_FLOPS_FACTOR = 3  # a training step: the forward, and a backward of about twice its work (input and weight gradients)


def cells_of(dtypes: list[str], dropout: float) -> list[str]:
    """The timed cells: inference and a training step in each precision, and one with dropout if it is on."""
    modes = ("infer", "train", "train+drop") if dropout > 0 else ("infer", "train")
    return [f"{mode} {d}" for mode in modes for d in dtypes]


# ---------------------------------------------------------------------------------------------
# The run


def build_runners(args: argparse.Namespace, shapes: dict, impls: list[str], timed: list[str]):
    """Every implementation at every shape, built and warmed up, and the iterations per measurement of each cell:
    enough for the fastest implementation to last --min_seconds."""
    device = torch.device(args.device)
    runners, iterations = {}, {}
    for name, shape in shapes.items():
        for impl in timed_on(shape, impls):
            runner = runners[name, impl] = Runner(impl, shape, device, args.dropout)
            for cell in timed:
                runner.seconds(cell, args.warmup)
        for cell in timed:
            fastest = (
                min(runners[name, impl].seconds(cell, 1) for impl in timed_on(shape, impls))
                if args.min_seconds > 0
                else math.inf
            )
            iterations[name, cell] = max(1, math.ceil(args.min_seconds / fastest))
        print(
            f"built and warmed up {name}: {', '.join(f'{c} x{iterations[name, c]}' for c in timed)} per measurement"
        )
    return runners, iterations


def time_rounds(
    args, shapes: dict, impls: list[str], timed: list[str], runners, iterations, ceiling
):
    """Images/s of every (shape, implementation, cell) in each round, and the ceiling's GFLOP/s in each round."""
    ceiling_rounds = {p: [] for p in args.dtypes}
    rates = {(n, i, c): [] for n, s in shapes.items() for i in timed_on(s, impls) for c in timed}
    for r in range(args.rounds):
        for precision, gflops in ceiling_rounds.items():
            gflops.append(ceiling.gflops(precision))
        order = impls[r % len(impls) :] + impls[: r % len(impls)]  # rotated each round
        for name, shape in shapes.items():
            for cell in timed:
                for impl in timed_on(shape, order):
                    n = iterations[name, cell]
                    seconds = runners[name, impl].seconds(cell, n)
                    rates[name, impl, cell].append(n * shape.batch / seconds)
        print(f"round {r + 1}/{args.rounds} done")
    return rates, ceiling_rounds


def summarize_ceiling(args, ceiling: Ceiling, ceiling_rounds: dict) -> dict:
    ceilings = {}
    for p, rounds in ceiling_rounds.items():
        by_library = {
            lib: {
                "gflops_median": statistics.median(r[lib] for r in rounds),
                "gflops_rounds": [r[lib] for r in rounds],
            }
            for lib in ceiling.products[p]
        }
        best = max(by_library, key=lambda lib: by_library[lib]["gflops_median"])
        ceilings[p] = {
            "matmul_size": args.matmul_size,
            "gflops_median": by_library[best]["gflops_median"],
            "library": best,
            "by_library": by_library,
        }
    return ceilings


def summarize_shape(shape, impls, timed, rates, runners, name: str, peak: dict) -> dict:
    """One shape's results: each implementation's cells, vitlab's ratio to the best peer, and what dropout cost."""
    flops = forward_flops(shape)
    entry = {
        "shape": asdict(shape),
        "forward_gflop_per_image": flops / 1e9,
        "results": {},
        "memory": {},
    }
    for impl in timed_on(shape, impls):
        cells = {}
        for cell in timed:
            mode, precision = cell.split()
            median = statistics.median(rates[name, impl, cell])
            cell_flops = flops * (1 if mode == "infer" else TRAIN_FLOPS_FACTOR)
            cells[cell] = {
                "images_per_second": median,
                "rounds": rates[name, impl, cell],
                "percent_of_flop_limit": 100 * median * cell_flops / (peak[precision] * 1e9),
            }
        runner = runners[name, impl]
        entry["results"][impl] = {
            "parameters": runner.params,
            "attention": runner.attention,
            "dropout_calls": runner.dropout_calls,
            "cells": cells,
        }
    rate = {
        i: {c: v["images_per_second"] for c, v in r["cells"].items()}
        for i, r in entry["results"].items()
    }
    peers = [i for i in rate if i in PEERS]
    entry["vitlab_vs_best_peer"] = {}
    if "vitlab" in rate and peers:
        for cell in timed:
            best = max(peers, key=lambda i: rate[i][cell])
            entry["vitlab_vs_best_peer"][cell] = {
                "ratio": rate["vitlab"][cell] / rate[best][cell],
                "best_peer": best,
            }
    # How much longer a training step takes with dropout than without, per implementation and precision
    entry["dropout_cost"] = {
        impl: {
            c.split()[1]: rate[impl][c.replace("+drop", "")] / rate[impl][c]
            for c in timed
            if "+drop" in c
        }
        for impl in rate
    }
    return entry


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    impls = [i for i in IMPLEMENTATIONS if available(i)]
    skipped = [i for i in IMPLEMENTATIONS if i not in impls]
    shapes = {
        n: replace(SHAPES[n], **SMOKE_CHANGES) if args.smoke else SHAPES[n] for n in args.configs
    }
    print(
        f"device {device}, {args.threads} threads, torch {torch.__version__}, freed memory kept for reuse: {args.freed_memory_kept}"
        + (f"; not installed: {', '.join(skipped)}" if skipped else "")
    )
    if args.skipped_bf16:
        print(
            f"bf16 left out: {device.type} has no native bf16 here ({fastpaths.instruction_set()}), where a cell takes minutes; --dtypes fp32 bf16 to time it anyway"
        )
    timed = cells_of(args.dtypes, args.dropout)
    if args.smoke:
        print("SMOKE RUN: tiny shapes, plumbing only; the numbers mean nothing")
    ceiling = Ceiling(args.matmul_size, device, args.min_seconds, args.dtypes)
    runners, iterations = build_runners(args, shapes, impls, timed)
    print(fastpaths.describe(device))  # after the warm-up: the fast paths' verdicts at these shapes
    rates, ceiling_rounds = time_rounds(args, shapes, impls, timed, runners, iterations, ceiling)
    ceilings = summarize_ceiling(args, ceiling, ceiling_rounds)
    peak = {p: c["gflops_median"] for p, c in ceilings.items()}
    result = {
        "environment": environment(device, args.threads, args.freed_memory_kept),
        "args": vars(args),
        "smoke": args.smoke,
        "ceiling": ceilings,
        "configs": {
            name: summarize_shape(shape, impls, timed, rates, runners, name, peak)
            for name, shape in shapes.items()
        },
    }
    runners.clear()  # free the models before the memory subprocesses run
    if args.memory:
        for name, shape in shapes.items():
            for impl in timed_on(shape, impls):
                result["configs"][name]["memory"][impl] = {
                    p: measure_memory(__file__, impl, shape, p, args) for p in args.dtypes
                }
                print(f"memory of {name} {impl} measured")
    return result


# ---------------------------------------------------------------------------------------------
# The report


def _figure(images_per_second: float) -> str:
    """At least three significant figures: B/16 trains at under 2 images/s, where one decimal hides the ratios."""
    decimals = 2 if images_per_second < 10 else 1 if images_per_second < 100 else 0
    return f"{images_per_second:.{decimals}f}"


def _describe_ceiling(c: dict) -> str:
    others = ", ".join(
        f"{lib} {v['gflops_median']:.0f}"
        for lib, v in c["by_library"].items()
        if lib != c["library"]
    )
    return f"{c['gflops_median']:.0f} GFLOP/s ({c['library']}" + (f"; {others})" if others else ")")


def print_shape(name: str, entry: dict, timed: list[str]) -> None:
    s = entry["shape"]
    print(
        f"\n{name} ({s['about']}): {s['img_size']} px, patch {s['patch_size']}, width {s['width']}, depth {s['depth']}, "
        f"heads {s['heads']}, MLP {s['mlp_dim']}, batch {s['batch']}; {entry['forward_gflop_per_image']:.3f} GFLOP per image "
        f"forward, x{TRAIN_FLOPS_FACTOR} per training image"
    )
    print(f"{'':<18}{'params':>12}" + "".join(f"{c:>20}" for c in timed))
    for impl, r in entry["results"].items():
        row = "".join(
            f"{_figure(r['cells'][c]['images_per_second']):>12} ({r['cells'][c]['percent_of_flop_limit']:>3.0f}%)"
            for c in timed
        )
        print(f"{impl:<18}{r['parameters']:>12,}{row}   {r['attention']}")
    if entry["vitlab_vs_best_peer"]:
        vs = entry["vitlab_vs_best_peer"]
        print(
            f"{'vitlab/best peer':<18}{'':>12}"
            + "".join(f"{vs[c]['ratio']:>7.2f}x {vs[c]['best_peer']:>12}" for c in timed)
        )
    if any(entry["dropout_cost"].values()):
        print(
            "a training step with dropout, in times the step without: "
            + "; ".join(
                f"{impl} ({entry['results'][impl]['dropout_calls']} dropouts) "
                + ", ".join(f"{p} {ratio:.2f}x" for p, ratio in cost.items())
                for impl, cost in entry["dropout_cost"].items()
            )
        )
    if entry["memory"]:
        print_memory(entry["memory"])


def print_report(result: dict) -> None:
    ceiling = result["ceiling"]
    print()
    if result["smoke"]:
        print("SMOKE RUN: tiny shapes, plumbing only; the numbers mean nothing")
    env = result["environment"]
    print(
        f"{env.get('gpu', env['cpu'])}, {env['threads']} threads, torch {env['torch']}, freed memory kept for reuse: {env['freed_memory_kept']}"
    )
    first = next(iter(ceiling.values()))
    rounds = len(first["by_library"][first["library"]]["gflops_rounds"])
    print(
        f"ceiling ({first['matmul_size']}x{first['matmul_size']} matmul, the faster library, median of {rounds} rounds) on "
        f"{env['instruction_set']} (native bf16: {'yes' if env['native_bf16'] else 'no'}): "
        + ", ".join(f"{p} {_describe_ceiling(c)}" for p, c in ceiling.items())
    )
    print(env["fast_paths"])
    print("images/s, median over rounds (percentage of the FLOP-bound limit the ceiling implies)")
    timed = cells_of(list(ceiling), result["args"]["dropout"])
    for name, entry in result["configs"].items():
        print_shape(name, entry, timed)


# ---------------------------------------------------------------------------------------------
# The command line


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    _what_to_time(p.add_argument)
    _how_to_time(p.add_argument)
    p.add_argument("--memory_worker", help=argparse.SUPPRESS)
    return p


def _what_to_time(add) -> None:
    add(
        "--configs",
        nargs="+",
        choices=list(SHAPES),
        default=list(SHAPES),
        help="shapes to run (default: all)",
    )
    add("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: CUDA when present")
    add(
        "--dtypes",
        nargs="+",
        choices=list(DTYPES),
        help="precisions to time (default: fp32, and bf16 where the hardware runs it natively)",
    )
    add(
        "--dropout",
        type=float,
        default=0.1,
        help="hidden dropout of the train+drop cells (default 0.1, the "
        "tutorial's; 0: no such cells)",
    )
    add(
        "--memory",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="measure training memory in subprocesses (default: on, off with --quick)",
    )
    add(
        "--quick",
        action="store_true",
        help="Ti/4-32 only, 2 rounds of one iteration, one warm-up, no memory",
    )
    add(
        "--smoke",
        action="store_true",
        help="tiny shapes, 1 round: checks that everything runs, measures nothing",
    )
    add("--json", type=Path, help="write every number to this JSON file")


def _how_to_time(add) -> None:
    add(
        "--threads",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help="torch.set_num_threads (default: all cores)",
    )
    add("--rounds", type=int, default=5, help="timed rounds; the median is reported (default 5)")
    add(
        "--warmup",
        type=int,
        default=2,
        help="untimed iterations per cell before the rounds (default 2)",
    )
    add(
        "--min_seconds",
        type=float,
        default=1.0,
        help="each measurement repeats a cell until the fastest implementation takes this long",
    )
    add(
        "--matmul_size",
        type=int,
        default=4096,
        help="side of the square matrices of the ceiling (default 4096)",
    )
    add(
        "--keep_freed_memory",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="malloc keeps freed "
        "memory for reuse, as under the `vitlab` command (vitlab.keep_freed_memory), for every implementation "
        "alike (default: on)",
    )


def settle(args: argparse.Namespace) -> None:
    """The defaults that depend on the machine or on --quick and --smoke."""
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.skipped_bf16 = args.dtypes is None and not fastpaths.native_bf16(torch.device(args.device))
    if args.dtypes is None:
        args.dtypes = ["fp32"] if args.skipped_bf16 else ["fp32", "bf16"]
    if args.quick:
        args.configs, args.rounds, args.warmup, args.min_seconds = ["Ti/4-32"], 2, 1, 0.0
    if args.smoke:
        args.rounds, args.warmup, args.min_seconds, args.matmul_size = 1, 1, 0.0, 256
    if args.memory is None:
        args.memory = not args.quick


def main() -> None:
    args = parser().parse_args()
    args.freed_memory_kept = args.keep_freed_memory and vitlab.keep_freed_memory()
    if args.memory_worker:
        print(json.dumps(memory_worker(json.loads(args.memory_worker))))
        return
    settle(args)
    torch.set_num_threads(args.threads)
    result = run(args)
    print_report(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()

"""vitlab's Vision Transformer against timm, torchvision and transformers, on the same shapes.

Run from the repository root, in the project's environment (timm and transformers come with `.[test]`):

    python benchmarks/models.py                                  # both shapes, 5 rounds, GPU if there is one
    python benchmarks/models.py --quick                          # a minute or two on a 2-core CPU: Ti/4-32, 2 rounds
    python benchmarks/models.py --configs B/16 --rounds 7 --device cpu --threads 8 --json results/models.json
    python benchmarks/models.py --smoke                          # a few seconds: tiny shapes, checks the plumbing only

What it measures. Two shapes, each built by every implementation with random weights, 10 classes and
dropout off: "B/16" (ViT-B/16 at 224 px, batch 16: the tutorial's fine-tuning) and "Ti/4-32" (width 192,
depth 12, 3 heads, MLP 768, patch 4 at 32 px, batch 256: training from scratch). Four cells each:
  infer fp32 / infer bf16   eval(), torch.inference_mode, one forward pass of the batch
  train fp32 / train bf16   train(), forward, cross-entropy, backward, SGD (momentum 0.9) update, zero_grad
bf16 is torch.autocast (vitlab.runtime.autocast) over fp32 weights, as `vitlab train --precision bf16`; it is
left out by default where the hardware only emulates it (an AVX2 CPU: minutes per cell), `--dtypes` to choose.
Each library keeps its own details (LayerNorm eps, attention kernel); the shapes and the parameter counts
(printed) are the same, and so is the GELU: the exact (erf) form, every peer's and the tutorial's. Where Google
released weights of the shape (B/16), a second vitlab row, "vitlab-tanh", times vitlab with the tanh GELU those
weights were trained with, vitlab's default for them; the ratio to the best peer is the first row's.

How. Every implementation is built and warmed up first (excluded from timing), then --rounds rounds; each
round times every cell of every implementation for the same number of iterations, in an order rotated
from round to round so that drift on the machine hits all of them alike (time.perf_counter, CUDA
synchronised). The result is the median images/s over rounds, and vitlab's ratio to the fastest peer.
Each round also times a square matrix product in fp32 and bf16 (the faster of torch.mm and, on x86 CPUs,
oneDNN's matmul), the machine's practical ceiling; every result is shown as a percentage of the FLOP-bound
limit that ceiling implies: images/s x FLOPs per image / ceiling. FLOPs per image count each multiply-add
as 2 of a ViT forward (patch embedding, qkv, attention scores and weighted sum, output projection, MLP,
head; norms, softmax and GELU left out); a training step counts 3x the forward. Peak memory of a training
step runs each implementation in a fresh subprocess:
on CUDA torch.cuda.max_memory_allocated, on a CPU the peak resident set (VmHWM, reset after the model is
built), each minus the memory after the model, optimizer and batch were created; the output says which.
Every implementation runs in a process where vitlab was imported before torch, so torch's CPU allocator
uses transparent huge pages for all of them alike (THP_MEM_ALLOC_ENABLE=1 unless set otherwise), and, unless
--no-keep_freed_memory, where malloc keeps freed memory for reuse (vitlab.keep_freed_memory), as under the
`vitlab` command: for every implementation alike, the memory subprocesses included.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import vitlab  # before torch: vitlab turns torch's huge-page allocator on, for every implementation alike

# isort: split
import torch
import torch.nn.functional as F

from vitlab import fastpaths
from vitlab.fastpaths import onednn_linear, onednn_linear_works
from vitlab.runtime import autocast

NUM_CLASSES = 10
TRAIN_FLOPS_FACTOR = 3  # a training step: the forward, and a backward of about twice its work (input and weight gradients)
LEARNING_RATE = 1e-3  # any small value: the weights move, the work per step does not depend on it
MOMENTUM = 0.9
PEERS = ("timm", "torchvision", "transformers")
# vitlab-tanh: vitlab with the tanh GELU, for shapes with official weights
IMPLEMENTATIONS = (
    "vitlab",
    "vitlab-tanh",
    *PEERS,
)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def cells_of(dtypes: list[str]) -> list[str]:
    """The timed cells: inference and a training step in each precision."""
    return [f"{mode} {d}" for mode in ("infer", "train") for d in dtypes]


@dataclass(frozen=True)
class Shape:
    vitlab_variant: str  # the vitlab variant the shape starts from (the rest overridden below)
    img_size: int
    patch_size: int
    width: int
    depth: int
    heads: int
    mlp_dim: int
    batch: int
    about: str
    official_weights: bool  # Google released weights of this shape: also time vitlab with their tanh GELU (vitlab-tanh)

    @property
    def patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2


SHAPES = {
    "B/16": Shape(
        "B/16", 224, 16, 768, 12, 12, 3072, 16, "ViT-B/16, the tutorial's fine-tuning shape", True
    ),
    "Ti/4-32": Shape(
        "Ti/16", 32, 4, 192, 12, 3, 768, 256, "ViT-Ti at patch 4, training from scratch", False
    ),
}
# --smoke: the same code on tiny models, for a check of the plumbing
SMOKE_CHANGES = {
    "depth": 1,
    "batch": 2,
}


def forward_flops(s: Shape) -> float:
    """FLOPs (2 per multiply-add) of one image's forward pass; norms, softmax, GELU and residual adds left out."""
    tokens = s.patches + 1  # and the class token
    D = s.width
    embed = s.patches * (3 * s.patch_size**2) * D
    block = (
        tokens * D * 3 * D  # qkv
        + tokens * tokens * D  # attention scores, all heads
        + tokens * tokens * D  # weighted sum of the values
        + tokens * D * D  # output projection
        + 2 * tokens * D * s.mlp_dim  # MLP, two layers
    )
    head = D * NUM_CLASSES
    return 2.0 * (embed + s.depth * block + head)


# ---------------------------------------------------------------------------------------------
# The implementations, each returning (module, forward: images -> logits, how it computes attention)


def build(impl: str, s: Shape):
    if impl in ("vitlab", "vitlab-tanh"):
        from vitlab import create_model

        gelu = "tanh" if impl == "vitlab-tanh" else "exact"
        model = create_model(
            s.vitlab_variant,
            img_size=s.img_size,
            patch_size=s.patch_size,
            hidden_size=s.width,
            depth=s.depth,
            num_heads=s.heads,
            mlp_dim=s.mlp_dim,
            num_classes=NUM_CLASSES,
            dropout_rate=0.0,
            gelu=gelu,
        )
        return (
            model,
            model,
            f"{gelu} GELU, attention_impl={model.config.attention_impl} (the fast paths line says which kernel)",
        )
    if impl == "timm":
        from timm.models.vision_transformer import VisionTransformer

        model = VisionTransformer(
            img_size=s.img_size,
            patch_size=s.patch_size,
            num_classes=NUM_CLASSES,
            embed_dim=s.width,
            depth=s.depth,
            num_heads=s.heads,
            mlp_ratio=s.mlp_dim / s.width,
        )
        return (
            model,
            model,
            "F.scaled_dot_product_attention"
            if model.blocks[0].attn.fused_attn
            else "explicit softmax",
        )
    if impl == "torchvision":
        from torchvision.models.vision_transformer import VisionTransformer

        model = VisionTransformer(
            s.img_size, s.patch_size, s.depth, s.heads, s.width, s.mlp_dim, num_classes=NUM_CLASSES
        )
        return model, model, "nn.MultiheadAttention"
    if impl == "transformers":
        from transformers import ViTConfig, ViTForImageClassification

        config = ViTConfig(
            hidden_size=s.width,
            num_hidden_layers=s.depth,
            num_attention_heads=s.heads,
            intermediate_size=s.mlp_dim,
            image_size=s.img_size,
            patch_size=s.patch_size,
            num_labels=NUM_CLASSES,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
        model = ViTForImageClassification(config)
        return (
            model,
            lambda images: model(pixel_values=images).logits,
            f"attn_implementation={model.config._attn_implementation}",
        )
    raise ValueError(f"unknown implementation {impl!r}")


def available(impl: str) -> bool:
    # Each implementation is the package of its name
    return importlib.util.find_spec(impl.split("-")[0]) is not None


def timed_on(shape: Shape, impls: list[str]) -> list[str]:
    """The implementations timed on a shape: vitlab-tanh only where official weights of the shape exist."""
    return [i for i in impls if i != "vitlab-tanh" or shape.official_weights]


class Runner:
    """One implementation at one shape: its model, SGD optimizer and a fixed random batch on the device."""

    def __init__(self, impl: str, shape: Shape, device: torch.device, seed: int = 0):
        torch.manual_seed(seed)
        self.model, self.forward, self.attention = build(impl, shape)
        self.model.to(device)
        self.device = device
        g = torch.Generator().manual_seed(seed)
        # In [-1, 1]
        self.images = (
            torch.rand(shape.batch, 3, shape.img_size, shape.img_size, generator=g)
            .mul_(2)
            .sub_(1)
            .to(device)
        )
        self.labels = torch.randint(0, NUM_CLASSES, (shape.batch,), generator=g).to(device)
        self.optimizer = torch.optim.SGD(
            self.model.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM
        )
        self.params = sum(p.numel() for p in self.model.parameters())

    def infer(self, precision: str) -> None:
        with torch.inference_mode(), autocast(self.device, precision):
            self.forward(self.images)

    def train_step(self, precision: str) -> None:
        with autocast(self.device, precision):
            logits = self.forward(self.images)
            loss = F.cross_entropy(logits.float(), self.labels)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def seconds(self, cell: str, iterations: int) -> float:
        """Wall time of `iterations` repetitions of a cell, the device synchronised at both ends."""
        mode, precision = cell.split()
        self.model.train(mode == "train")
        run = self.train_step if mode == "train" else self.infer
        synchronize(self.device)
        start = time.perf_counter()
        for _ in range(iterations):
            run(precision)
        synchronize(self.device)
        return time.perf_counter() - start


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------
# The machine's ceiling: a large square matrix product


class Ceiling:
    """The faster of two libraries' square matrix product: torch.mm (MKL for fp32 on x86 CPUs, oneDNN for bf16,
    cuBLAS on GPUs) and, where vitlab's linear layers use it (x86 CPUs), oneDNN's matmul, which ran fp32 about a
    fifth faster than MKL on this AMD machine. A ceiling below what a model's own matmuls reach would flatter
    every share."""

    def __init__(self, size: int, device: torch.device, min_seconds: float, dtypes: list[str]):
        g = torch.Generator().manual_seed(0)
        self.size, self.device = size, device
        self.operands = {
            p: [torch.randn(size, size, generator=g).to(device, DTYPES[p]) for _ in range(2)]
            for p in dtypes
        }
        self.products = {p: {"torch.mm": torch.mm} for p in dtypes}
        # oneDNN wherever it runs correctly, whether or not vitlab's policy uses it on this CPU
        for p in dtypes:
            if device.type == "cpu" and onednn_linear_works(DTYPES[p]):
                # A @ b.T: as many FLOPs
                self.products[p]["oneDNN"] = lambda a, b: onednn_linear(a, b, None)
        self.repeats = {
            (p, lib): max(
                1, math.ceil(min_seconds / self._seconds(p, lib, 1))
            )  # the first call warms up
            for p in self.operands
            for lib in self.products[p]
        }

    def _seconds(self, precision: str, library: str, repeats: int) -> float:
        a, b = self.operands[precision]
        product = self.products[precision][library]
        synchronize(self.device)
        start = time.perf_counter()
        for _ in range(repeats):
            product(a, b)
        synchronize(self.device)
        return time.perf_counter() - start

    def gflops(self, precision: str) -> dict[str, float]:
        """GFLOP/s of each library's product."""
        return {
            lib: 2
            * self.size**3
            * self.repeats[precision, lib]
            / self._seconds(precision, lib, self.repeats[precision, lib])
            / 1e9
            for lib in self.products[precision]
        }


# ---------------------------------------------------------------------------------------------
# Peak memory of a training step, in a fresh process per implementation


def _status_kib(key: str) -> int:
    return int(
        re.search(
            rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE
        ).group(1)
    )


def memory_worker(request: dict) -> dict:
    """Runs in the subprocess: build, note the memory, two training steps, report the peak above it."""
    device = torch.device(request["device"])
    torch.set_num_threads(request["threads"])
    runner = Runner(request["impl"], Shape(**request["shape"]), device)
    steps = 2  # the first also allocates the gradients and momentum buffers; the second is a steady step
    if device.type == "cuda":
        synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        for _ in range(steps):
            runner.train_step(request["precision"])
        synchronize(device)
        peak, method = (
            torch.cuda.max_memory_allocated(device),
            "torch.cuda.max_memory_allocated above the allocation after the model, optimizer and batch were created",
        )
    elif Path("/proc/self/status").exists():  # Linux
        base = _status_kib("VmRSS") * 1024
        try:
            # Resets the peak resident set (VmHWM) to the current one
            Path("/proc/self/clear_refs").write_text("5")
            method = "peak resident set (VmHWM, reset after creation) above the RSS after the model, optimizer and batch were created"
        except OSError:
            method = "peak resident set (VmHWM, not resettable here: may include creation) above the RSS after creation"
        for _ in range(steps):
            runner.train_step(request["precision"])
        peak = _status_kib("VmHWM") * 1024
    else:  # elsewhere only the peak so far: ru_maxrss (bytes on macOS) after creation, and after the steps
        unit = 1 if sys.platform == "darwin" else 1024
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit
        for _ in range(steps):
            runner.train_step(request["precision"])
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit
        method = "peak resident set (ru_maxrss) after the steps minus its value after creation"
    return {"peak_mib": (peak - base) / 2**20, "method": method, "steps": steps}


def measure_memory(impl: str, shape: Shape, precision: str, args: argparse.Namespace) -> dict:
    request = {
        "impl": impl,
        "shape": asdict(shape),
        "precision": precision,
        "device": args.device,
        "threads": args.threads,
    }
    keep = "--keep_freed_memory" if args.keep_freed_memory else "--no-keep_freed_memory"
    done = subprocess.run(
        [sys.executable, __file__, keep, "--memory_worker", json.dumps(request)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# The run


def environment(device: torch.device, threads: int, freed_memory_kept: bool) -> dict:
    info = {
        "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE"),
        "freed_memory_kept": freed_memory_kept,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": device.type,
        "threads": threads,
        "cpu": platform.processor() or platform.machine(),
        "instruction_set": fastpaths.instruction_set(),
        "native_bf16": fastpaths.native_bf16(device),
        "fast_paths": fastpaths.describe(device),
    }
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        found = re.search(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), re.MULTILINE)
        info["cpu"] = found.group(1) if found else info["cpu"]
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    for name in PEERS:
        if available(name):
            info[name] = __import__(name).__version__
    return info


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    impls = [i for i in IMPLEMENTATIONS if available(i)]
    skipped = [i for i in IMPLEMENTATIONS if i not in impls]
    shapes = {
        name: replace(SHAPES[name], **SMOKE_CHANGES) if args.smoke else SHAPES[name]
        for name in args.configs
    }
    print(
        f"device {device}, {args.threads} threads, torch {torch.__version__}, freed memory kept for reuse: {args.freed_memory_kept}"
        + (f"; not installed: {', '.join(skipped)}" if skipped else "")
    )
    print(fastpaths.describe(device))
    if args.skipped_bf16:
        print(
            f"bf16 left out: {device.type} has no native bf16 here ({fastpaths.instruction_set()}), where a cell takes minutes; --dtypes fp32 bf16 to time it anyway"
        )
    timed = cells_of(args.dtypes)
    if args.smoke:
        print("SMOKE RUN: tiny shapes, plumbing only; the numbers mean nothing")

    ceiling = Ceiling(args.matmul_size, device, args.min_seconds, args.dtypes)
    runners, iterations = {}, {}
    for name, shape in shapes.items():
        for impl in timed_on(shape, impls):
            runner = runners[name, impl] = Runner(impl, shape, device)
            for cell in timed:
                runner.seconds(cell, args.warmup)
        for cell in timed:  # as many iterations for every implementation, enough for the fastest to last min_seconds
            fastest = (
                min(runners[name, impl].seconds(cell, 1) for impl in timed_on(shape, impls))
                if args.min_seconds > 0
                else math.inf
            )
            iterations[name, cell] = max(1, math.ceil(args.min_seconds / fastest))
        print(
            f"built and warmed up {name}: {', '.join(f'{c} x{iterations[name, c]}' for c in timed)} per measurement"
        )

    ceiling_rounds = {p: [] for p in args.dtypes}
    rates = {
        (name, impl, cell): []
        for name, shape in shapes.items()
        for impl in timed_on(shape, impls)
        for cell in timed
    }
    for r in range(args.rounds):
        for precision, gflops in ceiling_rounds.items():
            gflops.append(ceiling.gflops(precision))
        order = impls[r % len(impls) :] + impls[: r % len(impls)]  # rotated each round
        for name, shape in shapes.items():
            for cell in timed:
                for impl in timed_on(shape, order):
                    n = iterations[name, cell]
                    rates[name, impl, cell].append(
                        n * shape.batch / runners[name, impl].seconds(cell, n)
                    )
        print(f"round {r + 1}/{args.rounds} done")

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
    peak = {p: c["gflops_median"] for p, c in ceilings.items()}
    result = {
        "environment": environment(device, args.threads, args.freed_memory_kept),
        "args": vars(args),
        "smoke": args.smoke,
        "ceiling": ceilings,
        "configs": {},
    }
    for name, shape in shapes.items():
        flops = forward_flops(shape)
        entry = {
            "shape": asdict(shape),
            "forward_gflop_per_image": flops / 1e9,
            "results": {},
            "vitlab_vs_best_peer": {},
            "memory": {},
        }
        for impl in timed_on(shape, impls):
            cells = {}
            for cell in timed:
                mode, precision = cell.split()
                median = statistics.median(rates[name, impl, cell])
                cell_flops = flops * (TRAIN_FLOPS_FACTOR if mode == "train" else 1)
                cells[cell] = {
                    "images_per_second": median,
                    "rounds": rates[name, impl, cell],
                    "percent_of_flop_limit": 100 * median * cell_flops / (peak[precision] * 1e9),
                }
            entry["results"][impl] = {
                "parameters": runners[name, impl].params,
                "attention": runners[name, impl].attention,
                "cells": cells,
            }
        peers = [i for i in impls if i in PEERS]
        if "vitlab" in impls and peers:
            for cell in timed:
                best = max(
                    peers, key=lambda i: entry["results"][i]["cells"][cell]["images_per_second"]
                )
                ratio = (
                    entry["results"]["vitlab"]["cells"][cell]["images_per_second"]
                    / entry["results"][best]["cells"][cell]["images_per_second"]
                )
                entry["vitlab_vs_best_peer"][cell] = {"ratio": ratio, "best_peer": best}
        result["configs"][name] = entry
    runners.clear()  # free the models before the memory subprocesses run
    if args.memory:
        for name, shape in shapes.items():
            for impl in timed_on(shape, impls):
                result["configs"][name]["memory"][impl] = {
                    p: measure_memory(impl, shape, p, args) for p in args.dtypes
                }
                print(f"memory of {name} {impl} measured")
    return result


def _figure(images_per_second: float) -> str:
    """At least three significant figures: B/16 trains at under 2 images/s, where one decimal hides the ratios."""
    decimals = 2 if images_per_second < 10 else 1 if images_per_second < 100 else 0
    return f"{images_per_second:.{decimals}f}"


def print_report(result: dict) -> None:
    ceiling = result["ceiling"]
    print()
    if result["smoke"]:
        print("SMOKE RUN: tiny shapes, plumbing only; the numbers mean nothing")
    env = result["environment"]
    print(
        f"{env.get('gpu', env['cpu'])}, {env['threads']} threads, torch {env['torch']}, freed memory kept for reuse: {env['freed_memory_kept']}"
    )

    def describe(c: dict) -> str:
        others = ", ".join(
            f"{lib} {v['gflops_median']:.0f}"
            for lib, v in c["by_library"].items()
            if lib != c["library"]
        )
        return f"{c['gflops_median']:.0f} GFLOP/s ({c['library']}" + (
            f"; {others})" if others else ")"
        )

    first = next(iter(ceiling.values()))
    rounds = len(first["by_library"][first["library"]]["gflops_rounds"])
    timed = cells_of(list(ceiling))
    print(
        f"ceiling ({first['matmul_size']}x{first['matmul_size']} matmul, the faster library, median of {rounds} rounds) on "
        f"{env['instruction_set']} (native bf16: {'yes' if env['native_bf16'] else 'no'}): "
        + ", ".join(f"{p} {describe(c)}" for p, c in ceiling.items())
    )
    print(env["fast_paths"])
    print("images/s, median over rounds (percentage of the FLOP-bound limit the ceiling implies)")
    for name, entry in result["configs"].items():
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
        if entry["memory"]:
            methods = {
                m.get("method")
                for per in entry["memory"].values()
                for m in per.values()
                if "method" in m
            }
            print(f"peak memory of a training step, MiB ({'; '.join(sorted(methods))})")
            for impl, per in entry["memory"].items():
                print(
                    f"{impl:<18}"
                    + "".join(
                        f"{p}: "
                        + (f"{m['peak_mib']:>8.0f}" if "peak_mib" in m else m["error"])
                        + "   "
                        for p, m in per.items()
                    )
                )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--configs",
        nargs="+",
        choices=list(SHAPES),
        default=list(SHAPES),
        help="shapes to run (default: all)",
    )
    parser.add_argument(
        "--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: CUDA when present"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help="torch.set_num_threads (default: all cores)",
    )
    parser.add_argument(
        "--rounds", type=int, default=5, help="timed rounds; the median is reported (default 5)"
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=2,
        help="untimed iterations per cell before the rounds (default 2)",
    )
    parser.add_argument(
        "--min_seconds",
        type=float,
        default=1.0,
        help="each measurement repeats a cell until the fastest implementation takes this long",
    )
    parser.add_argument(
        "--matmul_size",
        type=int,
        default=4096,
        help="side of the square matrices of the ceiling (default 4096)",
    )
    parser.add_argument(
        "--memory",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="measure training memory in subprocesses (default: on, off with --quick)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="Ti/4-32 only, 2 rounds of one iteration, one warm-up, no memory",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny shapes, 1 round: checks that everything runs, measures nothing",
    )
    parser.add_argument("--json", type=Path, help="write every number to this JSON file")
    parser.add_argument(
        "--keep_freed_memory",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="malloc keeps freed memory for reuse, as under the `vitlab` command (vitlab.keep_freed_memory), for every "
        "implementation alike (default: on)",
    )
    parser.add_argument(
        "--dtypes",
        nargs="+",
        choices=list(DTYPES),
        help="precisions to time (default: fp32, and bf16 where the hardware runs it natively)",
    )
    parser.add_argument("--memory_worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.freed_memory_kept = args.keep_freed_memory and vitlab.keep_freed_memory()
    if args.memory_worker:
        print(json.dumps(memory_worker(json.loads(args.memory_worker))))
        return
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
    torch.set_num_threads(args.threads)
    result = run(args)
    print_report(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()

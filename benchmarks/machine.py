"""The machine, what it can do and what a step costs it, for benchmarks/models.py: its description, the ceiling
(a large square matrix product, the faster library's) and the peak memory of a training step, measured in a fresh
process per implementation (on CUDA torch.cuda.max_memory_allocated, on a CPU the peak resident set, VmHWM, reset
after the model is built; each minus the memory after the model, optimizer and batch were created)."""

from __future__ import annotations

import json
import math
import os
import platform
import re
import resource
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from vitlab import fastpaths
from vitlab.fastpaths import onednn_linear, onednn_linear_works

from peers import PEERS, Runner, Shape, available, set_dropout, synchronize

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


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
    runner = Runner(request["impl"], Shape(**request["shape"]), device, dropout=0.0)
    runner.model.train()
    set_dropout(runner.model, 0.0)
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


def measure_memory(script: str, impl: str, shape: Shape, precision: str, args) -> dict:
    """The peak memory of `impl`'s training step, from `script --memory_worker` in a fresh process."""
    request = {
        "impl": impl,
        "shape": asdict(shape),
        "precision": precision,
        "device": args.device,
        "threads": args.threads,
    }
    keep = "--keep_freed_memory" if args.keep_freed_memory else "--no-keep_freed_memory"
    done = subprocess.run(
        [sys.executable, script, keep, "--memory_worker", json.dumps(request)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def print_memory(memory: dict) -> None:
    methods = {m.get("method") for per in memory.values() for m in per.values() if "method" in m}
    print(f"peak memory of a training step, MiB ({'; '.join(sorted(methods))})")
    for impl, per in memory.items():
        cells = (
            f"{p}: " + (f"{m['peak_mib']:>8.0f}" if "peak_mib" in m else m["error"])
            for p, m in per.items()
        )
        print(f"{impl:<18}" + "   ".join(cells))

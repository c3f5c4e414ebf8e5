"""Where and how a job runs: what the machine's CPU does natively, one device resolver and one
precision vocabulary for every command, autocast, the processes of a multi-process (torchrun) run,
how many images of a training batch fit the device's memory at once, and the heap that the
`vitlab` command keeps."""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import platform
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ConfigError, VitlabWarning

# ---------------------------------------------------------------------------------------------
# The machine


def instruction_set() -> str:
    """torch's CPU kernel level: "AVX512", "AVX2", "DEFAULT" (or an ARM/POWER level).
    ATEN_CPU_CAPABILITY lowers it, and ONEDNN_MAX_CPU_ISA=AVX2 caps oneDNN too: both are honoured,
    so that setting them imitates an older CPU faithfully."""
    level = torch.backends.cpu.get_cpu_capability()
    onednn_cap = os.environ.get(
        "ONEDNN_MAX_CPU_ISA", os.environ.get("DNNL_MAX_CPU_ISA", "ALL")
    ).upper()
    if level.startswith("AVX512") and not (
        onednn_cap == "ALL" or onednn_cap.startswith(("AVX512", "AVX10", "AMX"))
    ):
        return "AVX2"
    return level


def native_bf16(device: torch.device) -> bool:
    """Whether `device` runs bf16 matmuls in hardware: a GPU with bf16, or an x86 CPU with AVX-512
    BF16 or AMX. Elsewhere bf16 is emulated, about 100x slower than fp32 on an AVX2 CPU (0.7 against
    67 GFLOP/s)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu" or not instruction_set().startswith("AVX512"):
        return False
    # torch's probes are private; a torch without them is taken to have neither feature.
    probes = (
        getattr(torch.cpu, "_is_avx512_bf16_supported", None),
        getattr(torch.cpu, "_is_amx_tile_supported", None),
    )
    return any(probe() for probe in probes if probe is not None)


# ---------------------------------------------------------------------------------------------
# Devices and precision

DEVICES_HELP = "auto (a GPU when there is one), cpu, cuda (this process's GPU) or cuda:N"
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
PRECISIONS_HELP = (
    "auto: bf16 where the hardware runs it natively (a GPU with bf16, a CPU with AVX-512 BF16 or "
    "AMX), else fp32"
)


def resolve_device(name: str, local_rank: int = -1) -> torch.device:
    """The device named by `name`; under torchrun (`local_rank` >= 0) 'auto' and 'cuda' mean this
    process's GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r}: choose {DEVICES_HELP}") from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type != "cuda":
        raise ConfigError(f"--device {name!r}: choose {DEVICES_HELP}")
    if not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine")
    if device.index is None:
        device = torch.device(
            "cuda", local_rank if local_rank >= 0 else torch.cuda.current_device()
        )
    if device.index >= torch.cuda.device_count():
        raise ConfigError(
            f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s), cuda:0 to "
            f"cuda:{torch.cuda.device_count() - 1}"
        )
    return device


def resolve_precision(requested: str, device: torch.device) -> str:
    """'fp32', 'bf16' or 'fp16' for `requested` on `device`: 'auto' is bf16 where it is native, else
    fp32. bf16 asked for where it is emulated runs, with a warning; fp16 needs CUDA."""
    if requested not in PRECISIONS:
        raise ConfigError(f"--precision {requested!r}: choose {', '.join(PRECISIONS)}")
    if requested == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    if requested == "fp16" and device.type != "cuda":
        raise ConfigError(
            "--precision fp16 needs a CUDA device; on a CPU use --precision bf16 or auto"
        )
    if requested == "bf16" and not native_bf16(device):
        where = (
            f"this CPU ({instruction_set()})"
            if device.type == "cpu"
            else f"this GPU ({torch.cuda.get_device_name(device)})"
        )
        warnings.warn(
            f"bf16 is emulated on {where}, many times slower than fp32; --precision auto picks "
            "fp32 here",
            VitlabWarning,
            stacklevel=2,
        )
    return requested


def precision_line(requested: str, resolved: str) -> str:
    """The run's precision and why, for its first lines."""
    if requested != "auto":
        return f"precision {resolved}"
    why = "bf16 runs natively here" if resolved == "bf16" else "bf16 is not native here"
    return f"precision {resolved} (auto: {why}; --precision fp32 computes as the tutorial did)"


# The dtype each resolved precision computes in (autocast's; the training batches are made in it).
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: str):
    """The autocast context for a resolved precision: bf16 on CPU or CUDA, fp16 on CUDA, nothing for
    fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])


class Processes:
    """This process's place in a run: its device, and its rank among the processes of torchrun (or
    of the tutorial's torch.distributed.launch, which passes --local_rank), or of none."""

    def __init__(self, device: str, local_rank: int = -1):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.distributed = self.world_size > 1
        self.rank = int(os.environ.get("RANK", "0")) if self.distributed else 0
        local_rank = int(os.environ.get("LOCAL_RANK", local_rank))
        self.device = resolve_device(
            device, local_rank if self.distributed or local_rank >= 0 else -1
        )
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if self.distributed:
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            torch.distributed.init_process_group(
                backend=backend, device_id=self.device if backend == "nccl" else None
            )

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @contextlib.contextmanager
    def main_first(self):
        """Rank 0 runs the block first (downloads into shared folders), then the others, reading
        what it fetched."""
        if self.distributed and not self.is_main:
            torch.distributed.barrier()
        yield
        if self.distributed and self.is_main:
            torch.distributed.barrier()

    def agree(self, signum: int | None) -> int | None:
        """A signal any process received (the largest number), so that all stop at the same step;
        one all-reduce of one number a step, on the device (NCCL reduces only there)."""
        if not self.distributed:
            return signum
        flag = torch.tensor([signum or 0], device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag.item()) or None

    def close(self) -> None:
        if self.distributed:
            torch.distributed.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# Memory: how many images of a training batch fit at once

# A CPU run takes half of the memory available when it starts, shared among the processes on the
# machine; the other half stays with the machine's other programs and the page cache. A GPU run
# takes 85% of the device's free memory: the rest absorbs the caching allocator's fragmentation.
CPU_SHARE, CUDA_SHARE = 0.5, 0.85
# On a CPU a step's peak resident memory exceeds its live tensors: glibc's heap, as the vitlab command
# keeps it (keep_freed_memory, below), fragments. Measured up to 1.59x (B/16 at 224 px in bf16, 8
# micro-batches of 64: benchmarks/RESULTS.md, 2026-12-05).
CPU_HEAP_SLACK = 1.6
# A cgroup without a limit reads "max" (v2) or a number near 2**63 (v1)
_NO_LIMIT = 1 << 60


@dataclass(frozen=True)
class Memory:
    """Bytes free on this process's device, where that figure comes from, and the share of it this
    process may use."""

    available: int
    source: str
    share: float

    @property
    def usable(self) -> float:
        return self.available * self.share


def available_memory(
    device: torch.device, *, meminfo: str = "/proc/meminfo", cgroup: str = "/sys/fs/cgroup"
) -> Memory | None:
    """The device's free memory; on a CPU, the machine's MemAvailable, or the cgroup's limit less
    its usage where that is lower. None where the system does not say (a CPU without /proc)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return Memory(free + cached, f"free on {torch.cuda.get_device_name(device)}", CUDA_SHARE)
    share = CPU_SHARE / int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    found = []
    try:
        fields = dict(line.split(":", 1) for line in Path(meminfo).read_text().splitlines())
        found.append(Memory(int(fields["MemAvailable"].split()[0]) * 1024, "available", share))
    except (OSError, KeyError, ValueError):
        pass
    # v2, then v1; usage counts the cgroup's page cache, so this errs low
    for limit_file, usage_file in (
        ("memory.max", "memory.current"),
        ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes"),
    ):
        try:
            limit = Path(cgroup, limit_file).read_text().strip()
            usage = int(Path(cgroup, usage_file).read_text())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < _NO_LIMIT:
            found.append(Memory(max(int(limit) - usage, 0), "left under the cgroup's limit", share))
        break
    return min(found, key=lambda m: m.available) if found else None


@dataclass(frozen=True, kw_only=True)
class StepMemory:
    """Bytes a training step of one process needs: `fixed` whatever the micro-batch (gradients,
    optimizer state, the update's images, the forward's weight copies), `per_image` for each image
    of a micro-batch (what its forward keeps for the backward, and what a block's backward makes)."""

    fixed: int
    per_image: int


def micro_batches(
    model: torch.nn.Module,
    *,
    batch_size: int,
    at_least: int,
    precision: str,
    previous: int | None = None,
) -> tuple[int, str]:
    """How many micro-batches an update's `batch_size` images (this process's) are split into on the
    model's device, and why (`choose_accumulation`, with the step measured on `model`); a resumed
    run's split, `previous`, is kept where it fits, and a warning says where it is not."""
    device = next(model.parameters()).device
    step = step_memory(model, batch_size=batch_size, precision=precision, device=device)
    steps, line = choose_accumulation(
        batch_size, at_least=at_least, step=step, memory=available_memory(device), previous=previous
    )
    if previous is not None and steps != previous:
        warnings.warn(
            f"the run accumulated {previous} micro-batches an update and goes on with {steps} "
            "here: it will not be bit-exact with an uninterrupted run",
            VitlabWarning,
            stacklevel=2,
        )
    return steps, line


def step_memory(
    model: torch.nn.Module, *, batch_size: int, precision: str, device: torch.device
) -> StepMemory:
    """Measured on the model as it will train: a forward of 1 and of 2 images, with autograd's
    saved tensors counted (their difference is an image's; the rest, weight copies)."""
    saved = [_saved_bytes(model, n, precision=precision, device=device) for n in (1, 2)]
    block = (saved[1] - saved[0]) / model.config.depth
    if model.grad_checkpointing:  # the block that the backward recomputes, unchecked
        try:
            model.grad_checkpointing = False
            # An image's, as above: the weights' copies (bf16 casts, dropout's scaled weights) cancel
            unchecked = [_saved_bytes(model, n, precision=precision, device=device) for n in (1, 2)]
            block = (unchecked[1] - unchecked[0]) / model.config.depth
        finally:
            model.grad_checkpointing = True
    # Each image: what it keeps, and a block's activations and their gradients in the backward
    per_image = saved[1] - saved[0] + 2 * block
    # Gradients and two optimizer tensors a parameter (AdamW's; SGD and Muon keep one), and the
    # update's images with the augmentation's working copies, three in float32
    trained = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    images = 3 * batch_size * 3 * model.config.img_size**2 * 4
    fixed = 3 * trained + 2 * saved[0] - saved[1] + images
    slack = CPU_HEAP_SLACK if device.type == "cpu" else 1.0
    return StepMemory(
        fixed=max(math.ceil(fixed * slack), 0), per_image=max(math.ceil(per_image * slack), 1)
    )


def _saved_bytes(model: torch.nn.Module, n: int, *, precision: str, device: torch.device) -> int:
    """Bytes of the tensors autograd keeps from a training forward of `n` random images, the
    parameters not counted; the random state and the model's mode are left as they were."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in parameters:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    size, training = model.config.img_size, model.training
    try:
        with (
            torch.random.fork_rng(devices=[device.index] if device.type == "cuda" else []),
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
            autocast(device, precision),
        ):
            images = torch.rand(n, 3, size, size, device=device) * 2 - 1
            out = model.train()(images.to(DTYPES[precision]))
        del out
    finally:
        model.train(training)
    return sum(storages.values())


def choose_accumulation(
    batch_size: int,
    *,
    at_least: int,
    step: StepMemory,
    memory: Memory | None,
    previous: int | None = None,
) -> tuple[int, str]:
    """How many micro-batches (of sizes that differ by one at most) an update's `batch_size` images
    are split into, and why: `at_least` of them, and as few as fit `memory`'s usable share with
    `step`'s needs, the largest a power of two when the batch does not fit whole (a small change in
    the memory free then leaves the split as it was); or `previous`, a resumed run's split, where it
    fits and is not fewer than asked."""
    asked = f"--gradient_accumulation_steps {at_least}"
    if memory is None:
        return at_least, f"{asked}: this system does not say how much memory is free"
    fits = int((memory.usable - step.fixed) // step.per_image)
    if previous is not None and previous >= at_least and math.ceil(batch_size / previous) <= fits:
        steps, why = previous, "as the run resumed had it"
    elif math.ceil(batch_size / at_least) <= fits:
        steps, why = at_least, "it fits" if at_least == 1 else f"{asked}; it fits"
    else:
        micro = 2 ** int(math.log2(max(fits, 1)))
        steps, why = max(at_least, math.ceil(batch_size / micro)), "the whole batch would not fit"
    micro = math.ceil(batch_size / steps)
    split = (
        f": {steps} micro-batches of {'' if batch_size % steps == 0 else 'at most '}{micro} "
        f"image{'s' if micro > 1 else ''}, accumulated"
        if steps > 1
        else " in one pass"
    )
    needs = step.fixed + micro * step.per_image
    line = (
        f"batch {batch_size}{split} ({why}; a step needs about {needs / 1e9:.1f} GB of the "
        f"{memory.usable / 1e9:.1f} GB usable, {memory.share:.0%} of the "
        f"{memory.available / 1e9:.1f} GB {memory.source})"
    )
    return steps, line + ("; even one image may not fit" if fits < 1 else "")


# ---------------------------------------------------------------------------------------------
# Memory: the process's heap

_MALLOC_ENV = (
    "MALLOC_MMAP_MAX_",
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_TOP_PAD_",
)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # <malloc.h>
_freed_memory_kept = False


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory in the process for the next allocation rather than
    return it to the OS.

    torch's CPU tensors come from malloc, which serves large blocks with a fresh mmap and unmaps
    them when freed:
    every training step then maps its activations anew and the kernel zeroes each page on first
    touch. With mmap off and up to 2 GiB of free heap kept, a step reuses the last step's memory:
    the patch-4 ViT's fp32 training step went from 138,000 page faults and 6.0 s to 900 and 4.1 s.
    The cost: the process holds its peak memory until it exits, fine for a run of the `vitlab`
    command, which calls this; a library import does not. Returns whether it took effect: Linux with
    glibc only, and not where the user has set malloc's settings (MALLOC_*_ variables,
    GLIBC_TUNABLES glibc.malloc.*)."""
    global _freed_memory_kept
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if any(name in os.environ for name in _MALLOC_ENV) or "glibc.malloc." in os.environ.get(
        "GLIBC_TUNABLES", ""
    ):
        return False
    libc = ctypes.CDLL(None)  # this process's own malloc
    # Arenas stay as they are: capped at one, the threads of timm's bf16 SDPA training step queued
    # on its lock (-40%).
    _freed_memory_kept = bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(
        libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    )
    return _freed_memory_kept


def freed_memory_kept() -> bool:
    """Whether keep_freed_memory took effect in this process."""
    return _freed_memory_kept

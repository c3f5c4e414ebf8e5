"""Where and how a job runs: one device resolver and one precision vocabulary for every command,
autocast, and the processes of a multi-process (torchrun) run."""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import warnings

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
# Memory

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

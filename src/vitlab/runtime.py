"""Where and how a job runs: one device resolver and one precision vocabulary for every command,
autocast, and the processes of a multi-process (torchrun) run."""

from __future__ import annotations

import contextlib
import os
import warnings

import torch

from .errors import ConfigError, VitlabWarning
from .fastpaths import instruction_set, native_bf16

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

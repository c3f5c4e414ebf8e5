"""vitlab: Vision Transformers for image classification, correct to the paper and fast."""

import ctypes
import os
import platform

# torch's CPU allocator on transparent huge pages for tensors of 2 MiB and more: without them every large
# activation or batch is mapped anew in 4 KiB pages and faulted in page by page, which halved the 224 px
# input pipeline and slows training (benchmarks/data.py). torch reads the variable once, at its first
# allocation: it takes effect where vitlab is imported before torch (the `vitlab` command), and a value
# the user set is kept.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

# glibc's own malloc settings; where the user has set any of them, theirs stand.
_MALLOC_ENV = ("MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # <malloc.h>


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory in the process for the next allocation rather than return it to the OS.

    torch's CPU tensors come from malloc, which serves large blocks with a fresh mmap and unmaps them when freed:
    every training step then maps its activations anew and the kernel zeroes each page on first touch. With
    mmap off (large blocks from the heap) and up to 2 GiB of free heap kept, a step reuses the last step's memory:
    the patch-4 ViT's fp32 training step went from 138,000 page faults and 6.0 s to 900 and 4.1 s (README,
    Performance). The cost: the process holds its peak memory until it exits, fine for a run of the `vitlab`
    command, which calls this; a library import does not. Returns whether it took effect: Linux with glibc only,
    and not where the user has set malloc's settings (MALLOC_*_ variables, GLIBC_TUNABLES glibc.malloc.*)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if any(name in os.environ for name in _MALLOC_ENV) or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    libc = ctypes.CDLL(None)  # this process's own malloc
    # Arenas stay as they are: capped at one, the threads of timm's bf16 SDPA training step queued on its lock (-40%).
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


from .checkpoints import OFFICIAL_CHECKPOINTS, CheckpointError, load_official, official_model, save_npz
from .config import VARIANTS, ModelConfig, get_config
from .model import VisionTransformer, create_model

__version__ = "0.1.0"

__all__ = [
    "OFFICIAL_CHECKPOINTS", "CheckpointError", "ModelConfig", "VARIANTS", "VisionTransformer",
    "create_model", "get_config", "keep_freed_memory", "load_official", "official_model", "save_npz",
]  # fmt: skip

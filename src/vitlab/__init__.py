"""vitlab: Vision Transformers for image classification, correct to the paper and fast."""

import os

# torch's CPU allocator on transparent huge pages for tensors of 2 MiB and more: without them every large
# activation or batch is mapped anew in 4 KiB pages and faulted in page by page, which halved the 224 px
# input pipeline and slows training (benchmarks/data.py). torch reads the variable once, at its first
# allocation: it takes effect where vitlab is imported before torch (the `vitlab` command), and a value
# the user set is kept.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from .checkpoints import OFFICIAL_CHECKPOINTS, CheckpointError, load_official, official_model, save_npz
from .config import VARIANTS, ModelConfig, get_config
from .model import VisionTransformer, create_model

__version__ = "0.1.0"

__all__ = [
    "OFFICIAL_CHECKPOINTS", "CheckpointError", "ModelConfig", "VARIANTS", "VisionTransformer",
    "create_model", "get_config", "load_official", "official_model", "save_npz",
]  # fmt: skip

"""vitlab: Vision Transformers for image classification, correct to the paper and fast."""

from . import fastpaths  # first: it sets torch's allocator up before torch allocates anything
from .checkpoints import OFFICIAL_CHECKPOINTS, CheckpointError, load_official, official_model, save_npz
from .config import VARIANTS, ModelConfig, get_config
from .fastpaths import keep_freed_memory
from .model import VisionTransformer, create_model

__version__ = "0.1.0"

__all__ = [
    "OFFICIAL_CHECKPOINTS", "CheckpointError", "ModelConfig", "VARIANTS", "VisionTransformer", "create_model",
    "fastpaths", "get_config", "keep_freed_memory", "load_official", "official_model", "save_npz",
]  # fmt: skip

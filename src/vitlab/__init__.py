"""vitlab: Vision Transformers for image classification, correct to the paper and fast."""

from . import fastpaths  # first: it sets torch's allocator up before torch allocates anything
from .config import VARIANTS, ModelConfig, TrainConfig, get_config
from .errors import CheckpointError, ConfigError, DataError, VitlabError
from .formats.checkpoints import load_model, load_pretrained
from .formats.official import OFFICIAL_CHECKPOINTS, load_official, official_model, save_npz
from .model import VisionTransformer, create_model
from .runtime import keep_freed_memory

__version__ = "0.1.0"

__all__ = [
    "OFFICIAL_CHECKPOINTS",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "ModelConfig",
    "TrainConfig",
    "VARIANTS",
    "VisionTransformer",
    "VitlabError",
    "create_model",
    "fastpaths",
    "get_config",
    "keep_freed_memory",
    "load_model",
    "load_official",
    "load_pretrained",
    "official_model",
    "save_npz",
]

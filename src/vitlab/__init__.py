"""vitlab: Vision Transformers for image classification, correct to the paper and fast."""

from .checkpoints import OFFICIAL_CHECKPOINTS, CheckpointError, load_official, official_model, save_npz
from .config import VARIANTS, ModelConfig, get_config
from .model import VisionTransformer, create_model

__version__ = "0.1.0"

__all__ = [
    "OFFICIAL_CHECKPOINTS", "CheckpointError", "ModelConfig", "VARIANTS", "VisionTransformer",
    "create_model", "get_config", "load_official", "official_model", "save_npz",
]  # fmt: skip

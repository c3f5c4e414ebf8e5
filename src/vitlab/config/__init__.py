"""Every setting, declared once: the model's shape (`ModelConfig`, with the variant table, in
`model.py`) and a training run (`TrainConfig`, in `training.py`). Each field carries its default,
its help and, where it takes one of a few names, its choices or range (`fields.py`); the command
line, config files, validation and the model overrides of `vitlab train` are derived from them.
"""

from .fields import AT_LEAST_0, FRACTION, POSITIVE, PROBABILITY, Range, check_fields, field_type
from .model import (
    LEGACY_NAMES,
    MODEL_OVERRIDES,
    VARIANTS,
    ModelConfig,
    all_names,
    canonical_name,
    get_config,
    legacy_name,
)
from .training import DATASETS, TrainConfig

__all__ = [
    "AT_LEAST_0",
    "DATASETS",
    "FRACTION",
    "LEGACY_NAMES",
    "MODEL_OVERRIDES",
    "POSITIVE",
    "PROBABILITY",
    "VARIANTS",
    "ModelConfig",
    "Range",
    "TrainConfig",
    "all_names",
    "canonical_name",
    "check_fields",
    "field_type",
    "get_config",
    "legacy_name",
]

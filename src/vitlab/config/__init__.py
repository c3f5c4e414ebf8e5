"""Every setting, declared once: the model's shape (`ModelConfig` in `model.py`, the variant table in
`variants.py`) and a training run (`TrainConfig`, in `training.py`). Each field carries its default,
its help and, where it takes one of a few names, its choices or range (`fields.py`); the command
line, config files, validation and the model overrides of `vitlab train` are derived from them.
"""

from .fields import AT_LEAST_0, FRACTION, POSITIVE, PROBABILITY, Range, check_fields, field_type
from .model import MODEL_OVERRIDES, ModelConfig
from .training import DATASETS, TrainConfig
from .variants import (
    FAMILY_VARIANTS,
    LEGACY_NAMES,
    PAPER_VARIANTS,
    VARIANTS,
    all_names,
    canonical_name,
    family,
    get_config,
    legacy_name,
)

__all__ = [
    "AT_LEAST_0",
    "DATASETS",
    "FAMILY_VARIANTS",
    "FRACTION",
    "LEGACY_NAMES",
    "MODEL_OVERRIDES",
    "PAPER_VARIANTS",
    "POSITIVE",
    "PROBABILITY",
    "VARIANTS",
    "ModelConfig",
    "Range",
    "TrainConfig",
    "all_names",
    "canonical_name",
    "check_fields",
    "family",
    "field_type",
    "get_config",
    "legacy_name",
]

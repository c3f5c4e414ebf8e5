"""Google's official checkpoints: an `.npz` file of google-research/vision_transformer (or
big_vision) loaded into a model as the official fine-tuning does, or as a ready model; a model
written as one; and the published files by name, fetched once into a cache.

The file format itself (keys, array layout, reading without pickle) is in `official_layout.py`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from ..config import ModelConfig, canonical_name, get_config, legacy_name
from ..errors import CheckpointError
from ..model import VisionTransformer, create_model
from . import sources
from .files import atomic_write, cache_dir, download
from .official_layout import (
    OfficialArrays,
    normalise_keys,
    official_state,
    read_npz,
    to_official_arrays,
)

# ---------------------------------------------------------------------------------------------
# A file into a model, and a model into a file

# What the official code computes that its files do not say: flax's LayerNorm eps and GELU form, the
# final norm before pooling, the hybrid stem's own normalisation, images in [-1, 1]; and none of the
# parts later ViTs added.
OFFICIAL_FUNCTION = {
    "gelu": "tanh",
    "layer_norm_eps": 1e-6,
    "final_norm": "before_pool",
    "stem_norm": "flax",
    "image_mean": (0.5, 0.5, 0.5),
    "image_std": (0.5, 0.5, 0.5),
    "distilled": False,
    "reg_tokens": 0,
    "pos_embed_prefix": True,
    "pre_norm": False,
    "patch_bias": True,
    "layer_scale": None,
    "mlp": "gelu",
}


def not_official(config: ModelConfig) -> dict[str, object]:
    """The fields (with their official values) in which `config` computes otherwise than the
    official code."""
    differ = {
        f: v
        for f, v in OFFICIAL_FUNCTION.items()
        if getattr(config, f) != v and (f != "stem_norm" or config.is_hybrid)
    }
    if config.classifier not in ("token", "gap"):
        differ["classifier"] = "token"
    elif config.has_class_token != (config.classifier == "token"):
        differ["class_token"] = config.classifier == "token"
    return differ


def load_official(
    model: VisionTransformer,
    source: str | os.PathLike | dict,
    verbose: bool = True,
    name: str | None = None,
) -> VisionTransformer:
    """Load an official `.npz` (path, or arrays already read) into `model`, as the official
    fine-tuning does:
    a head for another number of classes stays zero-initialised, a pre-logits layer the model lacks
    is dropped, and position embeddings are resampled to the model's grid. Anything else that does
    not fit, or would make the model compute another function (its heads, the exact GELU), raises
    CheckpointError."""
    name = name or (str(source) if not isinstance(source, dict) else "checkpoint")  # for messages
    config = model.config
    differ = not_official(config)
    if differ:
        theirs = ", ".join(f"--{f} {v}" for f, v in differ.items())
        raise CheckpointError(
            f"{name}: official weights compute with {theirs}; this model differs "
            f"({', '.join(differ)}); pass {theirs}"
        )
    arrays = OfficialArrays(
        normalise_keys(
            read_npz(source, config) if not isinstance(source, dict) else dict(source), config.depth
        ),
        name,
        config,
    )
    head_classes = (
        arrays.arrays["head/kernel"].shape[-1] if "head/kernel" in arrays.arrays else None
    )
    keep_head = head_classes == config.num_classes
    target = model.state_dict()
    state, notes = official_state(arrays, {k: v.shape for k, v in target.items()}, keep_head)
    arrays.check_all_taken()
    if head_classes is not None and not keep_head:
        notes.append(
            f"head of {head_classes} classes replaced by a zero-initialised head of "
            f"{config.num_classes}"
        )
    with torch.no_grad():
        for key, value in state.items():
            target[key].copy_(value)
        if not keep_head:
            model.head.weight.zero_()
            model.head.bias.zero_()
    if verbose and notes:
        print(f"loaded {name}: " + "; ".join(notes))
    return model


def npz_model(path: str | os.PathLike, model_type: str | None) -> VisionTransformer:
    """An official `.npz` file as a ready model, its shape read from the file: the variant
    (`model_type`) with the file's classes (head size), image size (position grid times the patch),
    pre-logits width and classifier."""
    if model_type is None:
        raise CheckpointError(
            f"{path}: an official .npz file needs its variant, e.g. --model_type B/16"
        )
    base = get_config(model_type)
    # Read once, for the shape and the weights
    arrays = normalise_keys(read_npz(path, base), base.depth)
    head, pos_embed = (
        arrays.get("head/bias"),
        arrays.get("Transformer/posembed_input/pos_embedding"),
    )
    if head is None or pos_embed is None:
        raise CheckpointError(
            f"{path}: no head or position embeddings; not an official ViT classifier checkpoint"
        )
    prefix = int("cls" in arrays)
    patches = pos_embed.shape[-2] - prefix
    grid = math.isqrt(patches)
    if grid * grid != patches:
        raise CheckpointError(
            f"{path}: position embeddings of {patches} patches are not a square grid"
        )
    pre_logits = arrays.get("pre_logits/bias")
    config = base.replace(
        num_classes=head.shape[-1],
        img_size=grid * base.patch_size,
        classifier="token" if prefix else "gap",
        class_token=None,
        representation_size=pre_logits.shape[-1] if pre_logits is not None else None,
        dropout_rate=0.0,
    )
    return load_official(VisionTransformer(config), arrays, verbose=False, name=str(path))


def save_npz(model: VisionTransformer, path: str | os.PathLike) -> None:
    arrays = to_official_arrays(model)
    atomic_write(path, lambda f: np.savez(f, **arrays))


def class_names(num_classes: int) -> list[str]:
    """The ImageNet-1k names (the package's imagenet_classes.txt) for an official 1000-class head;
    "class N" for ImageNet-21k, whose names vitlab does not ship."""
    if num_classes == 1000:
        return resources.files("vitlab").joinpath("imagenet_classes.txt").read_text().splitlines()
    return [f"class {i}" for i in range(num_classes)]


# ---------------------------------------------------------------------------------------------
# The published files by name, fetched once into a cache.

_BASE_URL = "https://storage.googleapis.com/vit_models/"


def base_url() -> str:
    return os.environ.get("VITLAB_CHECKPOINT_BASE_URL", _BASE_URL).rstrip("/") + "/"


@dataclass(frozen=True)
class OfficialCheckpoint:
    name: str
    path: str  # under the base URL
    variant: str
    num_classes: int
    img_size: int
    representation_size: int | None = None
    description: str = ""

    @property
    def url(self) -> str:
        return base_url() + self.path

    @property
    def filename(self) -> str:
        return self.path.replace("/", "__")


def _fine_tune(
    name: str, path: str, variant: str, img_size: int, source: str = "ImageNet-21k"
) -> OfficialCheckpoint:
    description = f"{source}, fine-tuned on ImageNet-1k at {img_size} px"
    return OfficialCheckpoint(name, path, variant, 1000, img_size, None, description)


# The paper's files: (name at the source, variant, width of the ImageNet-21k file's pre-logits
# layer, image sizes of its ImageNet-1k fine-tunes).
_PAPER_FILES = (
    ("ViT-B_16", "B/16", 768, (384, 224)),
    ("ViT-B_32", "B/32", 768, (384,)),
    ("ViT-L_16", "L/16", 1024, (384, 224)),
    ("ViT-L_32", "L/32", 1024, (384,)),
    ("ViT-H_14", "H/14", 1280, ()),
    ("R50+ViT-B_16", "R50+B/16", 768, (384,)),
)


def _paper_files() -> list[OfficialCheckpoint]:
    """The paper's ImageNet-21k files (with a pre-logits layer) and their ImageNet-1k fine-tunes,
    those at 384 px beside their source, those at 224 px after them all."""
    entries = []
    for legacy, variant, width, fine_tunes in _PAPER_FILES:
        name = legacy.replace("+", "-")
        path = f"imagenet21k/{legacy}.npz"
        entries.append(OfficialCheckpoint(name, path, variant, 21843, 224, width, "ImageNet-21k"))
        if 384 in fine_tunes:
            path = f"imagenet21k+imagenet2012/{legacy}.npz"
            entries.append(_fine_tune(f"{name}-384", path, variant, 384))
    for legacy, variant, _, fine_tunes in _PAPER_FILES:
        if 224 in fine_tunes:
            path = f"imagenet21k+imagenet2012/{legacy}-224.npz"
            entries.append(_fine_tune(f"{legacy}-224", path, variant, 224))
    return entries


# The recommended AugReg files of Steiner et al. (2021), as listed in vision_transformer's README:
# variant -> (name at the source, augmentation and regularisation, learning rate of the ImageNet-1k
# fine-tune at 224 px; None where the README recommends none).
_AUGREG_FILES = {
    "Ti/16": ("Ti_16", "none-wd_0.03-do_0.0-sd_0.0", "0.03"),
    "S/16": ("S_16", "light1-wd_0.03-do_0.0-sd_0.0", "0.03"),
    "S/32": ("S_32", "light1-wd_0.03-do_0.0-sd_0.0", "0.03"),
    "B/32": ("B_32", "medium1-wd_0.03-do_0.0-sd_0.0", "0.03"),
    "B/16": ("B_16", "medium1-wd_0.1-do_0.0-sd_0.0", "0.01"),
    "B/8": ("B_8", "medium1-wd_0.1-do_0.0-sd_0.0", "0.01"),
    "L/16": ("L_16", "medium1-wd_0.1-do_0.1-sd_0.1", None),
}


def _augreg_files() -> list[OfficialCheckpoint]:
    entries = []
    for variant, (stem, recipe, fine_tune_lr) in _AUGREG_FILES.items():
        base = f"augreg/{stem}-i21k-300ep-lr_0.001-aug_{recipe}"
        entries.append(
            OfficialCheckpoint(
                f"augreg-{stem}", base + ".npz", variant, 21843, 224, None, "AugReg, ImageNet-21k"
            )
        )
        if fine_tune_lr:
            path = f"{base}--imagenet2012-steps_20k-lr_{fine_tune_lr}-res_224.npz"
            entries.append(
                _fine_tune(f"augreg-{stem}-224", path, variant, 224, "AugReg, ImageNet-21k")
            )
    return entries


OFFICIAL_CHECKPOINTS: dict[str, OfficialCheckpoint] = {
    entry.name: entry for entry in [*_paper_files(), *_augreg_files()]
}


def fetch_official(name: str, progress: bool = True) -> Path:
    """Path of the named official checkpoint in the cache, downloading it on first use."""
    entry = OFFICIAL_CHECKPOINTS[name]
    path = cache_dir() / entry.filename
    if not path.is_file():
        download(entry.url, path, progress=progress)
    return path


def default_checkpoint(variant: str) -> str | None:
    """The official checkpoint a variant fine-tunes from by default: the paper's ImageNet-21k file,
    else AugReg's."""
    for entry in OFFICIAL_CHECKPOINTS.values():
        if entry.variant == variant and entry.num_classes == 21843:
            return entry.name
    return None


def official_model(name: str, progress: bool = True) -> VisionTransformer:
    """The named official checkpoint as a ready model, its own head included (e.g. ImageNet-1k)."""
    entry = OFFICIAL_CHECKPOINTS[name]
    model = create_model(
        canonical_name(entry.variant),
        num_classes=entry.num_classes,
        img_size=entry.img_size,
        representation_size=entry.representation_size,
        dropout_rate=0.0,
    )
    return load_official(model, fetch_official(name, progress), verbose=False)


def pretrained_source(pretrained_dir: str, model_type: str) -> str | None:
    """What `vitlab train --pretrained_dir` names: a file path, an official checkpoint name, or None
    for from scratch. "auto" is a family variant's timm repository on the Hub (`sources.py`), else
    the tutorial's checkpoint/<model_type>.npz where it is there, else the variant's official
    ImageNet-21k file."""
    if pretrained_dir.lower() == "none":
        return None
    if pretrained_dir != "auto":
        return pretrained_dir
    hub = sources.default_source(canonical_name(model_type))
    if hub is not None:
        return hub
    local = Path("checkpoint") / f"{legacy_name(canonical_name(model_type))}.npz"
    if local.is_file():
        return str(local)
    name = default_checkpoint(canonical_name(model_type))
    if name is None:
        raise CheckpointError(
            f"no official checkpoint for {model_type}; pass --pretrained_dir FILE or "
            "--pretrained_dir none"
        )
    return name

"""A trained model from any source, ready for inference: device, precision, preprocessing, top-k.

Sources are a vitlab training checkpoint (`.pt`, carrying its model config and class names), a
vitlab `.safetensors` file, an official checkpoint name (`vitlab download --list`), or an official
`.npz` file with its variant given (the rest of its shape is read from the file). Official
ImageNet-1k fine-tunes predict ImageNet class names; other models without names predict "class N".
"""

from __future__ import annotations

import math
import os
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from . import checkpoints
from .checkpoints import CheckpointError
from .config import ModelConfig, get_config
from .data import IMAGE_EXTENSIONS, DataError, ImageSet, load_cifar, load_image_folder, resize, to_float
from .runtime import autocast
from .model import VisionTransformer


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class names in label order (the package's imagenet_classes.txt)."""
    return resources.files("vitlab").joinpath("imagenet_classes.txt").read_text().splitlines()


def official_class_names(num_classes: int) -> list[str]:
    """ImageNet names for an official 1000-class head; "class N" for ImageNet-21k, whose names vitlab does not ship."""
    return imagenet_class_names() if num_classes == 1000 else [f"class {i}" for i in range(num_classes)]


# ---------------------------------------------------------------------------------------------
# Loading

def load_for_inference(source: str | os.PathLike, model_type: str | None = None) -> tuple[VisionTransformer, list[str]]:
    """(model in eval mode on the CPU, its class names) from any source; `model_type` is for official `.npz` files only."""
    if str(source) in checkpoints.OFFICIAL_CHECKPOINTS:
        model = checkpoints.official_model(str(source))
        names = official_class_names(model.config.num_classes)
    else:
        path = checkpoints.resolve_checkpoint(source)
        if path.suffix == ".npz":
            model = _load_official_npz(path, model_type)
            names = official_class_names(model.config.num_classes)
        elif model_type is not None:
            raise CheckpointError(f"{path}: --model_type is only for official .npz files; this file carries its own model config")
        else:
            model, names = checkpoints.load_safetensors(path) if path.suffix == ".safetensors" else _load_training_checkpoint(path)
            names = names if names is not None else [f"class {i}" for i in range(model.config.num_classes)]
    if len(names) != model.config.num_classes:
        raise CheckpointError(f"{source}: {len(names)} class names for a head of {model.config.num_classes} classes")
    return model.eval(), names


def _load_training_checkpoint(path: Path) -> tuple[VisionTransformer, list[str] | None]:
    payload = checkpoints.read_checkpoint(path)
    try:
        config = ModelConfig.from_dict(payload["model_config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: unusable model_config ({e})") from None
    if not isinstance(payload["model"], dict):
        raise CheckpointError(f"{path}: its 'model' entry is not a state dict")
    model = VisionTransformer(config)
    checkpoints.load_state(model, payload["model"], path)
    return model, payload.get("class_names")


def _load_official_npz(path: Path, model_type: str | None) -> VisionTransformer:
    if model_type is None:
        raise CheckpointError(f"{path}: an official .npz file needs its variant, e.g. --model_type B/16")
    base = get_config(model_type)
    arrays = checkpoints.normalise_keys(checkpoints.read_npz(path), base.depth)  # read once, for the shape and the weights
    return checkpoints.load_official(VisionTransformer(_official_config(path, arrays, base)), arrays, verbose=False, name=str(path))


def _official_config(path: Path, arrays: dict, base: ModelConfig) -> ModelConfig:
    """The variant with the file's classes (head size), img_size (position embeddings' grid times the
    patch), pre-logits width and classifier (class token or not)."""
    head, pos_embed = arrays.get("head/bias"), arrays.get("Transformer/posembed_input/pos_embedding")
    if head is None or pos_embed is None:
        raise CheckpointError(f"{path}: no head or position embeddings; not an official ViT classifier checkpoint")
    prefix = int("cls" in arrays)
    patches = pos_embed.shape[-2] - prefix
    grid = math.isqrt(patches)
    if grid * grid != patches:
        raise CheckpointError(f"{path}: position embeddings of {patches} patches are not a square grid")
    pre_logits = arrays.get("pre_logits/bias")
    return base.replace(
        num_classes=head.shape[-1], img_size=grid * base.patch_size, classifier="token" if prefix else "gap",
        representation_size=pre_logits.shape[-1] if pre_logits is not None else None, dropout_rate=0.0,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Images in, classes out

def preprocess(image: np.ndarray, img_size: int) -> torch.Tensor:
    """uint8 (H, W, 3) -> (3, img_size, img_size) in [-1, 1]: the evaluation transform (whole image resized)."""
    return resize(to_float(torch.from_numpy(image.copy())[None]), img_size)[0]


def list_images(arguments: list[str]) -> tuple[list[Path], list[str]]:
    """(image files, problems): files as given, folders searched recursively for image extensions;
    a missing path or a folder without images is a problem, reported by name."""
    files, problems = [], []
    for argument in arguments:
        path = Path(argument)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            files += found
            if not found:
                problems.append(f"{path}: no images in this folder (looked for {', '.join(IMAGE_EXTENSIONS)})")
        elif path.is_file():
            files.append(path)
        else:
            problems.append(f"{path}: no such file or folder")
    return files, problems


@torch.no_grad()
def predict(model: VisionTransformer, images: torch.Tensor, class_names: list[str], top_k: int, device: torch.device,
            precision: str) -> list[list[tuple[str, int, float]]]:  # fmt: skip
    """For each of a batch of preprocessed images, its top-k (class name, index, probability), most probable first."""
    with autocast(device, precision):
        logits = model(images.to(device))
    top = logits.float().softmax(dim=-1).topk(min(top_k, len(class_names)), dim=-1)
    return [[(class_names[i], i, p) for i, p in zip(idx, probs)] for idx, probs in zip(top.indices.tolist(), top.values.tolist())]


def evaluation_split(dataset: str, data_dir: str | os.PathLike, class_names: list[str]) -> ImageSet:
    """The images to evaluate on: CIFAR's test split, or an image folder (its val/ or test/ subfolder
    when it has one), whose classes must be the model's."""
    if dataset in ("cifar10", "cifar100"):
        data = load_cifar(dataset, data_dir, train=False)
        if data.class_names != class_names:
            raise DataError(f"{dataset}: classes {data.class_names} differ from the checkpoint's classes {class_names}")
        return data
    if dataset != "imagefolder":
        raise DataError(f"unknown dataset {dataset!r}; choose cifar10, cifar100 or imagefolder")
    root = Path(data_dir)
    split = next((root / d for d in ("val", "test") if (root / d).is_dir()), root)
    return load_image_folder(split, class_names)

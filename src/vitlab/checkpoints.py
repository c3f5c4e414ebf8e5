"""Every checkpoint a command can be given, and vitlab's own files.

- `load_model(source)`: a ready model and its class names from any source: a run's `.pt`, a vitlab
  `.safetensors` file, an official checkpoint name, or an official `.npz` file with its variant.
- `load_pretrained(model, source)`: a model initialised from any source for fine-tuning (a head for another
  number of classes starts at zero, as the official fine-tuning does).
- `save_training_checkpoint` / `restore_training_checkpoint`: a run's weights with everything a resumed run
  needs, written atomically.
Torch files are read with `weights_only=True`: nothing in them is executed. The official layout is in
`official.py`.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import zipfile
from pathlib import Path

import torch

from . import official
from .config import ModelConfig
from .errors import CheckpointError
from .files import atomic_write
from .model import VisionTransformer

# ---------------------------------------------------------------------------------------------
# Loading into a model

# Settings that change what the weights compute without changing any weight's shape: a checkpoint loaded
# into a model that differs in one of them would load cleanly and compute something else.
SHAPELESS_FIELDS = ("num_heads", "gelu")


def check_same_function(source: ModelConfig, model: ModelConfig, path) -> None:
    """Raise CheckpointError if `model` would compute another function with `source`'s weights."""
    differ = [f for f in SHAPELESS_FIELDS if getattr(source, f) != getattr(model, f)]
    if differ:
        theirs = ", ".join(f"--{f} {getattr(source, f)}" for f in differ)
        ours = ", ".join(f"{f} {getattr(model, f)}" for f in differ)
        raise CheckpointError(f"{path}: its model was trained with {theirs}, this one has {ours}; pass {theirs}")


def load_state(model: VisionTransformer, state: dict[str, torch.Tensor], path) -> None:
    """Load a full state dict, or raise CheckpointError naming what does not fit."""
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: its weights are not a state dict of tensors")
    ours = model.state_dict()
    missing, unexpected = sorted(set(ours) - set(state)), sorted(set(state) - set(ours))
    if missing or unexpected:
        raise CheckpointError(f"{path}: missing keys {missing[:3]} / unexpected keys {unexpected[:3]} for {model.config.name}")
    for key, value in state.items():
        if value.shape != ours[key].shape:
            raise CheckpointError(f"{path}: {key} has shape {tuple(value.shape)}, the model needs {tuple(ours[key].shape)}")
    model.load_state_dict(state)


def _model_config(values, path) -> ModelConfig:
    try:
        return ModelConfig.from_dict(values)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: unusable model_config ({e})") from None


def resolve_checkpoint(source: str | os.PathLike) -> Path:
    """A local file as given, or an official checkpoint's name fetched into the cache."""
    if str(source) in official.OFFICIAL_CHECKPOINTS:
        return official.fetch_official(str(source))
    path = Path(source)
    if not path.exists():
        known = ", ".join(n for n, e in official.OFFICIAL_CHECKPOINTS.items() if e.description == "ImageNet-21k")
        raise CheckpointError(f"{source}: no such file, nor an official checkpoint name (e.g. {known}; `vitlab download --list`)")
    return path


def load_model(source: str | os.PathLike, model_type: str | None = None) -> tuple[VisionTransformer, list[str]]:
    """(model in eval mode on the CPU, its class names) from any source; `model_type` is for official `.npz` files,
    whose variant the file does not say. Models without class names predict "class N"."""
    if str(source) in official.OFFICIAL_CHECKPOINTS:
        model = official.official_model(str(source))
        names = official.class_names(model.config.num_classes)
    else:
        path = resolve_checkpoint(source)
        if path.suffix == ".npz":
            model = official.npz_model(path, model_type)
            names = official.class_names(model.config.num_classes)
        elif model_type is not None:
            raise CheckpointError(f"{path}: --model_type is only for official .npz files; this file carries its own model config")
        else:
            model, names = load_safetensors(path) if path.suffix == ".safetensors" else _load_vitlab_pt(path)
            names = names if names is not None else [f"class {i}" for i in range(model.config.num_classes)]
    if len(names) != model.config.num_classes:
        raise CheckpointError(f"{source}: {len(names)} class names for a head of {model.config.num_classes} classes")
    return model.eval(), names


def _load_vitlab_pt(path: Path) -> tuple[VisionTransformer, list[str] | None]:
    payload = read_checkpoint(path)
    model = VisionTransformer(_model_config(payload["model_config"], path))
    load_state(model, payload["model"], path)
    return model, payload.get("class_names")


def load_pretrained(model: VisionTransformer, source: str | os.PathLike, verbose: bool = True) -> VisionTransformer:
    """Initialise `model` from any checkpoint (a name or a file) to fine-tune it: a head for another number of classes
    is zero-initialised; an official `.npz` is loaded as the official fine-tuning does (`official.load_official`)."""
    path = resolve_checkpoint(source)
    if path.suffix == ".npz":
        return official.load_official(model, path, verbose)
    if path.suffix == ".safetensors":
        loaded, _ = load_safetensors(path)
        state, source_config = loaded.state_dict(), loaded.config
    else:
        payload = read_checkpoint(path)
        state, source_config = payload["model"], _model_config(payload["model_config"], path)
    check_same_function(source_config, model.config, path)
    ours = model.state_dict()
    if state.get("head.weight") is not None and state["head.weight"].shape != ours["head.weight"].shape:
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
        state.update({k: torch.zeros_like(v) for k, v in ours.items() if k.startswith("head.")})
        if verbose:
            print(f"loaded {path}: head replaced by a zero-initialised head of {model.config.num_classes} classes")
    load_state(model, state, path)
    return model


# ---------------------------------------------------------------------------------------------
# safetensors: the weights with the model's config in the metadata, so the file stands alone.

def save_safetensors(model: VisionTransformer, path: str | os.PathLike, class_names: list[str] | None = None) -> None:
    from safetensors.torch import save

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    metadata = {"model_config": json.dumps(model.config.to_dict()), "sha256": tensors_digest(state)}
    if class_names is not None:
        metadata["class_names"] = json.dumps(class_names)
    data = save(state, metadata=metadata)
    atomic_write(path, lambda f: f.write(data))


def tensors_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 of the tensors' names, dtypes, shapes and bytes: safetensors files carry no checksum of their own."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].contiguous().reshape(-1)  # 1-D: a 0-d tensor has no byte view
        digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def load_safetensors(path: str | os.PathLike) -> tuple[VisionTransformer, list[str] | None]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    if "model_config" not in metadata:
        raise CheckpointError(f"{path}: safetensors file without vitlab's model_config metadata")
    if "sha256" in metadata and tensors_digest(state) != metadata["sha256"]:  # files written before the digest have none
        raise CheckpointError(f"{path}: corrupt: its tensors do not match the checksum written with them; nothing was loaded")
    model = VisionTransformer(_model_config(json.loads(metadata["model_config"]), path))
    load_state(model, state, path)
    return model, json.loads(metadata["class_names"]) if "class_names" in metadata else None


# ---------------------------------------------------------------------------------------------
# A run's checkpoints: torch files of plain tensors and containers, written atomically.

def _check_zip(path: Path) -> None:
    """A torch file is a zip archive, and torch does not check its CRC-32s: a flipped byte in a weight would load."""
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: an empty file, not a vitlab checkpoint")
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise CheckpointError(f"{path}: not a readable vitlab checkpoint (not a complete torch zip archive: {e})") from None
    if damaged is not None:
        raise CheckpointError(f"{path}: corrupt: {damaged} fails its CRC-32 check; nothing was loaded")


def read_checkpoint(path: str | os.PathLike) -> dict:
    """The contents of a vitlab `.pt` file, its checksums verified, read without unpickling anything but tensors and
    containers (a file holding anything else is refused, and nothing in it runs)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    _check_zip(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # torch's refusal of anything but tensors and containers
        raise CheckpointError(f"{path}: not a readable vitlab checkpoint: it holds Python objects other than tensors, "
                              "which vitlab refuses to load") from None  # fmt: skip
    except Exception as e:  # torch raises many types for a damaged or foreign file
        raise CheckpointError(f"{path}: not a readable vitlab checkpoint ({type(e).__name__})") from None
    if not isinstance(payload, dict) or "model" not in payload or "model_config" not in payload:
        raise CheckpointError(f"{path}: not a vitlab checkpoint (no model or model_config inside)")
    return payload


def save_training_checkpoint(path: str | os.PathLike, model: VisionTransformer, class_names: list[str], train_config: dict,
                             optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, progress: dict) -> None:  # fmt: skip
    """The run's weights, configs and class names (enough for every command), and what `--resume` restores."""
    payload = {
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "model_config": model.config.to_dict(),
        "class_names": class_names, "train_config": train_config, "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(), **progress,
    }  # fmt: skip
    atomic_write(path, lambda f: torch.save(payload, f))


def restore_training_checkpoint(payload: dict, path: str | os.PathLike, model: VisionTransformer, optimizer: torch.optim.Optimizer,
                                scaler: torch.amp.GradScaler) -> dict:  # fmt: skip
    """Load a run's checkpoint (`read_checkpoint(path)`) into the model, optimizer and scaler of the run that continues
    it; returns the payload, whose `step`, `best` and `train_config` say where that run was."""
    for key in ("optimizer", "scaler", "step", "best", "train_config"):
        if key not in payload:
            raise CheckpointError(f"{path}: holds no training state ({key}); only checkpoints written by `vitlab train` resume")
    check_same_function(_model_config(payload["model_config"], path), model.config, path)
    load_state(model, payload["model"], path)
    try:
        optimizer.load_state_dict(payload["optimizer"])
        scaler.load_state_dict(payload["scaler"])
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: its optimizer state does not fit this run ({e})") from None
    return payload

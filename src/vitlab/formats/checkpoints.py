"""Every checkpoint a command can be given, and vitlab's own files.

- `load_model(source)`: a ready model and its class names from any source: a run's `.pt`, a vitlab `.safetensors`
  file, an official checkpoint name or `.npz` file, a timm state dict (`.safetensors`, `.bin`, `.pth`), a timm or
  transformers folder (or its weights file), or `hf-hub:ORG/NAME[@REVISION]`.
- `load_pretrained(model, source)`: a model initialised from any source for fine-tuning (a head for another
  number of classes starts at zero, as the official fine-tuning does).
- `save_training_checkpoint` / `restore_training_checkpoint`: a run's weights with everything a resumed run
  needs, written atomically.
This module finds out what a file is and dispatches: the official layout is in `official.py`, timm's
and transformers' in `interop.py`. Torch files are read with `weights_only=True`: nothing in them is
executed.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import ModelConfig, get_config
from ..errors import CheckpointError, ConfigError
from ..model import VisionTransformer
from . import interop, official
from .files import HUB_PREFIX, atomic_write, fetch_hub

# ---------------------------------------------------------------------------------------------
# Loading into a model

# Settings that change what the weights compute without changing any weight's shape: a checkpoint
# loaded into a model that differs in one of them would load cleanly and compute something else.
SHAPELESS_FIELDS = ("num_heads", "gelu", "layer_norm_eps", "final_norm", "stem_norm")


def check_same_function(source: ModelConfig, model: ModelConfig, path) -> None:
    """Raise CheckpointError if `model` would compute another function with `source`'s weights."""
    differ = [
        f
        for f in SHAPELESS_FIELDS
        if getattr(source, f) != getattr(model, f) and (f != "stem_norm" or model.is_hybrid)
    ]
    if differ:
        theirs = ", ".join(f"--{f} {getattr(source, f)}" for f in differ)
        ours = ", ".join(f"{f} {getattr(model, f)}" for f in differ)
        raise CheckpointError(
            f"{path}: its model was trained with {theirs}, this one has {ours}; pass {theirs}"
        )


def check_state(config: ModelConfig, state: dict[str, torch.Tensor], path) -> None:
    """Raise CheckpointError unless `state` holds exactly the tensors of `config`'s model, in its
    shapes, every number finite. The model is laid out on the meta device: a file whose config
    claims a huge model costs no memory."""
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: its weights are not a state dict of tensors")
    with torch.device("meta"):
        ours = VisionTransformer(config).state_dict()
    missing, unexpected = sorted(set(ours) - set(state)), sorted(set(state) - set(ours))
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: missing keys {missing[:3]} / unexpected keys {unexpected[:3]} for "
            f"{config.name}"
        )
    for key, value in state.items():
        if value.shape != ours[key].shape:
            raise CheckpointError(
                f"{path}: {key} has shape {tuple(value.shape)}, the model needs "
                f"{tuple(ours[key].shape)}"
            )
    bad = [
        key
        for key, value in state.items()
        if value.is_floating_point() and not torch.isfinite(value).all()
    ]
    if bad:
        raise CheckpointError(
            f"{path}: {len(bad)} of its tensors hold NaN or infinite values "
            f"({', '.join(bad[:3])}): weights that cannot be used"
        )


def build_model(weights: Weights, path) -> VisionTransformer:
    """The model `weights` describe, holding them; checked (`check_state`) before it is built, so that
    a file whose config claims a huge model costs no memory."""
    check_state(weights.config, weights.state, path)
    model = VisionTransformer(weights.config)
    model.load_state_dict(weights.state)
    return model


def load_state(model: VisionTransformer, state: dict[str, torch.Tensor], path) -> None:
    """Load a full state dict, or raise CheckpointError naming what does not fit (`check_state`)."""
    check_state(model.config, state, path)
    model.load_state_dict(state)


def _model_config(values, path) -> ModelConfig:
    try:
        return ModelConfig.from_dict(values)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: unusable model_config ({e})") from None


def resolve_checkpoint(source: str | os.PathLike) -> Path:
    """A local file or folder as given, an official checkpoint's name fetched into vitlab's cache,
    or `hf-hub:ORG/NAME[@REVISION]` fetched into huggingface_hub's (its folder)."""
    if str(source) in official.OFFICIAL_CHECKPOINTS:
        return official.fetch_official(str(source))
    if str(source).startswith(HUB_PREFIX):
        return fetch_hub(str(source))
    path = Path(source)
    if not path.exists():
        known = ", ".join(
            n for n, e in official.OFFICIAL_CHECKPOINTS.items() if e.description == "ImageNet-21k"
        )
        raise CheckpointError(
            f"{source}: no such file, nor an official checkpoint name (e.g. {known}) or "
            "hf-hub:ORG/NAME (`vitlab download --list`)"
        )
    return path


def load_model(
    source: str | os.PathLike, model_type: str | None = None
) -> tuple[VisionTransformer, list[str]]:
    """(model in eval mode on the CPU, its class names) from any source; `model_type` is the variant
    of an official `.npz` file, which the file does not say, or of a timm state dict (its heads).
    Models without class names predict "class N"."""
    if str(source) in official.OFFICIAL_CHECKPOINTS:
        model = official.official_model(str(source))
        names = official.class_names(model.config.num_classes)
    else:
        path = resolve_checkpoint(source)
        if path.suffix == ".npz":
            model = official.npz_model(path, model_type)
            names = official.class_names(model.config.num_classes)
        else:
            weights = read_weights(path, model_type)
            if not weights.has_head:
                raise CheckpointError(
                    f"{source}: holds no classification head (a feature extractor); fine-tune it "
                    "with --pretrained_dir"
                )
            model = build_model(weights, path)
            names = weights.class_names or [f"class {i}" for i in range(model.config.num_classes)]
    if len(names) != model.config.num_classes:
        raise CheckpointError(
            f"{source}: {len(names)} class names for a head of {model.config.num_classes} classes"
        )
    return model.eval(), names


def load_pretrained(
    model: VisionTransformer, source: str | os.PathLike, verbose: bool = True
) -> VisionTransformer:
    """Initialise `model` from any checkpoint to fine-tune it, as the official fine-tuning does: a
    head for another number of classes (or none) zero-initialised, a pre-logits layer the model
    lacks dropped; an official `.npz` also has its position embeddings resampled
    (`official.load_official`). A timm state dict of a width no variant has takes the model's
    heads."""
    path = resolve_checkpoint(source)
    if path.suffix == ".npz":
        return official.load_official(model, path, verbose)
    weights = read_weights(path, default_heads=model.config.num_heads)
    check_same_function(weights.config, model.config, path)
    state, ours, notes = dict(weights.state), model.state_dict(), []
    if "pre_logits.0.weight" in state and not model.config.representation_size:
        state = {k: v for k, v in state.items() if not k.startswith("pre_logits.")}
        notes.append("pre-logits layer dropped (the model has none)")
    if not weights.has_head or state["head.weight"].shape != ours["head.weight"].shape:
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
        state.update({k: torch.zeros_like(v) for k, v in ours.items() if k.startswith("head.")})
        notes.append(
            f"head replaced by a zero-initialised head of {model.config.num_classes} classes"
        )
    load_state(model, state, path)
    if verbose and notes:
        print(f"loaded {path}: " + "; ".join(notes))
    return model


# ---------------------------------------------------------------------------------------------
# Reading any checkpoint but an official .npz into vitlab's layout


@dataclass
class Weights:
    """A checkpoint in vitlab's layout: its model config, its state dict, and its class names where
    the file has them."""

    config: ModelConfig
    state: dict[str, torch.Tensor]
    class_names: list[str] | None = None

    @property
    def has_head(self) -> bool:
        return "head.weight" in self.state


def read_weights(
    path: Path, model_type: str | None = None, default_heads: int | None = None
) -> Weights:
    """A vitlab `.pt` or `.safetensors` file, a timm state dict, or a timm or transformers folder or
    weights file, in vitlab's layout. A timm state dict does not say its attention heads:
    `model_type` (a variant) gives them, else its config.json, else the variant table by width, else
    `default_heads`."""
    config_path = path / "config.json" if path.is_dir() else path.with_name("config.json")
    if path.is_dir():
        if not config_path.is_file():
            raise CheckpointError(
                f"{path}: a folder without config.json (vitlab reads the folders of transformers' "
                "save_pretrained and timm's save_for_hf)"
            )
        path = next(
            (path / n for n in ("model.safetensors", "pytorch_model.bin") if (path / n).is_file()),
            None,
        ) or _no_weights(path)
    if path.suffix == ".safetensors" or _is_safetensors(path):
        state, metadata = _read_safetensors(path)
    else:
        payload = _torch_load(path, "checkpoint")
        if (
            isinstance(payload, dict) and "model" in payload and "model_config" in payload
        ):  # a run's checkpoint
            metadata = {
                "model_config": payload["model_config"],
                "class_names": payload.get("class_names"),
            }
            payload = payload.get(
                "ema", payload["model"]
            )  # a run with --ema evaluated, and chose best.pt by, its average
        else:
            metadata = {}
        state = _state_dict(payload, path)
    return _convert(path, state, metadata, config_path, model_type, default_heads)


def _convert(
    path: Path,
    state: dict,
    metadata: dict,
    config_path: Path,
    model_type: str | None,
    default_heads: int | None,
) -> Weights:
    own_config = "model_config" in metadata or any(
        k.startswith(("vit.embeddings.", "embeddings.patch_embeddings.")) for k in state
    )
    if model_type is not None and own_config:
        raise CheckpointError(
            f"{path}: --model_type is only for official .npz files and timm state dicts; this one "
            "carries its own model config"
        )
    if (
        "model_config" in metadata
    ):  # vitlab's own file, in its layout or timm's (`vitlab export --format timm`)
        values, names = metadata["model_config"], metadata.get("class_names")
        config = _model_config(json.loads(values) if isinstance(values, str) else values, path)
        state = interop.timm_keys(state, str(path)) if "patch_embed.proj.weight" in state else state
        return Weights(config, state, json.loads(names) if isinstance(names, str) else names)
    config_json = _read_json(config_path)
    if own_config:
        if not config_json or "model_type" not in config_json:
            raise CheckpointError(
                f"{path}: transformers weights need the config.json that save_pretrained writes "
                "beside them"
            )
        preprocessor = _read_json(path.with_name("preprocessor_config.json"))
        return Weights(*interop.from_hf(config_json, state, str(path), preprocessor))
    if "patch_embed.proj.weight" in state:
        heads = _variant_heads(model_type, state, path) if model_type is not None else None
        timm_config = config_json if config_json and "architecture" in config_json else None
        return Weights(*interop.from_timm(state, str(path), timm_config, heads, default_heads))
    raise CheckpointError(
        f"{path}: neither a vitlab, timm nor transformers ViT checkpoint (keys "
        f"{', '.join(sorted(state)[:3])} ...)"
    )


def _variant_heads(model_type: str, state: dict, path: Path) -> int:
    try:
        variant = get_config(model_type)
    except ConfigError as e:
        raise CheckpointError(f"{path}: --model_type: {e}") from None
    width = next(
        (v.shape[-1] for k, v in state.items() if k.endswith("pos_embed")), variant.hidden_size
    )
    if width != variant.hidden_size:
        raise CheckpointError(
            f"{path}: hidden_size {width}, and --model_type {model_type} has {variant.hidden_size}"
        )
    return variant.num_heads


def _is_safetensors(path: Path) -> bool:
    """A safetensors file, whatever its name: an 8-byte header length, then the JSON header."""
    with open(path, "rb") as f:
        head = f.read(9)
    return (
        len(head) == 9
        and head[8:] == b"{"
        and int.from_bytes(head[:8], "little") < path.stat().st_size
    )


def _no_weights(folder: Path):
    raise CheckpointError(
        f"{folder}: no model.safetensors or pytorch_model.bin beside its config.json"
    )


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        values = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(values, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    return values


def _state_dict(payload, path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a torch file: a state dict, or one under "state_dict" or "model" (timm's
    training checkpoints), "module." (DistributedDataParallel's prefix) taken off."""
    if isinstance(payload, dict):
        payload = next(
            (payload[k] for k in ("state_dict", "model") if isinstance(payload.get(k), dict)),
            payload,
        )
    if (
        not isinstance(payload, dict)
        or not payload
        or not all(isinstance(v, torch.Tensor) for v in payload.values())
    ):
        raise CheckpointError(
            f"{path}: not a state dict of tensors, nor a checkpoint that holds one"
        )
    return {k.removeprefix("module."): v for k, v in payload.items()}


# ---------------------------------------------------------------------------------------------
# safetensors: the weights with the model's config in the metadata, so the file stands alone.


def save_safetensors(
    model: VisionTransformer, path: str | os.PathLike, class_names: list[str] | None = None
) -> None:
    from safetensors.torch import save

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    metadata = {"model_config": json.dumps(model.config.to_dict()), "sha256": tensors_digest(state)}
    if class_names is not None:
        metadata["class_names"] = json.dumps(class_names)
    data = save(state, metadata=metadata)
    atomic_write(path, lambda f: f.write(data))


def tensors_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 of the tensors' names, dtypes, shapes and bytes: safetensors files carry no checksum
    of their own."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].contiguous().reshape(-1)  # 1-D: a 0-d tensor has no byte view
        digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata; where vitlab wrote a checksum into the metadata, verified."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            state, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    if (
        "sha256" in metadata and tensors_digest(state) != metadata["sha256"]
    ):  # files written before the digest have none
        raise CheckpointError(
            f"{path}: corrupt: its tensors do not match the checksum written with them; nothing "
            "was loaded"
        )
    return state, metadata


def load_safetensors(path: str | os.PathLike) -> tuple[VisionTransformer, list[str] | None]:
    """A vitlab `.safetensors` file (its model config in the metadata), in vitlab's layout or
    timm's."""
    state, metadata = _read_safetensors(Path(path))
    if "model_config" not in metadata:
        raise CheckpointError(f"{path}: safetensors file without vitlab's model_config metadata")
    weights = _convert(Path(path), state, metadata, Path(path).with_name("config.json"), None, None)
    return build_model(weights, path), weights.class_names


# ---------------------------------------------------------------------------------------------
# A run's checkpoints: torch files of plain tensors and containers, written atomically.


def _check_zip(path: Path, what: str) -> None:
    """A torch file is a zip archive, and torch does not check its CRC-32s: a flipped byte in a
    weight would load."""
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: an empty file, not a {what}")
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise CheckpointError(
            f"{path}: not a readable {what} (not a complete torch zip archive: {e})"
        ) from None
    if damaged is not None:
        raise CheckpointError(
            f"{path}: corrupt: {damaged} fails its CRC-32 check; nothing was loaded"
        )


def read_checkpoint(path: str | os.PathLike) -> dict:
    """The contents of a vitlab `.pt` file, its checksums verified, read without unpickling anything
    but tensors and containers (a file holding anything else is refused, and nothing in it runs)."""
    payload = _torch_load(Path(path), "vitlab checkpoint", require_zip=True)
    if not isinstance(payload, dict) or "model" not in payload or "model_config" not in payload:
        raise CheckpointError(f"{path}: not a vitlab checkpoint (no model or model_config inside)")
    return payload


def _torch_load(path: Path, what: str, require_zip: bool = False):
    """A torch file's contents, its CRC-32s verified where it is a zip archive (as torch has written
    since 1.6; vitlab's always are), read with weights_only=True."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if require_zip or zipfile.is_zipfile(path):
        _check_zip(path, what)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # torch's refusal of anything but tensors and containers
        raise CheckpointError(
            f"{path}: not a readable {what}: it holds Python objects other than tensors, which "
            "vitlab refuses to load"
        ) from None
    except Exception as e:  # torch raises many types for a damaged or foreign file
        raise CheckpointError(f"{path}: not a readable {what} ({type(e).__name__})") from None


def save_training_checkpoint(
    path: str | os.PathLike,
    model: VisionTransformer,
    class_names: list[str],
    train_config: dict,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    progress: dict,
    ema: torch.optim.swa_utils.AveragedModel | None = None,
) -> None:
    """The run's weights (and their moving average, which the commands use), configs and class
    names, and what `--resume` restores."""
    payload = {
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "model_config": model.config.to_dict(),
        "class_names": class_names,
        "train_config": train_config,
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        **progress,
    }
    if ema is not None:
        payload["ema"] = {k: v.detach().cpu() for k, v in ema.module.state_dict().items()}
    atomic_write(path, lambda f: torch.save(payload, f))


def restore_training_checkpoint(
    payload: dict,
    path: str | os.PathLike,
    model: VisionTransformer,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    ema: torch.optim.swa_utils.AveragedModel | None = None,
) -> dict:
    """Load a run's checkpoint (`read_checkpoint(path)`) into the model, optimizer and scaler of the
    run that continues it; returns the payload, whose `step`, `best` and `train_config` say where
    that run was."""
    for key in ("optimizer", "scaler", "step", "best", "train_config"):
        if key not in payload:
            raise CheckpointError(
                f"{path}: holds no training state ({key}); only checkpoints written by `vitlab "
                "train` resume"
            )
    check_same_function(_model_config(payload["model_config"], path), model.config, path)
    load_state(model, payload["model"], path)
    if ema is not None:
        if "ema" not in payload:
            raise CheckpointError(
                f"{path}: its run kept no moving average of the weights; resume without --ema"
            )
        load_state(ema.module, payload["ema"], path)
        ema.n_averaged.fill_(1)  # the average goes on from the saved one
    try:
        optimizer.load_state_dict(payload["optimizer"])
        scaler.load_state_dict(payload["scaler"])
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: its optimizer state does not fit this run ({e})") from None
    return payload

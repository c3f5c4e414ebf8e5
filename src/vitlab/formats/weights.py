"""Any checkpoint but an official `.npz`, read into vitlab's layout (`Weights`): a run's `.pt`, a
vitlab `.safetensors` file, a timm state dict (`.safetensors`, `.bin`, `.pth`), a timm or
transformers folder or its weights file, the original releases of the later families (Meta's
DINOv2 `.pth`, OpenAI's and OpenCLIP's CLIP state dicts, big_vision's SigLIP `.npz`); and vitlab's
`.safetensors` written.

This module finds out what a file is and dispatches: timm's layout is in `timm_layout.py`,
transformers' in `hf_layout.py`, the original releases' in `dinov2_layout.py`,
`openclip_layout.py` and `siglip_layout.py`. Torch files are read with `weights_only=True`: nothing
in them is executed.
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
from . import dinov2_layout, openclip_layout
from .files import atomic_write
from .hf_layout import from_hf, is_hf_state
from .siglip_layout import is_two_tower, read_siglip
from .timm_layout import from_timm, timm_keys

# ---------------------------------------------------------------------------------------------
# Any file or folder into vitlab's layout


@dataclass
class Weights:
    """A checkpoint in vitlab's layout: its model config, its state dict, and its class names where
    the file has them."""

    config: ModelConfig
    state: dict[str, torch.Tensor]
    class_names: list[str] | None = None
    # Whose rule resamples the position table to another grid (checkpoints.RESAMPLERS): the
    # library that wrote the file; vitlab's own files and big_vision's follow the official
    # fine-tuning.
    positions: str = "official"

    @property
    def has_head(self) -> bool:
        return "head.weight" in self.state


def read_weights(path: Path, variant: str | ModelConfig | None = None) -> Weights:
    """A vitlab `.pt` or `.safetensors` file, a timm state dict, a timm or transformers folder or
    weights file, or an original release of a later family, in vitlab's layout. A timm state dict
    does not say its attention heads or how its images were fed, a CLIP state dict its GELU:
    `variant` (a variant's name the user gave, or the model it is loaded into) does, else its
    config.json, else the variant table by width."""
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
    if is_two_tower(path):
        return Weights(*read_siglip(path, variant))
    if path.suffix == ".safetensors" or _is_safetensors(path):
        state, metadata = _read_safetensors(path)
    else:
        payload = read_torch_file(path, "checkpoint")
        # A run's checkpoint
        if isinstance(payload, dict) and "model" in payload and "model_config" in payload:
            metadata = {
                "model_config": payload["model_config"],
                "class_names": payload.get("class_names"),
            }
            # A run with --ema evaluated, and chose best.pt by, its average
            payload = payload.get("ema", payload["model"])
        else:
            metadata = {}
        state = _state_dict(payload, path)
    return _convert(path, state, metadata, config_path, variant)


def _convert(
    path: Path, state: dict, metadata: dict, config_path: Path, variant: str | ModelConfig | None
) -> Weights:
    transformers = is_hf_state(state)
    own_config = "model_config" in metadata or transformers
    if isinstance(variant, str) and own_config:
        raise CheckpointError(
            f"{path}: --model_type is only for official .npz files and timm state dicts; this one "
            "carries its own model config"
        )
    # Vitlab's own file, in its layout or timm's (`vitlab export --format timm`)
    if "model_config" in metadata:
        values, names = metadata["model_config"], metadata.get("class_names")
        config = parse_model_config(json.loads(values) if isinstance(values, str) else values, path)
        state = timm_keys(state, str(path)) if "patch_embed.proj.weight" in state else state
        return Weights(config, state, json.loads(names) if isinstance(names, str) else names)
    config_json = _read_json(config_path)
    if transformers:
        if not config_json or "model_type" not in config_json:
            raise CheckpointError(
                f"{path}: transformers weights need the config.json that save_pretrained writes "
                "beside them"
            )
        preprocessor = _read_json(path.with_name("preprocessor_config.json"))
        return Weights(*from_hf(config_json, state, str(path), preprocessor, variant))
    # Meta's DINOv2 has timm's keys: told apart first
    for layout in (dinov2_layout, openclip_layout):
        if layout.is_layout(state):
            state = layout.timm_state(state, str(path))
            variant = _variant(variant, state, path) if isinstance(variant, str) else variant
            config, state, positions = layout.from_original(state, str(path), variant)
            return Weights(config, state, positions=positions)
    if "patch_embed.proj.weight" in state:
        if isinstance(variant, str):
            variant = _variant(variant, state, path)
        timm_config = config_json if config_json and "architecture" in config_json else None
        return Weights(*from_timm(state, str(path), timm_config, variant), positions="timm")
    raise CheckpointError(
        f"{path}: neither a vitlab, timm nor transformers ViT checkpoint (keys "
        f"{', '.join(sorted(state)[:3])} ...)"
    )


def _variant(model_type: str, state: dict, path: Path) -> ModelConfig:
    """The variant the user named for a file that does not say all of its model, checked against
    the file's width."""
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
    return variant


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


def parse_model_config(values, path) -> ModelConfig:
    """The ModelConfig a file's `model_config` describes, or CheckpointError naming the file."""
    try:
        return ModelConfig.from_dict(values)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: unusable model_config ({e})") from None


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
    # Files written before the digest have none
    if "sha256" in metadata and tensors_digest(state) != metadata["sha256"]:
        raise CheckpointError(
            f"{path}: corrupt: its tensors do not match the checksum written with them; nothing "
            "was loaded"
        )
    return state, metadata


# ---------------------------------------------------------------------------------------------
# Torch files: zip archives of tensors and containers, their checksums verified.


def _check_zip(path: Path, what: str) -> None:
    """A torch file is a zip archive, and torch does not check its CRC-32s: a flipped byte in a
    weight would load."""
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: an empty file, not a {what}")
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
            scripted = any(n.endswith("/constants.pkl") for n in archive.namelist())
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise CheckpointError(
            f"{path}: not a readable {what} (not a complete torch zip archive: {e})"
        ) from None
    if damaged is not None:
        raise CheckpointError(
            f"{path}: corrupt: {damaged} fails its CRC-32 check; nothing was loaded"
        )
    # torch.jit.save's archive (code beside the weights), which torch.load with weights_only refuses
    if scripted:
        raise CheckpointError(
            f"{path}: a TorchScript archive (as OpenAI's CLIP files are), whose code vitlab does "
            "not run; pass its state dict: torch.save(torch.jit.load(path).state_dict(), file)"
        )


def read_torch_file(path: Path, what: str, require_zip: bool = False):
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

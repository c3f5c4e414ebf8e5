"""Every checkpoint a command can be given, as a model; and a run's own checkpoints.

- `load_model(source)`: a ready model and its class names from any source: a run's `.pt`, a vitlab
  `.safetensors` file, an official checkpoint name or `.npz` file, a timm state dict
  (`.safetensors`, `.bin`, `.pth`), a timm or transformers folder (or its weights file), an
  original release of a later family (Meta's DINOv2 `.pth`, a CLIP state dict of OpenAI's or
  OpenCLIP's, big_vision's SigLIP `.npz`), or `hf-hub:ORG/NAME[@REVISION]`.
- `load_pretrained(model, source)`: a model initialised from any source for fine-tuning (a head for
  another number of classes starts at zero, as the official fine-tuning does).
- `save_training_checkpoint` / `restore_training_checkpoint`: a run's weights with everything a
  resumed run needs, written atomically.
What a file holds is read by `weights.py` (and `official.py` for the official `.npz`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import VARIANTS, ModelConfig
from ..errors import CheckpointError
from ..model import VisionTransformer
from . import dinov2_layout, hf_layout, official, official_layout, timm_layout
from .files import HUB_PREFIX, atomic_write, fetch_hub
from .siglip_layout import is_two_tower
from .weights import Weights, parse_model_config, read_torch_file, read_weights

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
    of an official `.npz` file, which the file does not say, of a timm state dict (its heads) or of
    a CLIP state dict (its GELU). Models without class names predict "class N"."""
    if str(source) in official.OFFICIAL_CHECKPOINTS:
        model = official.official_model(str(source))
        names = official.class_names(model.config.num_classes)
    else:
        path = resolve_checkpoint(source)
        if _official_npz(path):
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


def load_backbone(source: str | os.PathLike, model_type: str | None = None) -> VisionTransformer:
    """A model from any source, in eval mode on the CPU, whose head may be missing (a feature
    extractor, as DINOv2 and SigLIP are released): its blocks are what counts, a missing head is
    zero."""
    path = None if str(source) in official.OFFICIAL_CHECKPOINTS else resolve_checkpoint(source)
    if path is None or _official_npz(path):
        return load_model(source, model_type)[0]
    weights = read_weights(path, model_type)
    if not weights.has_head:
        with torch.device("meta"):
            shapes = VisionTransformer(weights.config).state_dict()
        heads = {k: v for k, v in shapes.items() if k.startswith(("head.", "head_dist."))}
        weights.state.update({k: torch.zeros(v.shape) for k, v in heads.items()})
    return build_model(weights, path).eval()


def load_pretrained(
    model: VisionTransformer, source: str | os.PathLike, verbose: bool = True
) -> VisionTransformer:
    """Initialise `model` from any checkpoint to fine-tune it, as the official fine-tuning does: a
    head for another number of classes (or none) zero-initialised, a pre-logits layer the model
    lacks dropped, position embeddings resampled to the model's grid by the source's own rule. The
    model must compute what the file's weights were trained to compute (`check_same_function`); a
    file that does not say its heads or how its images are fed takes the model's."""
    path = resolve_checkpoint(source)
    if _official_npz(path):
        return official.load_official(model, path, verbose)
    weights = read_weights(path, model.config)
    check_same_function(weights.config, model.config, path)
    return _load_weights(model, weights, path, verbose)


def pretrained_model(
    source: str | os.PathLike,
    wanted: ModelConfig,
    chosen: frozenset[str] = frozenset(),
    verbose: bool = True,
) -> VisionTransformer:
    """A model to fine-tune, built from what `source` says its model is, with the fine-tuning's own
    settings of `wanted` (classes, image size, dropout; the head's input where the file has no head
    to keep); `chosen` names the fields the user set, which the file must not contradict. An
    official `.npz`, which says nothing of its model, is loaded into `wanted`'s."""
    path = resolve_checkpoint(source)
    if _official_npz(path):
        return official.load_official(VisionTransformer(wanted), path, verbose)
    weights = read_weights(path, wanted)
    config = fine_tuning_config(weights, wanted, chosen, path, verbose)
    return _load_weights(VisionTransformer(config), weights, path, verbose)


def _official_npz(path: Path) -> bool:
    """An `.npz` of vision_transformer's or big_vision's plain ViT (`official.py`), not the
    image-text file of big_vision's two towers (SigLIP's), which says its own model."""
    return path.suffix == ".npz" and not is_two_tower(path)


# What fine-tuning sets whatever the file: the task (classes, image size) and the regularisation.
TUNED_FIELDS = (
    "num_classes",
    "multi_label",  # a softmax or a sigmoid a class over the same logits: the task's choice
    "img_size",
    "dropout_rate",
    "attention_dropout_rate",
    "drop_path_rate",
    "patch_drop_rate",
    "attention_impl",
    "pos_embed_init",  # initialisations, which the file's weights replace
    "attention_init",
)
# What the weights' tensors are: a file of another shape cannot be loaded into the model.
SHAPE_FIELDS = (
    "patch_size",
    "hidden_size",
    "depth",
    "num_heads",
    "mlp_dim",
    "mlp",
    "has_class_token",
    "distilled",
    "reg_tokens",
    "pos_embed_prefix",
    "pre_norm",
    "patch_bias",
    "resnet_layers",
    "resnet_width_factor",
)
# Pooling the head's input in another way adds or drops no weights but the head's.
_HEADLESS_POOLS = ("token", "token_gap")


def fine_tuning_config(
    weights: Weights, wanted: ModelConfig, chosen: frozenset[str], path, verbose: bool
) -> ModelConfig:
    """The model to fine-tune `weights` in: the file's own (its shape, what its weights compute, how
    its images are fed), with `wanted`'s task and regularisation, and `wanted`'s pooling where the
    file has no head to keep. Refused where `wanted` (the variant the user named, or a field the
    user chose) has another shape, or the user chose another function."""
    file = weights.config
    shape = [f for f in SHAPE_FIELDS if getattr(file, f) != getattr(wanted, f)]
    shape += ["layer_scale"] if (file.layer_scale is None) != (wanted.layer_scale is None) else []
    if shape:
        ours = ", ".join(f"{f} {getattr(wanted, f)}" for f in shape)
        raise CheckpointError(
            f"{path}: its model has {', '.join(f'{f} {getattr(file, f)}' for f in shape)}, not "
            f"{ours}; pass --model_type {_variant_like(file)}"
        )
    tuned = {f: getattr(wanted, f) for f in TUNED_FIELDS}
    head_kept = weights.has_head and file.num_classes == wanted.num_classes
    if not head_kept and {file.classifier, wanted.classifier} <= set(_HEADLESS_POOLS):
        tuned.update(classifier=wanted.classifier, representation_size=wanted.representation_size)
    config = file.replace(name=wanted.name, **tuned)
    differ = [
        f.name
        for f in dataclasses.fields(ModelConfig)
        # the class token's presence and layer scale's are in SHAPE_FIELDS; layer scale's value
        # is its initialisation
        if f.name not in ("name", "class_token", "layer_scale")
        and getattr(config, f.name) != getattr(wanted, f.name)
    ]
    refused = sorted(set(differ) & chosen)
    if refused:
        raise CheckpointError(
            f"{path}: its weights compute with {', '.join(f'{f} {getattr(config, f)}' for f in refused)}"
            f"; --{' --'.join(refused)} would make the model compute another function"
        )
    if verbose and differ:
        print(
            f"{path}: computes as its file says: "
            + ", ".join(f"{f} {getattr(config, f)} (not {getattr(wanted, f)})" for f in differ)
        )
    return config


def _variant_like(config: ModelConfig) -> str:
    """The name of a variant of `config`'s shape, for a message; else "the variant of its shape"."""
    same = (
        name
        for name, v in VARIANTS.items()
        if all(getattr(v, f) == getattr(config, f) for f in SHAPE_FIELDS)
    )
    return next(same, "of its shape (`vitlab models`)")


def _load_weights(model: VisionTransformer, weights: Weights, path, verbose: bool):
    state, notes = _fitted_state(model, weights)
    load_state(model, state, path)
    if verbose and notes:
        print(f"loaded {path}: " + "; ".join(notes))
    return model


def _fitted_state(model: VisionTransformer, weights: Weights) -> tuple[dict, list[str]]:
    """`weights`' state made to fit `model` as fine-tuning does: a pre-logits layer the model lacks
    dropped, heads of another size replaced by zeros, the position table resampled to the model's
    grid by the source's rule. Returns the state and notes on what was adapted."""
    state, ours, notes = dict(weights.state), model.state_dict(), []
    if "pre_logits.0.weight" in state and not model.config.representation_size:
        state = {k: v for k, v in state.items() if not k.startswith("pre_logits.")}
        notes.append("pre-logits layer dropped (the model has none)")
    heads = [k for k in ours if k.startswith(("head.", "head_dist."))]
    if any(k not in state or state[k].shape != ours[k].shape for k in heads):
        state = {k: v for k, v in state.items() if not k.startswith(("head.", "head_dist."))}
        state.update({k: torch.zeros_like(ours[k]) for k in heads})
        notes.append(
            f"head replaced by a zero-initialised head of {model.config.num_classes} classes"
        )
    table, config = state.get("pos_embed"), model.config
    if table is not None and table.shape != ours["pos_embed"].shape:
        prefix = config.num_positions - config.grid_size**2
        rule = RESAMPLERS.get(weights.positions)
        if table.shape[-1] == ours["pos_embed"].shape[-1] and rule is not None:
            state["pos_embed"] = rule(table, prefix, config.grid_size)
            notes.append(
                f"position embeddings resized from {table.shape[1] - prefix} to "
                f"{config.grid_size**2} patches ({weights.positions}'s rule)"
            )
    return state, notes


# How each source resamples its position table to another grid: (table (1, rows, D), prefix rows,
# new grid side) -> the new table, as that library does when its model is built at another size
# (big_vision's `resample_posemb` is the official one; OpenCLIP's `resize_pos_embed` is timm's
# computation, bicubic and antialiased, in the table's dtype where timm's is in float32).
RESAMPLERS = {
    "official": official_layout.resample_positions,
    "timm": timm_layout.resample_positions,
    "transformers": hf_layout.resample_positions,
    "transformers Dinov2": functools.partial(hf_layout.resample_positions, float32=True),
    "transformers Dinov2WithRegisters": functools.partial(
        hf_layout.resample_positions, float32=True, antialias=True
    ),
    "openclip": timm_layout.resample_positions,
    "dinov2": dinov2_layout.resample_positions,
    "dinov2-reg": dinov2_layout.resample_positions_registers,
}


# ---------------------------------------------------------------------------------------------
# A run's checkpoints: torch files of plain tensors and containers, written atomically.


def read_checkpoint(path: str | os.PathLike) -> dict:
    """The contents of a vitlab `.pt` file, its checksums verified, read without unpickling anything
    but tensors and containers (a file holding anything else is refused, and nothing in it runs)."""
    payload = read_torch_file(Path(path), "vitlab checkpoint", require_zip=True)
    if not isinstance(payload, dict) or "model" not in payload or "model_config" not in payload:
        raise CheckpointError(f"{path}: not a vitlab checkpoint (no model or model_config inside)")
    return payload


@dataclass
class RunState:
    """What a run's checkpoint holds beside its model's weights: what the commands read (the class
    names), and what `--resume` restores and checks."""

    class_names: list[str]
    train_config: dict  # the run's TrainConfig.to_dict(): a resumed run is checked against it
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    progress: dict  # where the run was: step, best, precision
    ema: torch.optim.swa_utils.AveragedModel | None = None  # the weights' moving average, if kept


def save_training_checkpoint(
    path: str | os.PathLike, model: VisionTransformer, run: RunState
) -> None:
    """The run's weights (and their moving average, which the commands use), configs and class
    names, and what `--resume` restores."""
    payload = {
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "model_config": model.config.to_dict(),
        "class_names": run.class_names,
        "train_config": run.train_config,
        "optimizer": run.optimizer.state_dict(),
        "scaler": run.scaler.state_dict(),
        **run.progress,
    }
    if run.ema is not None:
        payload["ema"] = {k: v.detach().cpu() for k, v in run.ema.module.state_dict().items()}
    atomic_write(path, lambda f: torch.save(payload, f))


def check_training_state(payload: dict, path: str | os.PathLike, model: ModelConfig) -> None:
    """Refuse, before anything is loaded, a checkpoint that cannot continue a run of `model`: one
    without a run's training state, or of a model that computes another function."""
    for key in ("optimizer", "scaler", "step", "best", "train_config"):
        if key not in payload:
            raise CheckpointError(
                f"{path}: holds no training state ({key}); only checkpoints written by `vitlab "
                "train` resume"
            )
    check_same_function(parse_model_config(payload["model_config"], path), model, path)


def restore_training_checkpoint(
    payload: dict,
    path: str | os.PathLike,
    model: VisionTransformer,
    *,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    ema: torch.optim.swa_utils.AveragedModel | None = None,
) -> dict:
    """Load a run's checkpoint (`read_checkpoint(path)`, passed by `check_training_state`) into the
    model, optimizer and scaler of the run that continues it; returns the payload, whose `step`,
    `best` and `train_config` say where that run was."""
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

"""Google's official checkpoints: the `.npz` layout of google-research/vision_transformer (read,
written, and loaded as the official fine-tuning does), big_vision's layout, and the published files
by name.

Keys are joined with "/", kernels stored in (in, out) order and attention kernels split per head.
Files are read with `allow_pickle=False`: nothing in them is executed.
"""

from __future__ import annotations

import math
import os
import re
import zipfile
import zlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..config import ModelConfig, canonical_name, get_config
from ..errors import CheckpointError
from ..model import VisionTransformer, count_parameters, create_model
from .files import atomic_write, cache_dir, download

# ---------------------------------------------------------------------------------------------
# The official layout: our parameter name -> npz key, and how the array is laid out there.


def _block_keys(i: int) -> list[tuple[str, str, str]]:
    b, a = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
    keys = [
        (b + "norm1.weight", a + "LayerNorm_0/scale", "vector"),
        (b + "norm1.bias", a + "LayerNorm_0/bias", "vector"),
        (b + "norm2.weight", a + "LayerNorm_2/scale", "vector"),
        (b + "norm2.bias", a + "LayerNorm_2/bias", "vector"),
        (b + "attn.proj.weight", a + "MultiHeadDotProductAttention_1/out/kernel", "attn_out"),
        (b + "attn.proj.bias", a + "MultiHeadDotProductAttention_1/out/bias", "vector"),
        (b + "mlp.fc1.weight", a + "MlpBlock_3/Dense_0/kernel", "dense"),
        (b + "mlp.fc1.bias", a + "MlpBlock_3/Dense_0/bias", "vector"),
        (b + "mlp.fc2.weight", a + "MlpBlock_3/Dense_1/kernel", "dense"),
        (b + "mlp.fc2.bias", a + "MlpBlock_3/Dense_1/bias", "vector"),
    ]
    return keys


def _stem_keys(config: ModelConfig) -> list[tuple[str, str, str]]:
    keys = [
        ("stem.conv_root.weight", "conv_root/kernel", "conv"),
        ("stem.gn_root.weight", "gn_root/scale", "vector"),
        ("stem.gn_root.bias", "gn_root/bias", "vector"),
    ]
    in_channels, width = 64 * config.resnet_width_factor, 64 * config.resnet_width_factor
    for s, units in enumerate(config.resnet_layers):
        features = width * 2**s
        for u in range(units):
            ours, theirs = f"stem.stages.{s}.{u}.", f"block{s + 1}/unit{u + 1}/"
            names = ["1", "2", "3"]
            if u == 0 and (in_channels != features * 4 or s > 0):
                names.append("_proj")
            for n in names:
                keys.append((ours + f"conv{n}.weight", theirs + f"conv{n}/kernel", "conv"))
                keys.append((ours + f"gn{n}.weight", theirs + f"gn{n}/scale", "vector"))
                keys.append((ours + f"gn{n}.bias", theirs + f"gn{n}/bias", "vector"))
            in_channels = features * 4
    return keys


def official_key_map(config: ModelConfig) -> list[tuple[str, str, str]]:
    """(our name, official key, layout) for every parameter, except the fused query/key/value."""
    keys = _stem_keys(config) if config.is_hybrid else []
    keys += [
        ("patch_embed.weight", "embedding/kernel", "conv"),
        ("patch_embed.bias", "embedding/bias", "vector"),
        ("pos_embed", "Transformer/posembed_input/pos_embedding", "same"),
    ]
    if config.classifier == "token":
        keys.append(("cls_token", "cls", "same"))
    for i in range(config.depth):
        keys += _block_keys(i)
    keys += [
        ("norm.weight", "Transformer/encoder_norm/scale", "vector"),
        ("norm.bias", "Transformer/encoder_norm/bias", "vector"),
    ]
    if config.representation_size:
        keys += [
            ("pre_logits.0.weight", "pre_logits/kernel", "dense"),
            ("pre_logits.0.bias", "pre_logits/bias", "vector"),
        ]
    keys += [("head.weight", "head/kernel", "dense"), ("head.bias", "head/bias", "vector")]
    return keys


_QKV = ("query", "key", "value")


def _to_official(array: np.ndarray, layout: str, heads: int) -> np.ndarray:
    if layout == "conv":  # torch (out, in, h, w) -> flax (h, w, in, out)
        return array.transpose(2, 3, 1, 0)
    if layout == "dense":  # torch (out, in) -> flax (in, out)
        return array.T
    if layout == "attn_out":  # torch (D, D_in) -> flax (heads, head_dim, D)
        return array.T.reshape(heads, -1, array.shape[0])
    return array


def _from_official(array: np.ndarray, layout: str, target_shape: torch.Size) -> np.ndarray:
    if layout == "conv":
        array = array.transpose(3, 2, 0, 1) if array.ndim == 4 else array
    elif layout == "dense":
        array = array.T
    elif layout == "attn_out":
        array = array.reshape(-1, array.shape[-1]).T
    elif layout == "vector":
        array = (
            array.reshape(-1) if array.size == target_shape.numel() else array
        )  # old GroupNorm params are (1, 1, 1, C)
    return array


def to_official_arrays(model: VisionTransformer) -> dict[str, np.ndarray]:
    """Every parameter under its official key, in the official layout (float32)."""
    config = model.config
    state = {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}
    arrays = {
        theirs: _to_official(state[ours], layout, config.num_heads)
        for ours, theirs, layout in official_key_map(config)
    }
    D, H = config.hidden_size, config.num_heads
    for i in range(config.depth):
        weight, bias = state[f"blocks.{i}.attn.qkv.weight"], state[f"blocks.{i}.attn.qkv.bias"]
        for j, name in enumerate(_QKV):
            prefix = f"Transformer/encoderblock_{i}/MultiHeadDotProductAttention_1/{name}/"
            arrays[prefix + "kernel"] = weight[j * D : (j + 1) * D].T.reshape(
                D, H, D // H
            )  # (D, heads, head_dim)
            arrays[prefix + "bias"] = bias[j * D : (j + 1) * D].reshape(H, D // H)
    return arrays


def save_npz(model: VisionTransformer, path: str | os.PathLike) -> None:
    arrays = to_official_arrays(model)
    atomic_write(path, lambda f: np.savez(f, **arrays))


# big_vision's layout (as timm's loader reads it): everything under "opt/target/", the blocks
# stacked on one leading axis under "Transformer/encoderblock/", sub-modules numbered from 0
# (attention 0, second LayerNorm 1, MLP 0), and the position embeddings at the top level.
_BIG_VISION_NAMES = (
    ("/MultiHeadDotProductAttention_0/", "/MultiHeadDotProductAttention_1/"),
    ("/LayerNorm_1/", "/LayerNorm_2/"),
    ("/MlpBlock_0/", "/MlpBlock_3/"),
)


def normalise_keys(arrays: dict[str, np.ndarray], depth: int) -> dict[str, np.ndarray]:
    """Keys of any supported layout in the original vision_transformer layout."""
    if not any(k.startswith("opt/target/") for k in arrays):
        return arrays
    out = {}
    for key, value in arrays.items():
        if not key.startswith("opt/target/"):
            continue  # optimizer state
        key = key.removeprefix("opt/target/")
        if key == "pos_embedding":
            out["Transformer/posembed_input/pos_embedding"] = value
            continue
        stacked = re.match(r"Transformer/encoderblock/(.*)", key)
        if not stacked:
            out[key] = value
            continue
        if value.shape[0] != depth:
            raise CheckpointError(
                f"stacked block parameter {key} has {value.shape[0]} layers, the model has {depth}"
            )
        name = "/" + stacked.group(1)
        for old, new in _BIG_VISION_NAMES:
            name = name.replace(old, new)
        for i in range(depth):  # (depth, ...) -> one key per block
            out[f"Transformer/encoderblock_{i}{name}"] = value[i]
    return out


def npz_budget(config: ModelConfig) -> int:
    """The most numbers an official file of `config`'s variant can hold: its model with the largest
    official head (ImageNet-21k's 21,843 classes), a pre-logits layer and a position table of 64 x
    64 patches, counted on the meta device. A file claiming more is refused before any of it is
    read: memory stays within what such a model needs."""
    largest = config.replace(
        num_classes=max(config.num_classes, 21_843),
        representation_size=config.hidden_size,
        img_size=64 * config.patch_size,
    )
    with torch.device("meta"):
        return count_parameters(VisionTransformer(largest))


_HEADER_READERS = {
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
}


def _check_npz_sizes(path: Path, budget: int) -> None:
    """Each array's header read (a few bytes, not its data): its stored size must be what its shape
    and dtype say, and all together at most `budget` numbers. So an archive whose member inflates to
    gigabytes is refused first."""
    total = 0
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            if not info.filename.endswith(".npy"):
                continue
            with archive.open(info) as f:
                reader = _HEADER_READERS.get(np.lib.format.read_magic(f))
                if reader is None:
                    continue  # a format numpy itself reads or refuses below
                shape, _, dtype = reader(f)
                count = math.prod(shape)
                if not dtype.hasobject and info.file_size != f.tell() + count * dtype.itemsize:
                    raise CheckpointError(
                        f"{path}: {info.filename} is {info.file_size:,} bytes, not what its "
                        f"header says ({shape} {dtype}): damaged"
                    )
                total += count
    if total > budget:
        raise CheckpointError(
            f"{path}: holds {total:,} numbers, more than a checkpoint of this model can "
            f"({budget:,}); refused before reading it"
        )


def read_npz(path: str | os.PathLike, config: ModelConfig | None = None) -> dict[str, np.ndarray]:
    """All arrays of an `.npz` file, read without pickle, checked against the size of `config`'s
    checkpoints (`npz_budget`; ViT-H/14's when None) before reading; one clear error for any
    damage."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        if zipfile.is_zipfile(path):
            _check_npz_sizes(path, npz_budget(config or get_config("H/14")))
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise CheckpointError(f"{path}: a single .npy array, not an .npz checkpoint")
        with data:
            arrays = {key: data[key] for key in data.files}
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, EOFError, zlib.error) as e:
        raise CheckpointError(
            f"{path}: not a complete .npz file (truncated or corrupt: {e})"
        ) from None
    except ValueError as e:
        if "Object arrays" in str(e):  # numpy's refusal to unpickle an array inside the archive
            raise CheckpointError(
                f"{path}: holds pickled objects, which vitlab refuses to load"
            ) from None
        raise CheckpointError(
            f"{path}: not an .npz checkpoint (neither a zip archive nor an array file)"
        ) from None
    except OSError as e:
        raise CheckpointError(f"{path}: not an .npz checkpoint ({e})") from None
    bad = [
        key
        for key, value in arrays.items()
        if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all()
    ]
    if bad:
        raise CheckpointError(
            f"{path}: {len(bad)} of its arrays hold NaN or infinite values ({', '.join(bad[:3])}): "
            "weights that cannot be used"
        )
    return arrays


def resize_pos_embed(
    pos_embed: torch.Tensor, new_grid: tuple[int, int], num_prefix_tokens: int
) -> torch.Tensor:
    """The official resampling of `vit_jax/checkpoint.py`: class token kept apart, the grid zoomed
    with `scipy.ndimage.zoom(order=1)`, which is bilinear interpolation with align_corners=True."""
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[0, num_prefix_tokens:]
    old = int(round(grid.shape[0] ** 0.5))
    if old * old != grid.shape[0]:
        raise CheckpointError(
            f"position embeddings of {grid.shape[0]} patches are not a square grid"
        )
    grid = grid.reshape(1, old, old, -1).permute(0, 3, 1, 2).double()  # (1, D, old, old)
    grid = F.interpolate(grid, size=new_grid, mode="bilinear", align_corners=True)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], -1).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)


class _Arrays:
    """An official checkpoint's arrays, each taken at most once, so that the ones nothing took can
    be named."""

    def __init__(self, arrays: dict[str, np.ndarray], name: str, config: ModelConfig):
        self.arrays, self.name, self.config, self.used = arrays, name, config, set()

    def take(self, key: str) -> np.ndarray:
        if key not in self.arrays:
            raise CheckpointError(
                f"{self.name}: missing key {key!r}; is it a checkpoint of {self.config.name}?"
            )
        self.used.add(key)
        return self.arrays[key]

    def check_all_taken(self) -> None:
        unexpected = sorted(set(self.arrays) - self.used)
        if unexpected:
            more = f" and {len(unexpected) - 3} more" if len(unexpected) > 3 else ""
            raise CheckpointError(
                f"{self.name}: unexpected keys {', '.join(unexpected[:3])}{more}; is it a "
                f"checkpoint of {self.config.name}?"
            )


def _qkv_state(arrays: _Arrays, i: int) -> dict[str, torch.Tensor]:
    """Block i's fused query/key/value weight and bias from the three per-head official kernels."""
    config, D, heads = arrays.config, arrays.config.hidden_size, arrays.config.num_heads
    prefix = f"Transformer/encoderblock_{i}/MultiHeadDotProductAttention_1/"
    kernels = []
    for n in _QKV:
        kernel = arrays.take(prefix + n + "/kernel")
        if kernel.size != D * D:
            raise CheckpointError(
                f"{arrays.name}: {prefix}{n}/kernel has shape {kernel.shape}, {config.name} needs "
                f"({D}, {heads}, {D // heads})"
            )
        if (
            kernel.ndim == 3 and kernel.shape[1] != heads
        ):  # same weights, another function: refused as for vitlab's files
            raise CheckpointError(
                f"{arrays.name}: its model has {kernel.shape[1]} attention heads, this one "
                f"{heads}; pass --num_heads {kernel.shape[1]}"
            )
        kernels.append(kernel.reshape(D, D).T)
    bias = np.concatenate([arrays.take(prefix + n + "/bias").reshape(-1) for n in _QKV])
    return {
        f"blocks.{i}.attn.qkv.weight": torch.from_numpy(np.concatenate(kernels, axis=0)),
        f"blocks.{i}.attn.qkv.bias": torch.from_numpy(bias),
    }


def official_state(
    arrays: _Arrays, shapes: dict[str, torch.Size], keep_head: bool
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """vitlab's state dict from official arrays (the head left out unless kept), position embeddings
    resampled to the model's grid; and notes on what was adapted."""
    config, state, notes = arrays.config, {}, []
    for ours, theirs, layout in official_key_map(config):
        if ours.startswith("head.") and not keep_head:
            arrays.used.add(theirs)
            continue
        value = torch.from_numpy(
            np.ascontiguousarray(_from_official(arrays.take(theirs), layout, shapes[ours]))
        )
        if (
            ours == "pos_embed"
            and value.shape != shapes[ours]
            and value.ndim == 3
            and value.shape[-1] == shapes[ours][-1]
        ):
            prefix = 1 if config.classifier == "token" else 0
            notes.append(
                f"position embeddings resized from {value.shape[1] - prefix} to "
                f"{config.grid_size**2} patches"
            )
            value = resize_pos_embed(value, (config.grid_size, config.grid_size), prefix)
        if value.shape != shapes[ours]:
            raise CheckpointError(
                f"{arrays.name}: {theirs} has shape {tuple(value.shape)}, {config.name} needs "
                f"{tuple(shapes[ours])}; is it a checkpoint of another variant?"
            )
        state[ours] = value
    for i in range(config.depth):
        state.update(_qkv_state(arrays, i))
    if not config.representation_size and "pre_logits/kernel" in arrays.arrays:
        arrays.used.update(("pre_logits/kernel", "pre_logits/bias"))
        notes.append("pre-logits layer dropped (the model has none)")
    return state, notes


# What the official code computes that its files do not say: flax's LayerNorm eps and GELU form, the
# final norm before pooling, and the hybrid stem's own normalisation.
OFFICIAL_FUNCTION = {
    "gelu": "tanh",
    "layer_norm_eps": 1e-6,
    "final_norm": "before_pool",
    "stem_norm": "flax",
}


def not_official(config: ModelConfig) -> dict[str, object]:
    """The fields (with their official values) in which `config` computes otherwise than the
    official code."""
    return {
        f: v
        for f, v in OFFICIAL_FUNCTION.items()
        if getattr(config, f) != v and (f != "stem_norm" or config.is_hybrid)
    }


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
    arrays = _Arrays(
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
    arrays = normalise_keys(
        read_npz(path, base), base.depth
    )  # read once, for the shape and the weights
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
        representation_size=pre_logits.shape[-1] if pre_logits is not None else None,
        dropout_rate=0.0,
    )
    return load_official(VisionTransformer(config), arrays, verbose=False, name=str(path))


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


def _registry() -> dict[str, OfficialCheckpoint]:
    entries = []
    # The paper's ImageNet-21k files (with a pre-logits layer) and their ImageNet-1k fine-tunes.
    for legacy, short, width in (
        ("ViT-B_16", "B/16", 768),
        ("ViT-B_32", "B/32", 768),
        ("ViT-L_16", "L/16", 1024),
        ("ViT-L_32", "L/32", 1024),
        ("ViT-H_14", "H/14", 1280),
        ("R50+ViT-B_16", "R50+B/16", 768),
    ):
        name = legacy.replace("+", "-")
        entries.append(
            OfficialCheckpoint(
                name, f"imagenet21k/{legacy}.npz", short, 21843, 224, width, "ImageNet-21k"
            )
        )
        if short != "H/14":
            entries.append(
                OfficialCheckpoint(
                    f"{name}-384",
                    f"imagenet21k+imagenet2012/{legacy}.npz",
                    short,
                    1000,
                    384,
                    None,
                    "ImageNet-21k, fine-tuned on ImageNet-1k at 384 px",
                )
            )
    for legacy, short in (("ViT-B_16", "B/16"), ("ViT-L_16", "L/16")):
        entries.append(
            OfficialCheckpoint(
                f"{legacy}-224",
                f"imagenet21k+imagenet2012/{legacy}-224.npz",
                short,
                1000,
                224,
                None,
                "ImageNet-21k, fine-tuned on ImageNet-1k at 224 px",
            )
        )
    # The recommended AugReg files of Steiner et al. (2021), as listed in vision_transformer's
    # README.
    augreg = {
        "Ti/16": ("Ti_16", "none-wd_0.03-do_0.0-sd_0.0", "0.03"),
        "S/16": ("S_16", "light1-wd_0.03-do_0.0-sd_0.0", "0.03"),
        "S/32": ("S_32", "light1-wd_0.03-do_0.0-sd_0.0", "0.03"),
        "B/32": ("B_32", "medium1-wd_0.03-do_0.0-sd_0.0", "0.03"),
        "B/16": ("B_16", "medium1-wd_0.1-do_0.0-sd_0.0", "0.01"),
        "B/8": ("B_8", "medium1-wd_0.1-do_0.0-sd_0.0", "0.01"),
        "L/16": ("L_16", "medium1-wd_0.1-do_0.1-sd_0.1", "0.01"),
    }
    for short, (stem, recipe, ft_lr) in augreg.items():
        base = f"augreg/{stem}-i21k-300ep-lr_0.001-aug_{recipe}"
        entries.append(
            OfficialCheckpoint(
                f"augreg-{stem}", base + ".npz", short, 21843, 224, None, "AugReg, ImageNet-21k"
            )
        )
        if short != "L/16":
            entries.append(
                OfficialCheckpoint(
                    f"augreg-{stem}-224",
                    f"{base}--imagenet2012-steps_20k-lr_{ft_lr}-res_224.npz",
                    short,
                    1000,
                    224,
                    None,
                    "AugReg, ImageNet-21k, fine-tuned on ImageNet-1k at 224 px",
                )
            )
    return {e.name: e for e in entries}


OFFICIAL_CHECKPOINTS: dict[str, OfficialCheckpoint] = _registry()


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

"""The official `.npz` files of google-research/vision_transformer: vitlab's parameters under their
keys and in their array layout, both ways (big_vision's stacked layout read as well), and the
reading of such a file, bounded in size and without pickle.

Keys are joined with "/", kernels stored in (in, out) order and attention kernels split per head.
Files are read with `allow_pickle=False`: nothing in them is executed. Loading a file into a model,
writing one, and the published files by name are in `official.py`.
"""

from __future__ import annotations

import math
import os
import re
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..config import ModelConfig, get_config
from ..errors import CheckpointError
from ..model import VisionTransformer, count_parameters

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
    if config.has_class_token:
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
        # Old GroupNorm params are (1, 1, 1, C)
        array = array.reshape(-1) if array.size == target_shape.numel() else array
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
            # (D, heads, head_dim)
            arrays[prefix + "kernel"] = weight[j * D : (j + 1) * D].T.reshape(D, H, D // H)
            arrays[prefix + "bias"] = bias[j * D : (j + 1) * D].reshape(H, D // H)
    return arrays


# big_vision's layout (as timm's loader reads it): everything under a prefix ("opt/target/" in its
# training checkpoints, "params/img/" for the image tower of its two-tower files: SigLIP, LiT), the
# position embeddings at the top level, the sub-modules of a block numbered from 0 (attention 0,
# second LayerNorm 1, MLP 0), the blocks stacked on one leading axis under
# "Transformer/encoderblock/" (scanned) or one key each.
_BIG_VISION_NAMES = (
    ("/MultiHeadDotProductAttention_0/", "/MultiHeadDotProductAttention_1/"),
    ("/LayerNorm_1/", "/LayerNorm_2/"),
    ("/MlpBlock_0/", "/MlpBlock_3/"),
)


def normalise_keys(
    arrays: dict[str, np.ndarray], depth: int, prefix: str = "opt/target/"
) -> dict[str, np.ndarray]:
    """Keys of any supported layout in the original vision_transformer layout; a big_vision file's
    are those under `prefix` (the rest, an optimizer's state or another tower, left out)."""
    if not any(k.startswith(prefix) for k in arrays):
        return arrays
    arrays = {k.removeprefix(prefix): v for k, v in arrays.items() if k.startswith(prefix)}
    # As timm tells big_vision's numbering: a top-level position table, or stacked blocks
    renumber = "pos_embedding" in arrays or any(
        k.startswith("Transformer/encoderblock/") for k in arrays
    )
    out = {}
    for key, value in arrays.items():
        if key == "pos_embedding":
            out["Transformer/posembed_input/pos_embedding"] = value
            continue
        block = re.fullmatch(r"Transformer/encoderblock(_\d+)?(/.*)", key)
        if not block or not renumber:
            out[key] = value
            continue
        name = block[2]
        for old, new in _BIG_VISION_NAMES:
            name = name.replace(old, new)
        if block[1]:
            out[f"Transformer/encoderblock{block[1]}{name}"] = value
            continue
        if value.shape[0] != depth:
            raise CheckpointError(
                f"stacked block parameter {key} has {value.shape[0]} layers, the model has {depth}"
            )
        for i in range(depth):  # (depth, ...) -> one key per block
            out[f"Transformer/encoderblock_{i}{name}"] = value[i]
    return out


# ---------------------------------------------------------------------------------------------
# Reading a file: its size bounded before it is read, and nothing unpickled.


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


def _check_npz_sizes(path: Path, budget: int, prefix: str) -> None:
    """Each array's header read (a few bytes, not its data): its stored size must be what its shape
    and dtype say, and all together (those under `prefix`) at most `budget` numbers. So an archive
    whose member inflates to gigabytes is refused first."""
    total = 0
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            if not info.filename.endswith(".npy") or not info.filename.startswith(prefix):
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


def read_npz(
    path: str | os.PathLike, config: ModelConfig | None = None, prefix: str = ""
) -> dict[str, np.ndarray]:
    """The arrays of an `.npz` file whose keys start with `prefix` (all by default; the image tower
    of a two-tower file is read alone), read without pickle, checked against the size of
    `config`'s checkpoints (`npz_budget`; ViT-H/14's when None) before reading; one clear error for
    any damage."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        if zipfile.is_zipfile(path):
            _check_npz_sizes(path, npz_budget(config or get_config("H/14")), prefix)
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise CheckpointError(f"{path}: a single .npy array, not an .npz checkpoint")
        with data:
            arrays = {key: data[key] for key in data.files if key.startswith(prefix)}
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


# ---------------------------------------------------------------------------------------------
# Official arrays into vitlab's state dict, taken at most once each.


def resample_positions(pos_embed: torch.Tensor, prefix: int, grid: int) -> torch.Tensor:
    """The official resampling of `vit_jax/checkpoint.py`: the `prefix` rows (the class token's)
    kept apart, the grid zoomed to `grid` x `grid` with `scipy.ndimage.zoom(order=1)`, which is
    bilinear interpolation with align_corners=True, in float64."""
    head, table = pos_embed[:, :prefix], pos_embed[0, prefix:]
    old = int(round(table.shape[0] ** 0.5))
    if old * old != table.shape[0]:
        raise CheckpointError(
            f"position embeddings of {table.shape[0]} patches are not a square grid"
        )
    table = table.reshape(1, old, old, -1).permute(0, 3, 1, 2).double()  # (1, D, old, old)
    table = F.interpolate(table, size=(grid, grid), mode="bilinear", align_corners=True)
    table = table.permute(0, 2, 3, 1).reshape(1, grid * grid, -1).to(pos_embed.dtype)
    return torch.cat([head, table], dim=1)


class OfficialArrays:
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


def _qkv_state(arrays: OfficialArrays, i: int) -> dict[str, torch.Tensor]:
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
        # Same weights, another function: refused as for vitlab's files
        if kernel.ndim == 3 and kernel.shape[1] != heads:
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
    arrays: OfficialArrays, shapes: dict[str, torch.Size], keep_head: bool
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
            prefix = config.num_positions - config.grid_size**2
            notes.append(
                f"position embeddings resized from {value.shape[1] - prefix} to "
                f"{config.grid_size**2} patches"
            )
            value = resample_positions(value, prefix, config.grid_size)
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

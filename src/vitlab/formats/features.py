"""Files of frozen features (`vitlab embed`): safetensors holding `features` (N, width) float32 and
`labels` (N,) int64, with in the metadata the images' names, the class names, the backbone they came
from and the feature model's config (how the tokens were pooled), so that a probe trained on them
goes back on that backbone as an ordinary model.

A large folder is embedded in chunks, each written whole to `<out>.parts/` as it is done, so that an
interrupted run keeps what it did and `--resume` continues where it stopped; the parts become `<out>`
at the end. The parts' manifest says which run they belong to: a resume of another run is refused.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import ModelConfig
from ..errors import CheckpointError, ConfigError
from .files import atomic_write

FORMAT = "vitlab features"


@dataclass
class FeatureSet:
    features: torch.Tensor  # (N, width) float32
    labels: torch.Tensor  # (N,) int64
    names: list[str]  # each image's path, or "<dataset>/<split>/<index>"
    class_names: list[str]
    source: str  # the backbone's checkpoint, as given
    model_type: str | None  # its variant, for an official .npz file
    backbone: str  # the SHA-256 of the backbone's weights
    config: ModelConfig  # the feature model: the backbone pooled as the features were

    def check(self, path) -> None:
        n = len(self.labels)
        if self.features.shape != (n, self.config.pooled_width) or len(self.names) != n:
            raise CheckpointError(
                f"{path}: {tuple(self.features.shape)} features for {n} labels and "
                f"{len(self.names)} names of width {self.config.pooled_width}: inconsistent"
            )
        if n and not 0 <= int(self.labels.min()) <= int(self.labels.max()) < len(self.class_names):
            raise CheckpointError(f"{path}: labels outside its {len(self.class_names)} classes")


def _metadata(features: FeatureSet) -> dict[str, str]:
    return {
        "format": FORMAT,
        "names": json.dumps(features.names),
        "class_names": json.dumps(features.class_names),
        "source": features.source,
        "model_type": json.dumps(features.model_type),
        "backbone": features.backbone,
        "model_config": json.dumps(features.config.to_dict()),
    }


def write_features(path: str | os.PathLike, features: FeatureSet) -> None:
    from safetensors.torch import save

    tensors = {"features": features.features.float().contiguous(), "labels": features.labels}
    data = save(tensors, metadata=_metadata(features))
    atomic_write(path, lambda f: f.write(data))


def is_features_file(path: str | os.PathLike) -> bool:
    """Whether `path` is a features file (its safetensors header says so), without reading it."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format") == FORMAT
    except (SafetensorError, OSError):
        return False


def check_same_features(train: FeatureSet, test: FeatureSet, train_path, test_path) -> None:
    """Refuse two features files that are not of one backbone, pooling and classes."""
    if train.backbone != test.backbone or train.config != test.config:
        raise ConfigError(
            f"{train_path} and {test_path} are features of other backbones or poolings; embed both "
            "with the same checkpoint, --tokens and --blocks"
        )
    if train.class_names != test.class_names:
        raise ConfigError(f"{train_path} and {test_path} have other classes")


def read_features(path: str | os.PathLike) -> FeatureSet:
    """A features file, checked: refused in one line if it is none, or inconsistent."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such features file")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != FORMAT:
                raise CheckpointError(f"{path}: not a features file of `vitlab embed`")
            tensors = {k: f.get_tensor(k) for k in ("features", "labels")}
        features = FeatureSet(
            tensors["features"],
            tensors["labels"],
            json.loads(metadata["names"]),
            json.loads(metadata["class_names"]),
            metadata["source"],
            json.loads(metadata["model_type"]),
            metadata["backbone"],
            ModelConfig.from_dict(json.loads(metadata["model_config"])),
        )
    except (SafetensorError, OSError, KeyError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable features file ({e})") from None
    features.check(path)
    return features


class ChunkedWriter:
    """Chunks of a features file written whole to `<out>.parts/` as they are done; `identity` (the
    backbone, the images, how they are pooled) says which run the parts belong to."""

    def __init__(self, out: Path, identity: dict, *, total: int, chunk: int, resume: bool):
        self.out, self.parts = out, out.with_name(out.name + ".parts")
        # as JSON reads it back (tuples as lists), to compare with a manifest on disk
        self.manifest = json.loads(
            json.dumps({"identity": identity, "total": total, "chunk": chunk})
        )
        found = self.parts / "manifest.json"
        if found.is_file() and not resume:
            raise ConfigError(
                f"{self.parts} holds an interrupted embed of {out}: --resume continues it, or "
                "delete that folder to start afresh"
            )
        if resume and found.is_file():
            if json.loads(found.read_text()) != self.manifest:
                raise ConfigError(
                    f"--resume: {self.parts} belongs to another embed (another backbone, images, "
                    "pooling, precision or chunk size); delete it to start afresh"
                )
        else:
            self.parts.mkdir(parents=True, exist_ok=True)
            text = json.dumps(self.manifest, indent=2) + "\n"
            atomic_write(found, lambda f: f.write(text.encode()))

    def _part(self, index: int) -> Path:
        return self.parts / f"part-{index:05d}.safetensors"

    def _chunks(self) -> list[tuple[int, int, int]]:
        total, chunk = self.manifest["total"], self.manifest["chunk"]
        return [(i, s, min(s + chunk, total)) for i, s in enumerate(range(0, total, chunk))]

    def pending(self) -> list[tuple[int, int, int]]:
        """(chunk index, first image, end) of each chunk not yet written."""
        return [c for c in self._chunks() if not self._part(c[0]).is_file()]

    def write(self, index: int, features: torch.Tensor, labels: torch.Tensor) -> None:
        from safetensors.torch import save

        data = save({"features": features.float().contiguous(), "labels": labels.contiguous()})
        atomic_write(self._part(index), lambda f: f.write(data))

    def finish(self, **metadata) -> FeatureSet:
        """The parts joined into the features file (`metadata`: FeatureSet's other fields); the
        parts' folder removed once it is written."""
        from safetensors.torch import load_file

        chunks = [load_file(self._part(i)) for i, _, _ in self._chunks()]
        features = FeatureSet(
            torch.cat([c["features"] for c in chunks]),
            torch.cat([c["labels"] for c in chunks]),
            **metadata,
        )
        features.check(self.parts)
        write_features(self.out, features)
        shutil.rmtree(self.parts)
        return features

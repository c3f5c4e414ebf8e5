"""A model for other runtimes: ONNX (checked against PyTorch with onnxruntime), TorchScript,
safetensors and the official `.npz` layout. Every file is written whole or not at all.

ONNX and TorchScript take float32 images (B, 3, img_size, img_size) in [-1, 1], any batch size,
and give logits (B, num_classes); the class names ride along in the ONNX metadata (`class_names`)
and as `class_names.json` among the TorchScript file's extra files.
"""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import torch

from . import checkpoints, official
from .files import atomic_write
from .errors import VitlabError
from .model import VisionTransformer

FORMATS = ("onnx", "torchscript", "safetensors", "npz")
ONNX_OPSET = 18  # the dynamo exporter's lowest native opset; asking for less makes it convert down
ONNX_TOLERANCE = 1e-4  # largest |onnxruntime - PyTorch| logit difference accepted, in float32
ONNX_CHECK_BATCH_SIZES = (1, 3)  # neither is the traced batch of 2, so the dynamic batch axis is exercised


class ExportError(VitlabError):
    """An export that cannot be done or did not reproduce the model; nothing was written."""


def export(model: VisionTransformer, class_names: list[str], fmt: str, path: str | os.PathLike) -> str:
    """Write `model` to `path` in format `fmt`; returns a line that says what was checked or left out."""
    model = model.float().cpu().eval()
    if fmt == "onnx":
        difference = export_onnx(model, class_names, path)
        sizes = " and ".join(str(b) for b in ONNX_CHECK_BATCH_SIZES)
        return f"onnxruntime matches PyTorch at batch sizes {sizes}: max |difference| {difference:.2e} (limit {ONNX_TOLERANCE:.0e})"
    if fmt == "torchscript":
        export_torchscript(model, class_names, path)
        return "TorchScript: torch.jit.load(path) gives the model (PyTorch deprecates TorchScript; ONNX is the lasting format)"
    if fmt == "safetensors":
        checkpoints.save_safetensors(model, path, class_names)
        return "safetensors: weights with the model config and class names in the metadata"
    if fmt == "npz":
        if model.config.gelu != "tanh":
            raise ExportError("the official .npz layout implies the tanh GELU, and this model uses the exact one; "
                              "export safetensors, ONNX or TorchScript instead")  # fmt: skip
        official.save_npz(model, path)
        return "official .npz layout: weights only; the class names and the variant are not stored (load with --model_type)"
    raise ExportError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")


def _example(model: VisionTransformer, batch: int, seed: int = 0) -> torch.Tensor:
    size = model.config.img_size
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def export_onnx(model: VisionTransformer, class_names: list[str], path: str | os.PathLike) -> float:
    """ONNX with a dynamic batch axis, written only if onnxruntime reproduces PyTorch's float32 logits
    within ONNX_TOLERANCE at two batch sizes. Returns the largest difference seen."""
    try:  # all three now, before the export's work, so that a missing one is one clear message
        import onnx
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise ExportError(f"ONNX export needs onnx, onnxscript and onnxruntime ({e}); pip install 'vitlab[export]'") from None
    batch = torch.export.Dim("batch")
    program = torch.onnx.export(
        model, (_example(model, 2),), input_names=["images"], output_names=["logits"], opset_version=ONNX_OPSET,
        dynamo=True, dynamic_shapes={"images": {0: batch}}, verbose=False,
    )  # fmt: skip
    proto = program.model_proto
    onnx.helper.set_model_props(proto, {"class_names": json.dumps(class_names)})
    data = proto.SerializeToString()
    difference = onnx_difference(model, data)
    if not difference <= ONNX_TOLERANCE:  # a NaN difference is refused too
        raise ExportError(f"onnxruntime differs from PyTorch by {difference:.2e} (limit {ONNX_TOLERANCE:.0e}); {path} not written")
    atomic_write(path, lambda f: f.write(data))
    return difference


def onnx_difference(model: VisionTransformer, data: bytes) -> float:
    """Largest |onnxruntime - PyTorch| over the logits of random images at each check batch size."""
    import onnxruntime

    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    differences = []
    for seed, batch in enumerate(ONNX_CHECK_BATCH_SIZES, start=1):
        images = _example(model, batch, seed)
        with torch.no_grad():
            expected = model(images).numpy()
        (got,) = session.run(["logits"], {"images": images.numpy()})
        differences.append(np.abs(got - expected).max())
    return float(np.max(differences))  # NaN stays NaN, where max() would skip it


def export_torchscript(model: VisionTransformer, class_names: list[str], path: str | os.PathLike) -> None:
    extra = {"class_names.json": json.dumps(class_names)}
    with warnings.catch_warnings():
        # The trace records the check on the token count as a constant, which is right: the traced
        # model takes the one image size it was built for. And torch's notices that TorchScript is
        # deprecated speak to the caller of torch.jit, which is this function, not the user; the
        # line export() returns says it once.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(model, (_example(model, 2),))
        atomic_write(path, lambda f: torch.jit.save(traced, f, _extra_files=extra))

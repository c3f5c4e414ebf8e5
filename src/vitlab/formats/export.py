"""A model for other runtimes and libraries: ONNX (checked against PyTorch with onnxruntime),
TorchScript, safetensors, the official `.npz` layout, a timm state dict and a transformers folder
(each checked by running that library on it, where it is installed). Every file is written whole or
not at all.

ONNX and TorchScript take float32 RGB images (B, 3, img_size, img_size), any batch size, prepared
as the model's own were: resized as its `resize`, `crop_pct` and `interpolation` say, then
(pixel / 255 - image_mean) / image_std per channel (the official ViT's 0.5 and 0.5: images in
[-1, 1]); they give logits (B, num_classes). How to prepare the images and the class names ride
along: in the ONNX metadata (`input`, `img_size`, `image_mean`, `image_std`, `resize`, `crop_pct`,
`interpolation`, `class_names`) and among the TorchScript file's extra files (`preprocessing.json`,
`class_names.json`).
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from ..errors import ExportError
from ..model import VisionTransformer
from ..preprocessing import from_unit, metadata
from . import hf_layout, official, timm_arch, timm_layout
from .files import atomic_write, atomic_write_dir
from .hf_preprocessing import write_preprocessing
from .weights import save_safetensors

FORMATS = ("onnx", "torchscript", "safetensors", "npz", "timm", "hf")
ONNX_OPSET = 18  # the dynamo exporter's lowest native opset; asking for less makes it convert down
TOLERANCE = 1e-4  # largest |other runtime - PyTorch| logit difference accepted, in float32
# Neither is ONNX's traced batch of 2, so its dynamic batch axis is exercised
CHECK_BATCH_SIZES = (
    1,
    3,
)


def export(
    model: VisionTransformer, class_names: list[str], fmt: str, path: str | os.PathLike
) -> str:
    """Write `model` to `path` in format `fmt`; returns a line that says what was checked or left
    out."""
    model = model.float().cpu().eval()
    if fmt == "onnx":
        difference = export_onnx(model, class_names, path)
        return (
            f"onnxruntime matches PyTorch at batch sizes {_sizes()}: max |difference| "
            f"{difference:.2e} (limit {TOLERANCE:.0e})"
        )
    if fmt == "torchscript":
        export_torchscript(model, class_names, path)
        return (
            "TorchScript: torch.jit.load(path) gives the model (PyTorch deprecates TorchScript; "
            "ONNX is the lasting format)"
        )
    if fmt == "safetensors":
        save_safetensors(model, path, class_names)
        return "safetensors: weights with the model config and class names in the metadata"
    if fmt == "npz":
        differ = official.not_official(model.config)
        if differ:
            ours = ", ".join(f"{f} {getattr(model.config, f)}" for f in differ)
            raise ExportError(
                "the official .npz layout implies "
                f"{', '.join(f'{f} {v}' for f, v in differ.items())}, and this model has {ours}; "
                "export safetensors, timm, hf, ONNX or TorchScript instead"
            )
        official.save_npz(model, path)
        return (
            "official .npz layout: weights only; the class names and the variant are not stored "
            "(load with --model_type)"
        )
    if fmt == "timm":
        return export_timm(model, class_names, path)
    if fmt == "hf":
        return export_hf(model, class_names, path)
    raise ExportError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")


def _example(model: VisionTransformer, batch: int, seed: int = 0) -> torch.Tensor:
    """Random images in [0, 1], normalised as the model's images are."""
    config, generator = model.config, torch.Generator().manual_seed(seed)
    size = config.img_size
    images = torch.rand(batch, 3, size, size, generator=generator)
    return from_unit(images, config.image_mean, config.image_std)


def export_onnx(model: VisionTransformer, class_names: list[str], path: str | os.PathLike) -> float:
    """ONNX with a dynamic batch axis, written only if onnxruntime reproduces PyTorch's float32
    logits within TOLERANCE at two batch sizes. Returns the largest difference seen."""
    try:  # all three now, before the export's work, so that a missing one is one clear message
        import onnx
        import onnxruntime
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise ExportError(
            f"ONNX export needs onnx, onnxscript and onnxruntime ({e}); pip install "
            "'vitlab[export]'"
        ) from None
    batch = torch.export.Dim("batch")
    program = torch.onnx.export(
        model,
        (_example(model, 2),),
        input_names=["images"],
        output_names=["logits"],
        opset_version=ONNX_OPSET,
        dynamo=True,
        dynamic_shapes={"images": {0: batch}},
        verbose=False,
    )
    proto = program.model_proto
    props = {**metadata(model.config), "class_names": json.dumps(class_names)}
    onnx.helper.set_model_props(proto, props)
    data = proto.SerializeToString()
    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    difference = checked_difference(
        model,
        lambda images: torch.from_numpy(session.run(["logits"], {"images": images.numpy()})[0]),
        "onnxruntime",
        path,
    )
    atomic_write(path, lambda f: f.write(data))
    return difference


def checked_difference(model: VisionTransformer, run, runtime: str, path) -> float:
    """Largest |run(images) - model(images)| over the logits of random images at each check batch
    size; raises ExportError (nothing written) if it is over TOLERANCE or NaN."""
    differences = []
    for seed, batch in enumerate(CHECK_BATCH_SIZES, start=1):
        images = _example(model, batch, seed)
        with torch.no_grad():
            differences.append((run(images).float() - model(images)).abs().max().item())
    difference = float(np.max(differences))  # NaN stays NaN, where max() would skip it
    if not difference <= TOLERANCE:
        raise ExportError(
            f"{runtime} differs from PyTorch by {difference:.2e} (limit {TOLERANCE:.0e}); {path} "
            "not written"
        )
    return difference


def _sizes() -> str:
    return " and ".join(str(b) for b in CHECK_BATCH_SIZES)


def export_timm(model: VisionTransformer, class_names: list[str], path: str | os.PathLike) -> str:
    """A safetensors state dict in timm's layout (vitlab's model config and class names in its
    metadata, which timm ignores), written once `timm.create_model` of it has reproduced the model's
    logits, where timm is installed."""
    from safetensors.torch import save

    state = timm_layout.to_timm(model)
    name, kwargs = timm_arch.timm_args(model.config)
    metadata = {
        "format": "pt",
        "model_config": json.dumps(model.config.to_dict()),
        "class_names": json.dumps(class_names),
    }
    data = save(state, metadata=metadata)
    overlay = {"file": str(path), "num_classes": model.config.num_classes}
    call = (
        f"timm.create_model({name!r}, pretrained=True, pretrained_cfg_overlay={overlay!r}, "
        f"{timm_arch.format_args(kwargs)})"
    )
    try:
        import timm
    except ImportError:
        atomic_write(path, lambda f: f.write(data))
        return f"timm layout, not checked (timm is not installed); {call} loads it"
    with tempfile.TemporaryDirectory() as folder:
        file = Path(folder) / "model.safetensors"
        file.write_bytes(data)
        library, overlay_here = f"timm {timm.__version__}", {**overlay, "file": str(file)}
        reference = _loaded(
            library,
            path,
            lambda: timm.create_model(
                name, pretrained=True, pretrained_cfg_overlay=overlay_here, **kwargs
            ),
        )
        difference = checked_difference(model, reference, library, path)
    atomic_write(path, lambda f: f.write(data))
    return (
        f"timm {timm.__version__}: {call} gives the model's logits at batch sizes {_sizes()}: max "
        f"|difference| {difference:.2e}"
    )


def export_hf(model: VisionTransformer, class_names: list[str], path: str | os.PathLike) -> str:
    """A folder as transformers' `save_pretrained` writes it (config.json with id2label,
    model.safetensors, and preprocessor_config.json of how the model's images are fed) for the
    transformers class that computes the model's function (`hf_layout.to_hf`), put in place once
    that class's `from_pretrained` of it has reproduced the model's logits, where transformers is
    installed."""
    from safetensors.torch import save

    written = hf_layout.to_hf(model, class_names)
    preprocessor = write_preprocessing(model.config)
    path = Path(path)
    ours = {"config.json", "model.safetensors", "preprocessor_config.json"}
    if path.exists() and not (path.is_dir() and {p.name for p in path.iterdir()} <= ours):
        raise ExportError(
            f"{path} exists and is not a folder this export wrote; choose a new folder"
        )
    result = []

    def write(folder: Path) -> None:
        (folder / "config.json").write_text(json.dumps(written.config, indent=2) + "\n")
        (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")
        (folder / "model.safetensors").write_bytes(save(written.state, metadata={"format": "pt"}))
        result.append(_check_hf(model, written, folder, path))

    atomic_write_dir(path, write)
    return result[0]


def _check_hf(model: VisionTransformer, written: hf_layout.HfExport, folder: Path, path) -> str:
    """The line that says how transformers' own model of `folder` compares with `model`; raises
    ExportError where it differs."""
    try:
        import transformers
    except ImportError:
        return "transformers layout, not checked (transformers is not installed)"
    library, logging = f"transformers {transformers.__version__}", transformers.utils.logging
    shown, verbosity = logging.is_progress_bar_enabled(), logging.get_verbosity()
    # The bar and notices of this check's loading are none of the user's business (SigLIP's default
    # text config warns of its own token ids in transformers 5): the logits are compared below.
    logging.disable_progress_bar()
    logging.set_verbosity_error()
    try:
        reference = _loaded(
            library,
            path,
            lambda: getattr(transformers, written.architecture).from_pretrained(folder),
        )
    finally:
        logging.set_verbosity(verbosity)
        if shown:
            logging.enable_progress_bar()
    difference = checked_difference(
        model,
        lambda images: getattr(reference(pixel_values=images), written.output),
        library,
        path,
    )
    return (
        f"{library}: {written.architecture}.from_pretrained({str(path)!r}) gives the model's "
        f"logits at batch sizes {_sizes()}: max |difference| {difference:.2e}"
    )


def _loaded(library: str, path, load) -> torch.nn.Module:
    try:
        return load().eval()
    except Exception as e:  # a release of the library that cannot build or read this model
        raise ExportError(
            f"{library} could not load the export ({type(e).__name__}: {str(e).strip()[:200]}); "
            f"{path} not written"
        ) from None


def export_torchscript(
    model: VisionTransformer, class_names: list[str], path: str | os.PathLike
) -> None:
    extra = {
        "class_names.json": json.dumps(class_names),
        "preprocessing.json": json.dumps(metadata(model.config), indent=2),
    }
    with warnings.catch_warnings():
        # The trace records the check on the token count as a constant, which is right: the traced
        # model takes the one image size it was built for. And torch's notices that TorchScript is
        # deprecated speak to the caller of torch.jit, which is this function, not the user; the
        # line export() returns says it once.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(model, (_example(model, 2),))
        atomic_write(path, lambda f: torch.jit.save(traced, f, _extra_files=extra))

"""`vitlab export`: each format reloads to the same logits; an ONNX file that onnxruntime does not
reproduce is refused and nothing is left behind."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from vitlab.app.cli import main
from vitlab.formats import official, official_layout, weights
from vitlab.formats.checkpoints import load_model
from vitlab.model import VisionTransformer, create_model


def images(batch: int) -> torch.Tensor:
    return torch.rand(batch, 3, 16, 16, generator=torch.Generator().manual_seed(batch)) * 2 - 1


@pytest.fixture(scope="module")
def trained(tiny_run):
    model, names = load_model(tiny_run.checkpoint)
    return model, names


def test_onnx_export_matches_pytorch_at_any_batch_size(tiny_run, trained, tmp_path, capsys):
    onnx = pytest.importorskip("onnx")
    onnxruntime = pytest.importorskip("onnxruntime")
    path = tmp_path / "model.onnx"
    assert main(["export", str(tiny_run.checkpoint), "--format", "onnx", "--out", str(path)]) == 0
    assert "max |difference|" in capsys.readouterr().out
    model, names = trained
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert json.loads(props["class_names"]) == names
    # How its images are fed: the run's model, the official [-1, 1]
    assert props["image_mean"] == props["image_std"] == "0.5,0.5,0.5"
    assert (props["img_size"], props["resize"], props["crop_pct"]) == ("16", "squash", "1.0")
    assert props["interpolation"] == "bilinear" and "float32 (batch, 3, 16, 16)" in props["input"]
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert isinstance(session.get_inputs()[0].shape[0], str)  # a named, dynamic batch axis
    for batch in (1, 5):
        (got,) = session.run(None, {"images": images(batch).numpy()})
        with torch.no_grad():
            torch.testing.assert_close(
                torch.from_numpy(got), model(images(batch)), atol=1e-4, rtol=0
            )


def test_onnx_export_that_differs_is_refused(tiny_run, tmp_path, capsys, monkeypatch):
    onnxruntime = pytest.importorskip("onnxruntime")

    class Off(onnxruntime.InferenceSession):  # a runtime whose logits are 1e-3 off
        def run(self, *args, **kwargs):
            return [out + 1e-3 for out in super().run(*args, **kwargs)]

    monkeypatch.setattr(onnxruntime, "InferenceSession", Off)
    path = tmp_path / "model.onnx"
    assert main(["export", str(tiny_run.checkpoint), "--format", "onnx", "--out", str(path)]) == 1
    line = capsys.readouterr().err.strip().splitlines()
    assert len(line) == 1 and "1.00e-03" in line[0] and "not written" in line[0]
    assert list(tmp_path.iterdir()) == []  # neither the file nor a temporary one


def test_onnx_export_without_onnxruntime_says_what_to_install(
    tiny_run, tmp_path, capsys, monkeypatch
):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` fail
    assert (
        main(
            [
                "export",
                str(tiny_run.checkpoint),
                "--format",
                "onnx",
                "--out",
                str(tmp_path / "m.onnx"),
            ]
        )
        == 1
    )
    line = capsys.readouterr().err.strip().splitlines()
    assert len(line) == 1 and "vitlab[export]" in line[0]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_torchscript_export_runs_without_vitlab_code(tiny_run, trained, tmp_path):
    path = tmp_path / "model.pt"
    assert (
        main(["export", str(tiny_run.checkpoint), "--format", "torchscript", "--out", str(path)])
        == 0
    )
    extra = {"class_names.json": "", "preprocessing.json": ""}
    scripted = torch.jit.load(str(path), _extra_files=extra)
    fed = json.loads(extra["preprocessing.json"])
    assert fed["image_mean"] == "0.5,0.5,0.5" and fed["interpolation"] == "bilinear"
    model, names = trained
    assert json.loads(extra["class_names.json"]) == names
    with torch.no_grad():
        for batch in (1, 3):
            torch.testing.assert_close(scripted(images(batch)), model(images(batch)))


def test_safetensors_export_reloads_with_config_and_names(tiny_run, trained, tmp_path):
    path = tmp_path / "model.safetensors"
    assert (
        main(["export", str(tiny_run.checkpoint), "--format", "safetensors", "--out", str(path)])
        == 0
    )
    reloaded, names = load_model(path)
    model, expected_names = trained
    assert names == expected_names and reloaded.config == model.config
    with torch.no_grad():
        torch.testing.assert_close(reloaded(images(2)), model(images(2)))


def test_npz_export_is_the_official_layout(tiny_run, trained, tmp_path, capsys):
    path = tmp_path / "model.npz"
    assert main(["export", str(tiny_run.checkpoint), "--format", "npz", "--out", str(path)]) == 0
    assert "class names" in capsys.readouterr().out  # says what the layout cannot hold
    model, _ = trained
    assert (
        "Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel"
        in official_layout.read_npz(path)
    )
    reloaded = official.load_official(VisionTransformer(model.config), path, verbose=False).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(images(2)), model(images(2)))


def test_npz_export_of_an_exact_gelu_model_is_refused(tmp_path, capsys):
    # The layout carries weights only, read back as the tanh GELU: an exact-GELU model would reload as another function.
    model = create_model(
        "Ti/16",
        patch_size=4,
        img_size=16,
        depth=1,
        hidden_size=16,
        num_heads=2,
        mlp_dim=32,
        num_classes=3,
        gelu="exact",
    )
    source = tmp_path / "exact.safetensors"
    weights.save_safetensors(model, source, ["a", "b", "c"])
    out = tmp_path / "model.npz"
    assert main(["export", str(source), "--format", "npz", "--out", str(out)]) != 0
    assert "exact" in capsys.readouterr().err and not out.exists()

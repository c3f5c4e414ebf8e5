"""What every library format shares: a run's checkpoint round-trips through timm's and transformers' layouts; every
export refuses what its format cannot hold, writing nothing, and is written unchecked (or refused) where the library is
missing (or cannot load it); hf-hub: names go through huggingface_hub. Each library's own layout is tested in
test_timm_layout.py and test_hf_layout.py."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from vitlab.app.cli import main
from vitlab.formats.checkpoints import load_model
from vitlab.formats.weights import save_safetensors
from vitlab.model import create_model

from conftest import vitlab_processes
from parity import (
    one_error_line,
    state_equal,
    timm_model,
)

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module", autouse=True)
def no_progress_bars():
    """save_pretrained's progress bar on stderr would hide the one-line errors these tests look for."""
    transformers.utils.logging.disable_progress_bar()
    yield
    transformers.utils.logging.enable_progress_bar()


# ---------------------------------------------------------------------------------------------
# Writing: vitlab -> timm -> vitlab, vitlab -> hf -> vitlab


def test_run_checkpoint_round_trips_through_both(tiny_run, tmp_path):
    model, names = load_model(tiny_run.checkpoint)
    for fmt, out in (("timm", tmp_path / "t.safetensors"), ("hf", tmp_path / "hf")):
        assert main(["export", str(tiny_run.checkpoint), "--format", fmt, "--out", str(out)]) == 0
        back, back_names = load_model(out)
        assert back_names == names
        state_equal(back, model)


# ---------------------------------------------------------------------------------------------
# Refusals: one line naming the field, and nothing written


EXPORT_REFUSALS = {
    ("timm", "pre-logits"): (
        dict(representation_size=24),
        "no pre-logits layer (representation_size)",
    ),
    ("timm", "official hybrid stem"): (
        dict(name="R50+B/16", img_size=64, hidden_size=768, num_heads=12),
        "stem_norm flax",
    ),
    ("timm", "hybrid timm lacks"): (
        dict(name="R50+B/16", img_size=64, hidden_size=768, num_heads=12, resnet_layers=(1,)),
        "no hybrid",
    ),
    ("npz", "eps 1e-12"): (dict(layer_norm_eps=1e-12), "layer_norm_eps 1e-06"),
    ("npz", "fc_norm"): (dict(classifier="gap", final_norm="after_pool"), "final_norm before_pool"),
}


@pytest.mark.parametrize("fmt,case", list(EXPORT_REFUSALS))
def test_export_refusals_write_nothing(fmt, case, tmp_path, capsys):
    changes, expected = EXPORT_REFUSALS[(fmt, case)]
    spec = {
        "name": "Ti/16",
        "img_size": 32,
        "depth": 1,
        "hidden_size": 48,
        "num_heads": 3,
        "mlp_dim": 96,
        **changes,
    }
    model = create_model(spec.pop("name"), num_classes=3, **spec)
    save_safetensors(model, tmp_path / "source.safetensors", ["a", "b", "c"])
    out = tmp_path / f"out.{fmt}"
    assert (
        main(["export", str(tmp_path / "source.safetensors"), "--format", fmt, "--out", str(out)])
        == 1
    )
    assert expected in one_error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["source.safetensors"]


@pytest.mark.parametrize("fmt,library", [("timm", "timm"), ("hf", "transformers")])
def test_export_without_the_library_is_written_unchecked(
    fmt, library, tiny_run, tmp_path, capsys, monkeypatch
):
    monkeypatch.setitem(sys.modules, library, None)  # makes `import` fail
    out = tmp_path / "out"
    assert main(["export", str(tiny_run.checkpoint), "--format", fmt, "--out", str(out)]) == 0
    assert f"not checked ({library} is not installed)" in capsys.readouterr().out
    state_equal(load_model(out)[0], load_model(tiny_run.checkpoint)[0])


def test_export_the_library_cannot_load_is_refused(tiny_run, tmp_path, capsys, monkeypatch):
    def fails(*args, **kwargs):
        # An older timm
        raise TypeError("VisionTransformer.__init__() got an unexpected keyword argument 'fc_norm'")

    monkeypatch.setattr(timm, "create_model", fails)
    assert (
        main(
            [
                "export",
                str(tiny_run.checkpoint),
                "--format",
                "timm",
                "--out",
                str(tmp_path / "t.safetensors"),
            ]
        )
        == 1
    )
    line = one_error_line(capsys)
    assert (
        f"timm {timm.__version__} could not load the export (TypeError: " in line
        and "not written" in line
    )
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# hf-hub:ORG/NAME through huggingface_hub, against a local stand-in for the Hub (the `hub` fixture)


def top_k(results: dict) -> list[tuple[str, float]]:
    return [
        (entry["class"], entry["probability"]) for entry in json.loads(results["out"])[0]["top_k"]
    ]


def test_predict_hf_hub_names_through_the_hub_then_offline(hub, tmp_path, randomise):
    from PIL import Image

    from vitlab.app.inference import preprocess
    from vitlab.data import read_image

    httpd, url = hub
    config = transformers.ViTConfig(
        hidden_size=192,
        num_hidden_layers=2,
        num_attention_heads=3,
        intermediate_size=768,
        image_size=32,
        patch_size=16,
        id2label={i: f"label {i}" for i in range(5)},
    )
    hf = randomise(transformers.ViTForImageClassification(config), seed=1).eval()
    hf.save_pretrained(tmp_path / "hf")
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(
        tmp_path / "hf"
    )
    tm = timm_model("vit_tiny_patch16_224", 32, randomise, seed=2, depth=1)
    timm.models.save_for_hf(
        tm,
        tmp_path / "timm",
        safe_serialization=False,
        model_config={"label_names": list("abcdefg")},
    )
    httpd.repos.update(
        {
            "acme/vit-hf": {
                p.name: p.read_bytes() for p in (tmp_path / "hf").iterdir()
            },  # config.json, model.safetensors, preprocessor
            "timm/vit-timm": {
                p.name: p.read_bytes() for p in (tmp_path / "timm").iterdir()
            },  # config.json, pytorch_model.bin only
            "acme/no-weights": {"config.json": (tmp_path / "hf" / "config.json").read_bytes()},
        }
    )
    image = tmp_path / "cat.png"
    Image.fromarray(
        torch.randint(
            0, 256, (40, 48, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8
        ).numpy()
    ).save(image)
    predict = ["predict", "--json", "--top_k", "3", "--device", "cpu", "--precision", "fp32"]
    env = {"HF_ENDPOINT": url, "HF_HOME": str(tmp_path / "hf_home")}
    online = vitlab_processes(
        [
            [*predict, "hf-hub:acme/vit-hf", str(image)],
            [*predict, f"hf-hub:timm/vit-timm@{httpd.commit}", str(image)],
            ["download", "hf-hub:acme/vit-hf"],
            [*predict, "hf-hub:acme/absent", str(image)],
            [*predict, "hf-hub:acme/no-weights", str(image)],
            [*predict, "hf-hub:acme/vit-hf@v9", str(image)],
        ],
        env,
    )
    assert [r["code"] for r in online] == [0, 0, 0, 1, 1, 1], online
    # Each fed as its files say (timm's pretrained_cfg: the shorter side to 35 px, bicubic, the
    # centre 32)
    image_array = read_image(str(image))
    x_hf, x_timm = (
        preprocess(image_array, load_model(tmp_path / f)[0].config)[None] for f in ("hf", "timm")
    )
    with torch.no_grad():
        for result, logits in ((online[0], hf(pixel_values=x_hf).logits), (online[1], tm(x_timm))):
            probabilities, index = logits.softmax(-1)[0].topk(3)
            names = hf.config.id2label if result is online[0] else dict(enumerate("abcdefg"))
            assert [n for n, _ in top_k(result)] == [names[i] for i in index.tolist()]
            torch.testing.assert_close(
                torch.tensor([p for _, p in top_k(result)]), probabilities, rtol=0, atol=1e-5
            )
    snapshot = tmp_path / "hf_home" / "hub" / "models--acme--vit-hf" / "snapshots" / httpd.commit
    assert online[2]["out"].strip() == str(snapshot)
    assert sorted(p.name for p in snapshot.iterdir()) == [
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
    ]
    errors = [r["err"].strip().splitlines() for r in online[3:]]
    assert all(len(e) == 1 for e in errors), errors
    assert "hf-hub:acme/absent: config.json:" in errors[0][0]
    assert "the repository has no model.safetensors or pytorch_model.bin" in errors[1][0]
    assert "hf-hub:acme/vit-hf@v9: config.json:" in errors[2][0]
    assert all(r.startswith(("HEAD /", "GET /")) for r in httpd.requests)  # every request came here

    httpd.requests.clear()
    offline = vitlab_processes(
        [
            [*predict, "hf-hub:acme/vit-hf", str(image)],
            [*predict, "hf-hub:acme/never-fetched", str(image)],
        ],
        {**env, "HF_HUB_OFFLINE": "1"},
    )
    assert offline[0]["code"] == 0 and top_k(offline[0]) == top_k(online[0])
    assert offline[1]["code"] == 1 and len(offline[1]["err"].strip().splitlines()) == 1
    assert "hf-hub:acme/never-fetched: config.json" in offline[1]["err"]
    assert httpd.requests == []  # the cache alone


def test_hf_hub_names_without_huggingface_hub_say_what_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # makes `import huggingface_hub` fail
    assert main(["predict", "hf-hub:google/vit-base-patch16-224", "x.png"]) == 1
    assert "pip install 'vitlab[hub]'" in one_error_line(capsys)
    assert main(["download", "--list"]) == 0
    listing = capsys.readouterr().out
    assert (
        "official checkpoints, from https://storage.googleapis.com/vit_models/" in listing
        and "augreg-B_16-224" in listing
    )
    assert (
        "hf-hub:ORG/NAME[@REVISION], from the Hugging Face Hub (needs huggingface_hub: pip install 'vitlab[hub]')"
        in listing
    )

"""transformers checkpoints, and what every library format shares: random models of transformers, saved as it saves
them, give its own logits in vitlab; vitlab -> hf -> vitlab is bit-exact in the weights; every export refuses what its
format cannot hold, writing nothing; hf-hub: names go through huggingface_hub. timm's own layout is tested in
test_timm_layout.py."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from vitlab.app.cli import main
from vitlab.errors import CheckpointError
from vitlab.formats.checkpoints import load_model, load_pretrained
from vitlab.formats.weights import save_safetensors
from vitlab.model import create_model

from conftest import vitlab_processes
from parity import (
    LOGITS,
    assert_parity,
    one_error_line,
    state_equal,
    timm_model,
    vitlab_source,
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
# transformers: save_pretrained folders (and their files)


def hf_config(**overrides):
    values = dict(
        hidden_size=192,
        num_hidden_layers=2,
        num_attention_heads=3,
        intermediate_size=768,
        image_size=32,
        patch_size=16,
        id2label={i: f"label {i}" for i in range(5)},
    )
    return transformers.ViTConfig(**{**values, **overrides})


def hf_model(randomise, cls=None, seed: int = 0, **overrides):
    cls = cls or transformers.ViTForImageClassification
    return randomise(cls(hf_config(**overrides)), seed=seed).eval()


HF_CASES = {
    "B/16-shaped, 2 layers": {
        "hidden_size": 768,
        "num_attention_heads": 12,
        "intermediate_size": 3072,
    },
    "Ti/16 (12 layers)": {"num_hidden_layers": 12},
    "tanh GELU, no qkv bias, eps 1e-6": {
        "hidden_act": "gelu_pytorch_tanh",
        "qkv_bias": False,
        "layer_norm_eps": 1e-6,
    },
}


@pytest.mark.parametrize("case", list(HF_CASES))
def test_transformers_folder_gives_transformers_logits(case, tmp_path, randomise):
    reference = hf_model(randomise, **HF_CASES[case])
    reference.save_pretrained(tmp_path / "folder")
    ours, names = load_model(tmp_path / "folder")
    assert names == [f"label {i}" for i in range(5)]
    assert ours.config.layer_norm_eps == reference.config.layer_norm_eps
    assert_parity(ours, reference, 32, f"transformers {case}", output=LOGITS)


def test_transformers_weights_file_and_pytorch_model_bin(tmp_path, randomise):
    reference = hf_model(randomise)
    reference.save_pretrained(tmp_path / "folder")
    # The file, its config.json beside it
    ours, _ = load_model(tmp_path / "folder" / "model.safetensors")
    assert_parity(ours, reference, 32, "transformers model.safetensors", output=LOGITS)
    # older Hub repositories hold pytorch_model.bin, the same keys pickled (transformers 4's safe_serialization=False)
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "config.json").write_text((tmp_path / "folder" / "config.json").read_text())
    torch.save(load_file(tmp_path / "folder" / "model.safetensors"), legacy / "pytorch_model.bin")
    ours, _ = load_model(legacy)
    assert_parity(ours, reference, 32, "transformers pytorch_model.bin", output=LOGITS)


def test_transformers_vitmodel_pooler_is_the_pre_logits_layer(tmp_path, randomise, capsys):
    reference = hf_model(randomise, transformers.ViTModel)
    reference.save_pretrained(tmp_path / "folder")
    assert main(["predict", str(tmp_path / "folder"), "x.png"]) == 1
    assert "holds no classification head" in one_error_line(capsys)
    model = create_model(
        "Ti/16",
        num_classes=4,
        img_size=32,
        depth=2,
        gelu="exact",
        layer_norm_eps=1e-12,
        representation_size=192,
    )
    load_pretrained(model, tmp_path / "folder", verbose=False).eval()
    model.head = nn.Identity()  # the model's output is then the pre-logits layer's
    assert_parity(
        model,
        reference,
        32,
        "transformers ViTModel pooler (pre-logits)",
        output=lambda out: out.pooler_output,
    )
    plain = create_model(
        "Ti/16", num_classes=4, img_size=32, depth=2, gelu="exact", layer_norm_eps=1e-12
    )
    load_pretrained(plain, tmp_path / "folder")
    assert "pre-logits layer dropped" in capsys.readouterr().out and not isinstance(
        plain.pre_logits, nn.Sequential
    )


# ---------------------------------------------------------------------------------------------
# Writing: vitlab -> timm -> vitlab, vitlab -> hf -> vitlab


@pytest.mark.parametrize("case", ["tanh, class token", "exact GELU, eps 1e-12"])
def test_vitlab_hf_vitlab_is_bit_exact(case, tmp_path, randomise, capsys):
    spec = (
        dict(name="Ti/16", img_size=32, depth=2)
        if case.startswith("tanh")
        else dict(name="B/16", img_size=32, depth=1, gelu="exact", layer_norm_eps=1e-12)
    )
    names = ["cat", "dög", "fish 🐟"]
    model, source = vitlab_source(tmp_path, randomise, spec, names)
    out = tmp_path / "hf"
    assert main(["export", str(source), "--format", "hf", "--out", str(out)]) == 0
    line = capsys.readouterr().out.splitlines()[0]
    assert line.startswith(
        f"transformers {transformers.__version__}: ViTForImageClassification.from_pretrained("
    )
    print(f"export hf {case}: {line.rsplit(': ', 1)[-1]}")
    # No temporary folder left
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "hf",
        "source.safetensors",
    ]
    back, back_names = load_model(out)
    assert back_names == names
    assert back.config.replace(name=model.config.name) == model.config
    state_equal(back, model)
    reference = transformers.ViTForImageClassification.from_pretrained(out).eval()
    assert reference.config.id2label == dict(enumerate(names))
    assert_parity(model, reference, 32, f"vitlab -> hf {case}", output=LOGITS)
    # again over the folder it wrote: refused unless told, then replaced whole
    assert main(["export", str(source), "--format", "hf", "--out", str(out)]) == 2
    assert "already exists; --overwrite replaces it" in capsys.readouterr().err
    assert main(["export", str(source), "--format", "hf", "--out", str(out), "--overwrite"]) == 0


def test_run_checkpoint_round_trips_through_both(tiny_run, tmp_path):
    model, names = load_model(tiny_run.checkpoint)
    for fmt, out in (("timm", tmp_path / "t.safetensors"), ("hf", tmp_path / "hf")):
        assert main(["export", str(tiny_run.checkpoint), "--format", fmt, "--out", str(out)]) == 0
        back, back_names = load_model(out)
        assert back_names == names
        state_equal(back, model)


# ---------------------------------------------------------------------------------------------
# Refusals: one line naming the field, and nothing written


HF_REFUSALS = {
    "DeiT": ({"model_type": "deit"}, "model_type 'deit'"),
    "ReLU": ({"hidden_act": "relu"}, "hidden_act 'relu'"),
    "rectangular image": ({"image_size": [32, 48]}, "image_size [32, 48]"),
    "grey images": ({"num_channels": 1}, "num_channels 1"),
    "odd head_dim": ({"head_dim": 32}, "head_dim 32"),
}


@pytest.mark.parametrize("case", list(HF_REFUSALS))
def test_transformers_config_refusals(case, tmp_path, randomise, capsys):
    hf_model(randomise, num_hidden_layers=1).save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    change, expected = HF_REFUSALS[case]
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, **change}))
    assert main(["eval", str(tmp_path / "hf")]) == 1
    line = one_error_line(capsys)
    assert "config.json" in line and expected in line, line


def test_transformers_file_refusals(tmp_path, randomise, capsys):
    hf_model(
        randomise, transformers.ViTModel, num_hidden_layers=1, pooler_act="relu"
    ).save_pretrained(tmp_path / "relu")
    with pytest.raises(CheckpointError, match="pooler_act 'relu'"):
        load_pretrained(
            create_model("Ti/16", img_size=32, depth=1, representation_size=192), tmp_path / "relu"
        )
    hf_model(randomise, num_hidden_layers=1).save_pretrained(tmp_path / "hf")
    transformers.ViTImageProcessor(
        image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]
    ).save_pretrained(tmp_path / "hf")
    with pytest.raises(CheckpointError, match="preprocessor_config.json image_mean and image_std"):
        load_model(tmp_path / "hf")
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "model.safetensors").write_bytes((tmp_path / "hf" / "model.safetensors").read_bytes())
    for path, expected in (
        (alone / "model.safetensors", "need the config.json"),
        (alone, "a folder without config.json"),
    ):
        assert main(["predict", str(path), "x.png"]) == 1
        assert expected in one_error_line(capsys)
    (alone / "config.json").write_text("{}")
    (alone / "model.safetensors").unlink()
    assert main(["predict", str(alone), "x.png"]) == 1
    assert "no model.safetensors or pytorch_model.bin" in one_error_line(capsys)
    # A JSON file is no checkpoint
    assert main(["predict", str(tmp_path / "relu" / "config.json"), "x.png"]) == 1
    assert "not a readable checkpoint" in one_error_line(capsys)


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
    ("hf", "average pooling"): (dict(classifier="gap"), "classifier gap"),
    ("hf", "pre-logits"): (
        dict(representation_size=24),
        "no pre-logits layer (representation_size)",
    ),
    ("hf", "hybrid"): (
        dict(name="R50+B/16", img_size=64, hidden_size=768, num_heads=12),
        "no ResNet stem",
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


def test_hf_export_will_not_replace_a_foreign_folder(tiny_run, tmp_path, capsys):
    (tmp_path / "mine.txt").write_text("keep")
    assert main(["export", str(tiny_run.checkpoint), "--format", "hf", "--out", str(tmp_path)]) == 2
    assert "already exists" in one_error_line(capsys)
    # Even so
    assert (
        main(
            [
                "export",
                str(tiny_run.checkpoint),
                "--format",
                "hf",
                "--out",
                str(tmp_path),
                "--overwrite",
            ]
        )
        == 1
    )
    assert "not a folder this export wrote" in one_error_line(capsys)
    assert [p.name for p in tmp_path.iterdir()] == ["mine.txt"]


def test_hf_export_that_differs_is_refused(tiny_run, tmp_path, capsys, monkeypatch):
    original = transformers.ViTForImageClassification.forward

    def off(self, *args, **kwargs):  # a library whose logits are 1e-3 off
        out = original(self, *args, **kwargs)
        out.logits = out.logits + 1e-3
        return out

    monkeypatch.setattr(transformers.ViTForImageClassification, "forward", off)
    assert (
        main(["export", str(tiny_run.checkpoint), "--format", "hf", "--out", str(tmp_path / "hf")])
        == 1
    )
    line = one_error_line(capsys)
    assert "1.00e-03" in line and "not written" in line
    assert list(tmp_path.iterdir()) == []


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
    hf = hf_model(randomise, seed=1)
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

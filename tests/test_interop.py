"""timm and transformers checkpoints: random models of each library, saved as that library saves them, give the
library's own logits in vitlab; vitlab -> timm -> vitlab and vitlab -> hf -> vitlab are bit-exact in the weights;
everything vitlab cannot compute exactly is refused in one line naming the field."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from vitlab.app.cli import main
from vitlab.errors import CheckpointError
from vitlab.formats import timm_layout
from vitlab.formats.checkpoints import load_model, load_pretrained
from vitlab.formats.weights import save_safetensors
from vitlab.model import create_model

from rounding import assert_same_function

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module", autouse=True)
def no_progress_bars():
    """save_pretrained's progress bar on stderr would hide the one-line errors these tests look for."""
    transformers.utils.logging.disable_progress_bar()
    yield
    transformers.utils.logging.enable_progress_bar()


REPO = Path(__file__).resolve().parents[1]
PARITY_ATOL = 1e-5  # float32 logits: the target the formats table states, above these models' rounding (printed by -s)


def images(size: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def LOGITS(out):  # noqa: N802  the logits of transformers' output object
    return out.logits


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def assert_parity(ours: nn.Module, reference: nn.Module, size: int, case: str, output=None) -> None:
    """The same function to float64's rounding, and float32 logits within PARITY_ATOL (tests/rounding.py)."""
    x = images(size)
    with torch.no_grad():
        expected = (output or (lambda out: out))(reference(x))
    assert expected.abs().max() > 0.1  # the logits are not trivially zero
    difference = assert_same_function(ours, reference, x, output=output, msg=f"parity {case}")
    assert difference <= PARITY_ATOL, case


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def state_equal(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


# ---------------------------------------------------------------------------------------------
# timm: a state dict as timm's users save it (safetensors save_file, torch.save), or a save_for_hf folder

TIMM_CASES = {
    "B/16-shaped, 2 layers": ("vit_base_patch16_224", 64, {"depth": 2}),
    "Ti/16": ("vit_tiny_patch16_224", 64, {}),
    "gap with fc_norm": (
        "vit_tiny_patch16_224",
        64,
        {"depth": 2, "class_token": False, "global_pool": "avg"},
    ),
    "gap, norm before pooling": (
        "vit_tiny_patch16_224",
        64,
        {"depth": 2, "class_token": False, "global_pool": "avg", "fc_norm": False},
    ),
    "hybrid R50+B/16, 1 layer": ("vit_base_r50_s16_224", 64, {"depth": 1}),
    "tanh GELU, no qkv bias": (
        "vit_small_patch16_224",
        32,
        {"depth": 2, "act_layer": "gelu_tanh", "qkv_bias": False},
    ),
}


def timm_model(arch: str, size: int, randomise, seed: int = 0, **kwargs) -> nn.Module:
    return randomise(
        timm.create_model(arch, pretrained=False, num_classes=7, img_size=size, **kwargs), seed=seed
    ).eval()


@pytest.mark.parametrize("case", list(TIMM_CASES))
def test_timm_state_dict_gives_timms_logits(case, tmp_path, randomise):
    arch, size, kwargs = TIMM_CASES[case]
    reference = timm_model(arch, size, randomise, **kwargs)
    # The weights do not say the GELU form: a save_for_hf folder's config.json does
    if "act_layer" in kwargs:
        timm.models.save_for_hf(
            reference,
            tmp_path / "folder",
            safe_serialization=True,
            model_config={"label_names": list("abcdefg")},
        )
        ours, names = load_model(tmp_path / "folder")
        assert names == list("abcdefg") and ours.config.gelu == "tanh"
    else:
        save_file(reference.state_dict(), tmp_path / "model.safetensors")
        ours, names = load_model(tmp_path / "model.safetensors")
        assert names == [f"class {i}" for i in range(7)]
    assert_parity(ours, reference, size, f"timm {case}")


def test_timm_torch_file_and_model_type(tmp_path, randomise):
    reference = timm_model("vit_small_patch16_224", 32, randomise, depth=2)
    torch.save(reference.state_dict(), tmp_path / "pytorch_model.bin")
    torch.save(
        {"state_dict": {"module." + k: v for k, v in reference.state_dict().items()}, "epoch": 3},
        tmp_path / "train.pth.tar",
    )
    for path in (tmp_path / "pytorch_model.bin", tmp_path / "train.pth.tar"):
        ours, _ = load_model(path, model_type="S/16")
        assert ours.config.num_heads == 6 and ours.config.depth == 2 and ours.config.img_size == 32
        assert_parity(ours, reference, 32, f"timm torch.save {path.name}")
    with pytest.raises(CheckpointError, match="hidden_size 384, and --model_type B/16 has 768"):
        load_model(tmp_path / "pytorch_model.bin", model_type="B/16")


def test_timm_width_of_no_variant_needs_its_heads(tmp_path, randomise):
    reference = timm_model(
        "vit_tiny_patch16_224", 32, randomise, depth=1, embed_dim=96, num_heads=4
    )
    save_file(reference.state_dict(), tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="width of 96 is no vitlab variant's.*--model_type"):
        load_model(tmp_path / "model.safetensors")
    # fine-tuning takes the heads from the model it loads into
    model = load_pretrained(
        create_model(
            "Ti/16",
            num_classes=7,
            img_size=32,
            depth=1,
            hidden_size=96,
            num_heads=4,
            mlp_dim=384,
            gelu="exact",
            dropout_rate=0.0,
        ),
        tmp_path / "model.safetensors",
        verbose=False,
    )
    assert_parity(model.eval(), reference, 32, "timm width 96, heads from the model")


def test_timm_file_fine_tunes_with_a_new_head(tmp_path, randomise, capsys):
    reference = timm_model("vit_tiny_patch16_224", 32, randomise, depth=1)
    save_file(reference.state_dict(), tmp_path / "model.safetensors")
    # timm computes the exact GELU; vitlab's default is tanh
    with pytest.raises(CheckpointError, match="trained with --gelu exact"):
        load_pretrained(
            create_model("Ti/16", num_classes=3, img_size=32, depth=1),
            tmp_path / "model.safetensors",
        )
    model = load_pretrained(
        create_model("Ti/16", num_classes=3, img_size=32, depth=1, gelu="exact"),
        tmp_path / "model.safetensors",
    )
    assert "head replaced by a zero-initialised head of 3 classes" in capsys.readouterr().out
    assert model.head.weight.abs().sum() == 0
    torch.testing.assert_close(
        model.blocks[0].attn.qkv.weight, reference.blocks[0].attn.qkv.weight, rtol=0, atol=0
    )


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

ROUND_TRIP_MODELS = {
    "tanh, class token": dict(name="Ti/16", img_size=32, depth=2),
    "exact GELU, gap after pooling, eps 1e-12": dict(
        name="S/16",
        img_size=32,
        depth=1,
        classifier="gap",
        final_norm="after_pool",
        gelu="exact",
        layer_norm_eps=1e-12,
    ),
    "gap before pooling, patch 8, width 96": dict(
        name="Ti/16",
        img_size=32,
        depth=1,
        patch_size=8,
        hidden_size=96,
        num_heads=4,
        mlp_dim=200,
        classifier="gap",
    ),
    "hybrid, timm's stem": dict(name="R50+B/16", img_size=64, depth=1, stem_norm="timm"),
}


def vitlab_source(tmp_path, randomise, spec: dict, names: list[str]):
    spec = dict(spec)
    model = randomise(
        create_model(spec.pop("name"), num_classes=len(names), dropout_rate=0.0, **spec),
        seed=5,
        std=0.05,
    ).eval()
    path = tmp_path / "source.safetensors"
    save_safetensors(model, path, names)
    return model, path


@pytest.mark.parametrize("case", list(ROUND_TRIP_MODELS))
def test_vitlab_timm_vitlab_is_bit_exact(case, tmp_path, randomise, capsys):
    names = ["cat", "dög", "fish 🐟"]
    model, source = vitlab_source(tmp_path, randomise, ROUND_TRIP_MODELS[case], names)
    out = tmp_path / "timm.safetensors"
    assert main(["export", str(source), "--format", "timm", "--out", str(out)]) == 0
    line = capsys.readouterr().out.splitlines()[0]
    assert (
        line.startswith(f"timm {timm.__version__}: timm.create_model(")
        and "max |difference|" in line
    )
    print(f"export timm {case}: {line.rsplit(': ', 1)[-1]}")
    back, back_names = load_model(out)
    assert back_names == names and back.config == model.config
    state_equal(back, model)
    # the file is timm's own layout: the keys of timm's model, whose loader (the call printed) gives the same logits
    name, kwargs = timm_layout.timm_args(model.config)
    assert (
        f"timm.create_model({name!r}, pretrained=True, " in line
        and timm_layout.format_args(kwargs) in line
    )
    reference = timm.create_model(
        name,
        pretrained=True,
        pretrained_cfg_overlay={"file": str(out), "num_classes": len(names)},
        **kwargs,
    )
    assert set(load_file(out)) == set(reference.state_dict())
    assert_parity(model, reference.eval(), model.config.img_size, f"vitlab -> timm {case}")


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


def timm_file(tmp_path, randomise, arch="vit_tiny_patch16_224", size=32, config=None, **kwargs):
    model = timm_model(arch, size, randomise, **{"depth": 1, **kwargs})
    if config is not None:
        timm.models.save_for_hf(model, tmp_path / "timm", safe_serialization=True)
        values = json.loads((tmp_path / "timm" / "config.json").read_text())
        (tmp_path / "timm" / "config.json").write_text(json.dumps(config(values)))
        return tmp_path / "timm"
    save_file(model.state_dict(), tmp_path / "timm.safetensors")
    return tmp_path / "timm.safetensors"


def _with(section: str, **values):
    def change(config):
        config.setdefault(section, {}).update(values)
        return config

    return change


TIMM_REFUSALS = {
    "register tokens": ({"reg_tokens": 4}, "reg_token is register tokens"),
    "no_embed_class": ({"no_embed_class": True}, "no_embed_class"),
    "layer scale": ({"init_values": 1e-5}, "layer scale (init_values)"),
    "qk_norm": ({"qk_norm": True}, "qk_norm"),
    "pre_norm": ({"pre_norm": True}, "pre_norm"),
    "RMSNorm": ({"norm_layer": "rmsnorm"}, "norm other than LayerNorm"),
    "map pooling": ({"global_pool": "map"}, "global_pool 'map'"),
    "average pooling beside a class token": (
        {"global_pool": "avg"},
        "fc_norm beside a class token",
    ),
    "rectangular grid": ({"size": (32, 48)}, "not a square grid"),
    "ImageNet mean and std": (
        {"config": _with("pretrained_cfg", mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])},
        "mean and std",
    ),
    "another activation": ({"config": _with("model_args", act_layer="silu")}, "act_layer 'silu'"),
    "avg pooling in config with class token": (
        {"config": lambda c: {**c, "global_pool": "avg"}},
        "global_pool 'avg'",
    ),
}


@pytest.mark.parametrize("case", list(TIMM_REFUSALS))
def test_timm_refusals(case, tmp_path, randomise, capsys):
    kwargs, expected = TIMM_REFUSALS[case]
    path = timm_file(tmp_path, randomise, **kwargs)
    assert main(["predict", str(path), "x.png"]) == 1
    line = one_error_line(capsys)
    assert str(path) in line and expected in line, line


def test_timm_head_of_another_shape_is_refused(tmp_path, randomise, capsys):
    path = timm_file(tmp_path, randomise)
    state = load_file(path)
    # An MLP head's names
    state.update({"head.fc." + k[5:]: state.pop(k) for k in ("head.weight", "head.bias")})
    save_file(state, path)
    assert main(["predict", str(path), "x.png"]) == 1
    line = one_error_line(capsys)
    assert (
        str(path) in line
        and "unexpected keys head.fc.bias, head.fc.weight: vitlab's ViT has no such parameters"
        in line
    )


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


def vitlab_processes(commands: list[list[str]], env: dict[str, str]) -> list[dict]:
    """Each command run by vitlab.app.cli.main in one fresh Python process, since huggingface_hub reads HF_ENDPOINT, HF_HOME and
    HF_HUB_OFFLINE when it is imported: its exit code, stdout and stderr."""
    script = (
        "import contextlib, io, json, sys\nfrom vitlab.app.cli import main\nresults = []\n"
        "for argv in json.loads(sys.argv[1]):\n    out, err = io.StringIO(), io.StringIO()\n"
        "    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):\n        code = main(argv)\n"
        "    results.append({'code': code, 'out': out.getvalue(), 'err': err.getvalue()})\nprint(json.dumps(results))\n"
    )
    hub_env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    hub_env.update(
        PYTHONPATH=str(REPO / "src"),
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        **env,
    )
    run = subprocess.run(
        [sys.executable, "-c", script, json.dumps(commands)],
        env=hub_env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.strip().splitlines()[-1])


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
    x = preprocess(read_image(str(image)), 32)[None]
    with torch.no_grad():
        for result, logits in ((online[0], hf(pixel_values=x).logits), (online[1], tm(x))):
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

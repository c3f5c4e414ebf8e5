"""Each family end to end: `vitlab train --model_type <variant> --pretrained_dir <timm folder>` from
a tiny random timm model of the family, at another resolution than the file's, keeps the file's
preprocessing in its checkpoints and resumes bit-exactly after a SIGTERM; predict, attention and the
demo's explain work on its best.pt. Then the family variants' names: `vitlab models`, `download
--list`, `download NAME` and `--pretrained_dir auto` against a local stand-in for the Hub, and the
recipes."""

from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest
import torch
from PIL import Image

from vitlab import train as train_module
from vitlab.app.cli import main, train_config_from_args
from vitlab.app.demo import Demo
from vitlab.app.inference import preprocess
from vitlab.data import read_image
from vitlab.formats.checkpoints import load_model, read_checkpoint
from vitlab.formats.sources import SOURCES
from vitlab.recipes import RECIPES

from conftest import vitlab_processes
from parity import timm_model

timm = pytest.importorskip("timm")

CLASSES = ("cat", "dog", "fish")
# variant: (timm architecture, timm's extra arguments). Every file is 1 block of width 32, 2 heads,
# MLP 64, a 4 x 4 grid; the runs train at 3 x 3.
FAMILIES = {
    "dinov2-S/14": ("vit_small_patch14_dinov2", {}),
    "dinov2-reg-S/14": ("vit_small_patch14_reg4_dinov2", {}),
    "clip-B/16": ("vit_base_patch16_clip_quickgelu_224", {}),
    "siglip-B/16": ("vit_base_patch16_siglip_224", {}),
    "deit-distilled-Ti/16": ("deit_tiny_distilled_patch16_224", {}),
    "deit3-S/16": ("deit3_small_patch16_224", {}),
    "mae-B/16": ("vit_base_patch16_224", {"global_pool": "avg"}),  # MAE's fine-tuned layout
}
SHAPE = dict(depth=1, embed_dim=32, num_heads=2, mlp_ratio=2.0)
CPU = ("--device", "cpu", "--precision", "fp32")


def patch_of(variant: str) -> int:
    return int(variant.rsplit("/", 1)[1])


def image_folder(root, size=(30, 41)) -> None:
    """3 classes of 4 images, not square (the families crop their centre)."""
    rng = np.random.default_rng(0)
    for label, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(4):
            image = rng.integers(0, 160, (*size, 3)) + np.eye(3, dtype=np.int64)[label] * 90
            Image.fromarray(image.astype(np.uint8)).save(root / name / f"{i}.png")


def train_argv(variant: str, source, work, name: str) -> list[str]:
    flags = dict(
        name=name,
        model_type=variant,
        pretrained_dir=source,
        dataset="imagefolder",
        data_dir=work / "data",
        img_size=3 * patch_of(variant),
        depth=1,
        hidden_size=32,
        num_heads=2,
        mlp_dim=64,
        num_steps=4,
        eval_every=2,
        train_batch_size=4,
        eval_batch_size=8,
        optimizer="adamw",
        learning_rate=1e-3,
        warmup_steps=1,
        val_split=0.25,
        device="cpu",
        num_workers=0,
        output_dir=work / "output",
        log_dir=work / "logs",
    )
    return ["train", *(f"--{k}={v}" for k, v in flags.items())]


def sigterm_during_step(monkeypatch, step: int) -> None:
    """SIGTERM to this process as step `step` (0-based) begins: the run stops at its end."""
    real = train_module.set_learning_rate

    def set_learning_rate(optimizer, config, at):
        if at == step:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(optimizer, config, at)

    monkeypatch.setattr(train_module, "set_learning_rate", set_learning_rate)


@pytest.mark.parametrize("variant", list(FAMILIES))
def test_each_family_fine_tunes_resumes_and_explains(
    variant, tmp_path, randomise, monkeypatch, capsys
):
    arch, extra = FAMILIES[variant]
    reference = timm_model(arch, 4 * patch_of(variant), randomise, **SHAPE, **extra)
    timm.models.save_for_hf(reference, tmp_path / "timm", safe_serialization=True)
    fed = json.loads((tmp_path / "timm" / "config.json").read_text())["pretrained_cfg"]
    image_folder(tmp_path / "data")

    assert main(train_argv(variant, tmp_path / "timm", tmp_path, "ref")) == 0
    with monkeypatch.context() as patch:
        sigterm_during_step(patch, 1)
        assert main(train_argv(variant, tmp_path / "timm", tmp_path, "run")) == 143
    assert read_checkpoint(tmp_path / "output" / "run" / "last.pt")["step"] == 2
    assert main([*train_argv(variant, tmp_path / "timm", tmp_path, "run"), "--resume"]) == 0
    ref, run = (read_checkpoint(tmp_path / "output" / n / "last.pt") for n in ("ref", "run"))
    assert run["step"] == ref["step"] == 4 and ref["model"].keys() == run["model"].keys()
    for key in ref["model"]:
        assert torch.equal(run["model"][key], ref["model"][key]), key

    # The checkpoint feeds images as the file said, at the run's size
    best = tmp_path / "output" / "ref" / "best.pt"
    model, names = load_model(best)
    config = model.config
    assert config.img_size == 3 * patch_of(variant) and names == list(CLASSES)
    assert (list(config.image_mean), list(config.image_std)) == (fed["mean"], fed["std"])
    assert (config.crop_pct, config.interpolation) == (fed["crop_pct"], fed["interpolation"])

    image = tmp_path / "data" / "dog" / "0.png"
    capsys.readouterr()
    assert main(["predict", str(best), str(image), "--json", *CPU]) == 0
    predicted = json.loads(capsys.readouterr().out)[0]["top_k"][0]
    with torch.no_grad():
        expected = model(preprocess(read_image(str(image)), config)[None]).softmax(-1)[0]
    assert predicted["index"] == int(expected.argmax())
    assert predicted["probability"] == pytest.approx(float(expected.max()), abs=1e-5)
    out = tmp_path / "map.png"
    argv = ["attention", str(best), str(image), "--out", str(out), *CPU]
    assert main(argv) == 0 and out.stat().st_size > 0
    explained = Demo(model, names, torch.device("cpu"), precision="fp32", top_k=3).explain(
        read_image(str(image))
    )
    assert explained.maps["rollout"].shape == (3, 3)
    top = {name: p for name, _, p in explained.top}
    assert top[names[int(expected.argmax())]] == pytest.approx(float(expected.max()), abs=1e-5)


def test_models_lists_every_family_grouped(capsys):
    assert main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:2] == ["family", "name"]
    rows = [line.split() for line in lines[1:] if line]
    assert ["dinov2", "dinov2-S/14"] == rows[[r[1] for r in rows].index("dinov2-S/14")][:2]
    families = [r[0] for r in rows]
    # Grouped: each family's rows together, a blank line between families
    assert (
        len(set(families))
        == sum(a != b for a, b in zip(families[:-1], families[1:], strict=True)) + 1
    )
    assert lines.count("") == len(set(families)) - 1


def test_sources_are_timms_and_name_every_family_variant():
    from timm.models import get_pretrained_cfg

    from vitlab.config import VARIANTS, family

    assert {n for n in VARIANTS if family(n) != "vit"} == set(SOURCES)
    for variant, source in SOURCES.items():
        assert get_pretrained_cfg(source.timm).hf_hub_id == f"timm/{source.timm}", variant


def test_download_and_pretrained_dir_auto_fetch_a_family_variant_from_the_hub(
    hub, tmp_path, randomise
):
    # timm's repository of OpenAI's CLIP names the exact-GELU architecture; the clip-* variant reads
    # it with the QuickGELU its weights were trained with.
    httpd, url = hub
    reference = timm_model("vit_base_patch16_clip_224", 64, randomise, **SHAPE)
    timm.models.save_for_hf(reference, tmp_path / "timm", safe_serialization=True)
    repo = "timm/vit_base_patch16_clip_224.openai"
    assert SOURCES["clip-B/16"].hub == f"hf-hub:{repo}"
    httpd.repos[repo] = {p.name: p.read_bytes() for p in (tmp_path / "timm").iterdir()}
    image_folder(tmp_path / "data")
    argv = train_argv("clip-B/16", "auto", tmp_path, "auto")
    env = {"HF_ENDPOINT": url, "HF_HOME": str(tmp_path / "hf_home")}
    results = vitlab_processes([["download", "clip-B/16"], ["download", "--list"], argv], env)
    assert [r["code"] for r in results] == [0, 0, 0], results
    snapshot = tmp_path / "hf_home" / "hub" / "models--timm--vit_base_patch16_clip_224.openai"
    assert results[0]["out"].strip() == str(snapshot / "snapshots" / httpd.commit)
    listed = [line.split() for line in results[1]["out"].splitlines()]
    assert ["clip-B/16", f"hf-hub:{repo}", "hf-hub:openai/clip-vit-base-patch16"] in listed
    assert f"initialised from hf-hub:{repo}" in results[2]["out"]
    config = read_checkpoint(tmp_path / "output" / "auto" / "last.pt")["model_config"]
    assert config["gelu"] == "quick" and config["layer_norm_eps"] == 1e-5


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_recipe_is_a_valid_run_of_its_family(name):
    import argparse

    from vitlab.config import canonical_name, family

    config = train_config_from_args(argparse.Namespace(command="train", recipe=name, config=None))
    config.name = "x"
    config.validate()
    if name.removeprefix("finetune-") in ("mae", "deit", "deit3", "dinov2", "clip", "siglip"):
        assert family(canonical_name(config.model_type)) == name.removeprefix("finetune-")


def test_openais_clip_in_timms_repository_computes_as_trained(tmp_path, randomise):
    # The repository's config.json names vit_base_patch16_clip_224 (the exact GELU); the weights are
    # OpenAI's, trained with QuickGELU: read as clip-B/16 they give timm's QuickGELU model's logits.
    from parity import assert_parity

    quick = timm_model("vit_base_patch16_clip_quickgelu_224", 32, randomise, depth=1)
    exact = timm_model("vit_base_patch16_clip_224", 32, randomise, depth=1)
    exact.load_state_dict(quick.state_dict())
    timm.models.save_for_hf(exact, tmp_path / "timm", safe_serialization=True)
    as_named, _ = load_model(tmp_path / "timm", model_type="clip-B/16")
    assert as_named.config.gelu == "quick"
    assert_parity(as_named, quick, 32, "OpenAI's CLIP from timm's exact-GELU repository")
    assert load_model(tmp_path / "timm")[0].config.gelu == "exact"  # timm's own reading of it

"""Frozen features: the pooled tokens (DINOv2's linear-evaluation input), `vitlab embed` in chunks that an
interruption keeps and --resume continues, DINO's k-NN against this test's own implementation of its formula, the
linear probe against scikit-learn's logistic regression, and a probe's model file giving the features times its head
through every command."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from vitlab import features as frozen
from vitlab.app import frozen as commands
from vitlab.app.cli import main
from vitlab.app.inference import preprocess
from vitlab.data import read_image
from vitlab.errors import ConfigError
from vitlab.formats.checkpoints import load_model
from vitlab.formats.features import read_features
from vitlab.formats.weights import save_safetensors
from vitlab.model import create_model

from conftest import randomise_parameters
from parity import one_error_line
from rounding import sum_bound


def tiny_backbone(tmp_path, randomise, **changes):
    model = randomise(
        create_model(
            "Ti/16",
            patch_size=4,
            img_size=16,
            depth=3,
            hidden_size=24,
            num_heads=2,
            mlp_dim=48,
            num_classes=4,
            dropout_rate=0.0,
            **changes,
        ),
        std=0.3,
    ).eval()
    path = tmp_path / "backbone.safetensors"
    save_safetensors(model, path, list("abcd"))
    return model, path


def image_folder(root, per_class=6, classes=("cat", "dog", "fish"), seed=0):
    rng = np.random.default_rng(seed)
    for split, n in (("train", per_class), ("test", per_class // 2)):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                image = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
                Image.fromarray(image).save(root / split / c / f"{i}.png")
    return root


# ---------------------------------------------------------------------------------------------
# The features: DINOv2's linear-evaluation input


def test_the_last_blocks_tokens_are_dinov2s_linear_input(tmp_path, randomise):
    model, _ = tiny_backbone(tmp_path, randomise)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with (
        torch.no_grad()
    ):  # embedding's kernels (inference), so that both compute alike, bit for bit
        blocks = model.forward_intermediates(x, layers=2, norm=True)
    # DINOv2's create_linear_input(use_n_blocks=2, use_avgpool=True), written out
    expected = torch.cat([blocks[0][:, 0], blocks[1][:, 0], blocks[1][:, 1:].mean(dim=1)], dim=-1)
    both = frozen.feature_model(model, frozen.feature_config(model.config, "both", 2))
    assert torch.equal(frozen.embed(both, x, "fp32"), expected)
    means = frozen.feature_model(model, frozen.feature_config(model.config, "mean", 2))
    expected = torch.cat([b[:, 1:].mean(dim=1) for b in blocks], dim=-1)
    assert torch.equal(frozen.embed(means, x, "fp32"), expected)
    # one block of class tokens: the model's own pre-logits vector
    cls = frozen.feature_model(model, frozen.feature_config(model.config, "cls", 1))
    with torch.no_grad():
        assert torch.equal(frozen.embed(cls, x, "fp32"), model.forward_features(x)[:, 0])


def test_features_need_what_they_pool(tmp_path, randomise):
    model, _ = tiny_backbone(tmp_path, randomise, classifier="gap")
    with pytest.raises(ConfigError, match="no class token; use --tokens mean"):
        frozen.feature_config(model.config, "cls", 1)
    with pytest.raises(ConfigError, match="--blocks 4: the model has 3 blocks"):
        frozen.feature_config(model.config, "mean", 4)


# ---------------------------------------------------------------------------------------------
# vitlab embed


def test_embed_writes_features_and_an_interrupted_run_resumes(
    tmp_path, randomise, monkeypatch, capsys
):
    model, source = tiny_backbone(tmp_path, randomise)
    data = image_folder(tmp_path / "images")
    whole, parts = tmp_path / "whole.safetensors", tmp_path / "parts.safetensors"
    flags = ["--precision", "fp32", "--chunk", "5", "--num_workers", "0", "--tokens", "both"]
    assert main(["embed", str(source), str(data), "--out", str(whole), *flags]) == 0
    features = read_features(whole)
    assert features.features.shape == (18, 48) and features.class_names == ["cat", "dog", "fish"]
    assert features.names[0].endswith("train/cat/0.png") and features.labels.tolist()[:7] == [
        0
    ] * 6 + [1]
    # interrupted during the third chunk: two parts kept, nothing else written
    calls = []
    original = commands._embed

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(commands, "_embed", interrupted)
    assert main(["embed", str(source), str(data), "--out", str(parts), *flags]) == 130
    assert "--resume continues" in capsys.readouterr().err
    kept = sorted(p.name for p in (tmp_path / "parts.safetensors.parts").iterdir())
    assert kept == ["manifest.json", "part-00000.safetensors", "part-00001.safetensors"]
    assert not parts.exists()
    # without --resume: refused; another pooling: refused; --resume: the rest, the same features as one run
    assert main(["embed", str(source), str(data), "--out", str(parts), *flags]) == 2
    assert "--resume continues it" in one_error_line(capsys)
    other = [*flags[:-2], "--tokens", "cls", "--resume"]
    assert main(["embed", str(source), str(data), "--out", str(parts), *other]) == 2
    assert "belongs to another embed" in one_error_line(capsys)
    monkeypatch.setattr(commands, "_embed", original)
    assert main(["embed", str(source), str(data), "--out", str(parts), *flags, "--resume"]) == 0
    assert not (tmp_path / "parts.safetensors.parts").exists()
    assert load_file(parts).keys() == load_file(whole).keys()
    for key, value in load_file(whole).items():
        assert torch.equal(load_file(parts)[key], value), key
    # an existing file is kept unless told
    capsys.readouterr()
    assert main(["embed", str(source), str(data), "--out", str(whole), *flags]) == 2
    assert "already exists" in one_error_line(capsys)


# ---------------------------------------------------------------------------------------------
# k-NN


def dino_knn(train_f, train_y, test_f, test_y, k, temperature, num_classes):
    """DINO's eval_knn.py formula, one test image at a time: top-1 and top-5 accuracy."""
    train_f = train_f.double() / train_f.double().norm(dim=1, keepdim=True)
    top1 = top5 = 0
    for feature, label in zip(test_f.double(), test_y, strict=True):
        similarity = train_f @ (feature / feature.norm())
        distances, indices = similarity.topk(k)
        scores = torch.zeros(num_classes, dtype=torch.float64)
        for d, i in zip(distances, indices, strict=True):
            scores[train_y[i]] += math.exp(d / temperature)
        ranked = scores.argsort(descending=True)
        top1 += int(ranked[0] == label)
        top5 += int(label in ranked[: min(5, k)])
    return top1 / len(test_y), top5 / len(test_y)


def test_knn_is_dinos_formula_on_random_features(tmp_path):
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(7, 16, generator=g)
    train_y, test_y = (
        torch.randint(0, 7, (300,), generator=g),
        torch.randint(0, 7, (50,), generator=g),
    )
    train_f = centres[train_y] + 1.5 * torch.randn(300, 16, generator=g)
    test_f = centres[test_y] + 1.5 * torch.randn(50, 16, generator=g)
    got = frozen.knn_accuracy((train_f, train_y), (test_f, test_y), num_classes=7, ks=(1, 10, 20))
    for k in (1, 10, 20):
        assert got[k] == pytest.approx(dino_knn(train_f, train_y, test_f, test_y, k, 0.07, 7)), k


# ---------------------------------------------------------------------------------------------
# On real images: a CIFAR-10 subset


@pytest.fixture(scope="module")
def cifar_features(shared_dir, tmp_path_factory):
    """Features (class token beside the patches' mean) of 3,000 training and 1,000 test images of ../shared's CIFAR-10
    by a small random ViT, embedded by `vitlab embed`."""
    root = tmp_path_factory.mktemp("cifar")
    source = shared_dir / "data" / "cifar10-train"
    for c in sorted(p.name for p in source.iterdir()):
        files = sorted((source / c).iterdir())
        for split, chosen in (("train", files[:300]), ("test", files[300:400])):
            (root / "data" / split / c).mkdir(parents=True)
            for f in chosen:
                (root / "data" / split / c / f.name).symlink_to(f)
    model = create_model(
        "Ti/16", patch_size=4, img_size=32, depth=2, hidden_size=96, num_heads=3, mlp_dim=192
    )
    randomise_parameters(model, seed=0, std=0.05)  # a random backbone, the same every run
    save_safetensors(model, root / "backbone.safetensors")
    files = {}
    for split in ("train", "test"):
        files[split] = root / f"{split}.safetensors"
        argv = ["embed", str(root / "backbone.safetensors"), str(root / "data"), "--split", split]
        argv += [
            "--out",
            str(files[split]),
            "--tokens",
            "both",
            "--precision",
            "fp32",
            "--num_workers",
            "0",
        ]
        assert main(argv) == 0
    return root, files


def test_knn_on_real_features_is_dinos_formula(cifar_features, capsys):
    root, files = cifar_features
    capsys.readouterr()
    assert main(["knn", str(files["train"]), str(files["test"]), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    train, test = read_features(files["train"]), read_features(files["test"])
    for k in (10, 20, 100, 200):
        expected = dino_knn(train.features, train.labels, test.features, test.labels, k, 0.07, 10)
        assert (got[str(k)]["top1"], got[str(k)]["top5"]) == pytest.approx(expected), k
    # the same straight from the checkpoint and the folder
    argv = [
        "knn",
        str(root / "backbone.safetensors"),
        str(root / "data"),
        "--json",
        "--tokens",
        "both",
    ]
    assert main([*argv, "--precision", "fp32", "--num_workers", "0"]) == 0
    assert json.loads(capsys.readouterr().out) == got


def test_probe_is_as_accurate_as_logistic_regression(cifar_features, capsys):
    sklearn = pytest.importorskip("sklearn.linear_model")
    root, files = cifar_features
    train, test = read_features(files["train"]), read_features(files["test"])

    def scikit_learn(strength: float) -> float:
        reference = sklearn.LogisticRegression(C=1 / strength, max_iter=5000)
        reference.fit(train.features.numpy(), train.labels.numpy())
        return (reference.predict(test.features.numpy()) == test.labels.numpy()).mean()

    # scikit-learn's default (C = 1); then the sweep, against scikit-learn at the strength it chose
    for strengths in ("1", None):
        out = root / f"probe-{strengths}.safetensors"
        argv = ["probe", str(files["train"]), str(files["test"]), "--out", str(out), "--json"]
        assert main(argv + (["--strengths", strengths] if strengths else [])) == 0
        report = json.loads(capsys.readouterr().out)
        expected = scikit_learn(report["strength"])
        with capsys.disabled():
            print(
                f"probe {report['test_accuracy']:.4f} (L2 strength {report['strength']:g}), "
                f"scikit-learn {expected:.4f}"
            )
        assert abs(report["test_accuracy"] - expected) <= 0.005


def test_a_probe_is_an_ordinary_model_for_every_command(cifar_features, capsys):
    onnx = pytest.importorskip("onnxruntime")
    root, files = cifar_features
    out = root / "probe.safetensors"
    assert main(["probe", str(files["train"]), str(files["test"]), "--out", str(out)]) == 0
    test = read_features(files["test"])
    model, names = load_model(out)
    assert names == test.class_names and model.config.classifier == "token_gap"
    logits = test.features @ model.head.weight.T + model.head.bias  # the features times the head
    # `eval` on the test folder: its accuracy is the features' times the head
    capsys.readouterr()
    argv = [
        "eval",
        str(out),
        "--dataset",
        "imagefolder",
        "--data_dir",
        str(root / "data"),
        "--out",
        str(root / "eval"),
    ]
    assert main([*argv, "--precision", "fp32", "--num_workers", "0"]) == 0
    report = json.loads((root / "eval" / "probe_imagefolder_eval.json").read_text())
    assert report["accuracy"] == pytest.approx(
        (logits.argmax(1) == test.labels).float().mean().item()
    )
    # `predict` of the first images of each class, and the ONNX export, agree with them
    first = [i for i in range(len(test.names)) if i % 50 == 0]
    capsys.readouterr()
    assert (
        main(
            ["predict", str(out), *[test.names[i] for i in first], "--json", "--precision", "fp32"]
        )
        == 0
    )
    predicted = [entry["top_k"][0]["index"] for entry in json.loads(capsys.readouterr().out)]
    bound = sum_bound(
        model.config.pooled_width, (test.features.abs() @ model.head.weight.abs().T).max() * 4
    )
    decided = [i for i in first if (logits[i].topk(2).values.diff().abs() > bound).item()]
    assert [predicted[first.index(i)] for i in decided] == [
        int(logits[i].argmax()) for i in decided
    ]
    assert main(["export", str(out), "--format", "onnx", "--out", str(root / "probe.onnx")]) == 0
    session = onnx.InferenceSession(str(root / "probe.onnx"), providers=["CPUExecutionProvider"])
    images = torch.stack([preprocess(read_image(test.names[i], 32), model.config) for i in first])
    exported = session.run(["logits"], {"images": images.numpy()})[0]
    assert [int(exported[first.index(i)].argmax()) for i in decided] == [
        int(logits[i].argmax()) for i in decided
    ]

"""Multi-label classification: labels from a CSV (path,label;label;... or a header of classes over 0/1 columns), the
metrics against scikit-learn's (average precision per class, mAP, F1 at a threshold), and `eval` and `predict` of a
model whose classes are independent (a sigmoid each)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vitlab.app.cli import main
from vitlab.data import load_image_list
from vitlab.errors import DataError
from vitlab.evaluate import average_precision, multi_label_metrics
from vitlab.formats.weights import save_safetensors
from vitlab.model import create_model

from parity import one_error_line

CLASSES = ["cat", "dog", "fish"]


def labelled_images(root, rows: list[tuple[str, list[str]]], size=16, seed=0):
    """PNGs at `root/<name>` and `root/labels.csv` of `path,label;label` rows."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for name, _ in rows:
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / name)
    (root / "labels.csv").write_text("".join(f"{n},{';'.join(c)}\n" for n, c in rows))
    return root / "labels.csv"


ROWS = [
    ("a.png", ["cat"]),
    ("b.png", ["cat", "dog"]),
    ("c.png", ["fish", "dog"]),
    ("d.png", []),
    ("e.png", ["fish"]),
]


def test_labels_from_a_csv_of_names_or_of_columns(tmp_path):
    data = load_image_list(labelled_images(tmp_path / "names", ROWS), multi_label=True)
    assert data.class_names == CLASSES and data.images.shape == (5, 16, 16, 3)
    expected = [[1, 0, 0], [1, 1, 0], [0, 1, 1], [0, 0, 0], [0, 0, 1]]
    assert data.labels.tolist() == expected
    columns = tmp_path / "names" / "columns.csv"
    columns.write_text(
        "path,fish,cat,dog\n"
        + "".join(f"{n},{int('fish' in c)},{int('cat' in c)},{int('dog' in c)}\n" for n, c in ROWS)
    )
    same = load_image_list(columns, multi_label=True, class_names=CLASSES)
    assert same.labels.tolist() == expected and same.paths == data.paths
    # one label an image: ordinary classes
    single = labelled_images(tmp_path / "single", [("a.png", ["dog"]), ("b.png", ["cat"])])
    assert load_image_list(single, multi_label=False).labels.tolist() == [1, 0]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("a.png,cat;dog\n", "has not one label; --multi_label takes several"),
        ("a.png,cat,dog\nb.png\n", "row 1 has 3 columns"),
        ("", "no rows"),
        ("a.png,horse\n", "labels ['horse'] are not among the 3 classes"),
    ],
)
def test_a_bad_labels_file_is_one_line(tmp_path, text, expected):
    labelled_images(tmp_path, [("a.png", ["cat"])])
    (tmp_path / "bad.csv").write_text(text)
    with pytest.raises(DataError, match=expected.replace("[", r"\[").replace("]", r"\]")):
        load_image_list(
            tmp_path / "bad.csv", multi_label="several" not in expected, class_names=CLASSES
        )


def test_metrics_are_scikit_learns():
    metrics = pytest.importorskip("sklearn.metrics")
    g = torch.Generator().manual_seed(0)
    targets = (torch.rand(200, 6, generator=g) < 0.3).float()
    targets[:, 5] = 0  # a class no image has: left out of the mAP
    logits = 2 * targets + torch.randn(200, 6, generator=g)
    logits[:50] = logits[:50].round()  # ties, which scikit-learn takes together
    got = multi_label_metrics(logits, targets, threshold=0.5)
    for c in range(5):
        expected = metrics.average_precision_score(targets[:, c].numpy(), logits[:, c].numpy())
        assert got["per_class_ap"][c] == pytest.approx(expected, abs=1e-12)
    assert got["per_class_ap"][5] is None and average_precision(logits[:, 5], targets[:, 5]) is None
    assert got["mAP"] == pytest.approx(sum(got["per_class_ap"][:5]) / 5)
    predicted = (logits.sigmoid() >= 0.5).numpy()
    assert got["f1_micro"] == pytest.approx(
        metrics.f1_score(targets.numpy(), predicted, average="micro")
    )
    macro = metrics.f1_score(targets.numpy(), predicted, average="macro", zero_division=0)
    assert got["f1_macro"] == pytest.approx(macro)


def test_eval_and_predict_of_a_multi_label_model(tmp_path, randomise, capsys):
    csv = labelled_images(tmp_path / "images", ROWS)
    model = randomise(
        create_model("Ti/16", patch_size=4, img_size=16, depth=1, num_classes=3, multi_label=True),
        std=0.5,
    )
    save_safetensors(model, tmp_path / "model.safetensors", CLASSES)
    argv = [
        "eval",
        str(tmp_path / "model.safetensors"),
        "--labels",
        str(csv),
        "--precision",
        "fp32",
    ]
    assert main([*argv, "--out", str(tmp_path / "eval")]) == 0
    printed = capsys.readouterr().out
    assert "mAP" in printed and "micro" in printed
    report = json.loads((tmp_path / "eval" / "model_labels_eval.json").read_text())
    assert set(report) >= {"mAP", "per_class_ap", "f1_micro", "f1_macro", "loss", "labels"}
    assert (tmp_path / "eval" / "model_labels_average_precision.png").is_file()
    # predict: every class over the threshold, most probable first
    images = [str(tmp_path / "images" / n) for n, _ in ROWS]
    assert (
        main(
            [
                "predict",
                str(tmp_path / "model.safetensors"),
                *images,
                "--json",
                "--threshold",
                "0.3",
            ]
        )
        == 0
    )
    results = json.loads(capsys.readouterr().out)
    assert any(entry["labels"] for entry in results) and not all(
        len(entry["labels"]) == 3 for entry in results
    )
    for entry in results:
        probabilities = [label["probability"] for label in entry["labels"]]
        assert all(p >= 0.3 for p in probabilities) and probabilities == sorted(
            probabilities, reverse=True
        )
    # a multi-label model is evaluated on its labels file
    assert main(["eval", str(tmp_path / "model.safetensors"), "--dataset", "imagefolder"]) == 2
    assert "--labels CSV" in one_error_line(capsys)


def test_fine_tuning_sets_the_task_whatever_the_file_says(tiny_run):
    # A softmax head over 3 classes fine-tuned as 3 independent sigmoids, and back: the same weights,
    # the task the run chose (a model setting fine-tuning sets, as its classes)
    from vitlab.formats.checkpoints import load_model, pretrained_model

    trained, _ = load_model(tiny_run.checkpoint)
    for multi_label in (True, False):
        wanted = trained.config.replace(multi_label=multi_label)
        tuned = pretrained_model(tiny_run.checkpoint, wanted, frozenset({"multi_label"}), False)
        assert tuned.config.multi_label is multi_label
        for key, value in trained.state_dict().items():
            assert torch.equal(tuned.state_dict()[key], value), key

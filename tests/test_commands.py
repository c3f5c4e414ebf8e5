"""Loading a model from any source, and the `eval` and `predict` commands, on a tiny trained run
(the `tiny_run` fixture) and on hand-built official-layout files; every bad input is one line on
stderr and a non-zero exit."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vitlab.app.cli import main
from vitlab.app.inference import preprocess
from vitlab.data import read_image
from vitlab.errors import CheckpointError
from vitlab.formats import checkpoints, official
from vitlab.formats.checkpoints import load_model
from vitlab.model import create_model

from parity import one_error_line
from rounding import assert_within_float32_rounding, float32_rounding


def save_png(path, seed: int = 0, size: int = 16):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(
        np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    ).save(path)
    return path


# ---------------------------------------------------------------------------------------------
# load_for_inference


def test_training_checkpoint_loads_with_its_config_and_class_names(tiny_run):
    model, names = load_model(tiny_run.checkpoint)
    payload = checkpoints.read_checkpoint(tiny_run.checkpoint)
    assert names == tiny_run.class_names
    assert model.config.to_dict() == payload["model_config"]
    assert not model.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, payload["model"][key])


def test_checkpoint_whose_weights_do_not_fit_its_config_is_refused(tiny_run, tmp_path, capsys):
    payload = checkpoints.read_checkpoint(tiny_run.checkpoint)
    payload["model_config"]["hidden_size"] = 32  # another shape than the weights it carries
    bad = tmp_path / "other.pt"
    torch.save(payload, bad)
    with pytest.raises(CheckpointError, match="shape"):
        load_model(bad)
    assert (
        main(["eval", str(bad), "--dataset", "imagefolder", "--data_dir", str(tiny_run.data_dir)])
        == 1
    )
    assert "shape" in one_error_line(capsys)


@pytest.mark.parametrize(
    "command",
    [["eval"], ["predict"], ["attention"], ["export", "--format", "npz", "--out", "x.npz"]],
)
def test_missing_checkpoint_is_one_line_for_every_command(command, tmp_path, capsys):
    image = str(save_png(tmp_path / "a.png"))
    argv = [
        command[0],
        str(tmp_path / "missing.pt"),
        *([image] if command[0] in ("predict", "attention") else []),
        *command[1:],
    ]
    assert main(argv) == 1
    assert "missing.pt: no such file" in one_error_line(capsys)


@pytest.mark.parametrize(
    "overrides",
    [{}, {"classifier": "gap", "representation_size": 3, "num_classes": 5, "img_size": 48}],
)
def test_official_npz_shape_is_read_from_the_file(overrides, tmp_path, randomise):
    source = randomise(
        create_model("testing", **{"num_classes": 3, "img_size": 32, **overrides})
    ).eval()
    path = tmp_path / "official.npz"
    official.save_npz(source, path)
    model, names = load_model(path, model_type="testing")
    assert model.config == source.config.replace(dropout_rate=0.0)
    assert names == [f"class {i}" for i in range(source.config.num_classes)]
    x = torch.rand(2, 3, source.config.img_size, source.config.img_size) * 2 - 1
    torch.testing.assert_close(model(x), source(x))


def test_official_npz_needs_model_type_and_other_files_refuse_it(tiny_run, tmp_path, capsys):
    path = tmp_path / "official.npz"
    official.save_npz(create_model("testing", num_classes=3, img_size=32), path)
    assert main(["predict", str(path), str(save_png(tmp_path / "a.png"))]) == 1
    assert "--model_type" in one_error_line(capsys)
    assert (
        main(["predict", str(tiny_run.checkpoint), str(tmp_path / "a.png"), "--model_type", "B/16"])
        == 1
    )
    assert "only for official .npz" in one_error_line(capsys)
    # A file of another variant.
    assert main(["predict", str(path), str(tmp_path / "a.png"), "--model_type", "B/16"]) == 1
    assert "B/16" in one_error_line(capsys)


def test_official_names_predict_imagenet_classes(monkeypatch, tmp_path, capsys):
    names = official.class_names(1000)
    assert len(names) == 1000 and names[0] == "tench" and names[-1] == "toilet tissue"
    assert official.class_names(21843)[7] == "class 7"
    tiny = create_model("testing", num_classes=1000, img_size=16)  # stands in for the download
    monkeypatch.setattr(official, "official_model", lambda name: tiny)
    assert (
        main(
            [
                "predict",
                "augreg-Ti_16-224",
                str(save_png(tmp_path / "a.png")),
                "--json",
                "--top_k",
                "3",
            ]
        )
        == 0
    )
    (result,) = json.loads(capsys.readouterr().out)
    assert [p["class"] for p in result["top_k"]] == [names[p["index"]] for p in result["top_k"]]


# ---------------------------------------------------------------------------------------------
# vitlab eval


def test_eval_prints_saves_and_draws_the_metrics(tiny_run, tmp_path, capsys):
    out = tmp_path / "report"
    argv = [
        "eval",
        str(tiny_run.checkpoint),
        "--dataset",
        "imagefolder",
        "--data_dir",
        str(tiny_run.data_dir),
        "--out",
        str(out),
    ]
    assert main([*argv, "--precision", "fp32"]) == 0
    printed = capsys.readouterr().out
    for word in ("top-1", "top-5", "loss", "confusion matrix", *tiny_run.class_names):
        assert word in printed
    report = json.loads((out / "best_imagefolder_eval.json").read_text())
    for field in (
        "loss",
        "accuracy",
        "top5_accuracy",
        "per_class_accuracy",
        "confusion",
        "class_names",
        "count",
    ):
        assert field in report
    assert report["count"] == 24 and report["class_names"] == tiny_run.class_names
    assert np.asarray(report["confusion"]).sum(axis=1).tolist() == [8, 8, 8]
    assert report["top5_accuracy"] == 1.0  # 3 classes: every label is among the top 5
    with Image.open(out / "best_imagefolder_confusion.png") as png:
        assert png.format == "PNG" and min(png.size) > 100


def test_eval_defaults_beside_the_checkpoint_and_prefers_a_val_folder(tiny_run, tmp_path):
    checkpoint = shutil.copy(tiny_run.checkpoint, tmp_path / "run.pt")
    root = tmp_path / "data"
    for name in tiny_run.class_names:
        save_png(root / "val" / name / "0.png")
    # The root's own folders are not the classes once val/ exists.
    save_png(root / "unrelated" / "0.png")
    assert main(["eval", str(checkpoint), "--dataset", "imagefolder", "--data_dir", str(root)]) == 0
    report = json.loads((tmp_path / "run_imagefolder_eval.json").read_text())
    assert report["count"] == 3
    assert (tmp_path / "run_imagefolder_confusion.png").is_file()


def test_eval_refuses_a_folder_of_other_classes(tiny_run, tmp_path, capsys):
    for name in ("cat", "horse"):
        save_png(tmp_path / name / "0.png")
    assert (
        main(
            [
                "eval",
                str(tiny_run.checkpoint),
                "--dataset",
                "imagefolder",
                "--data_dir",
                str(tmp_path),
            ]
        )
        == 1
    )
    assert "differ" in one_error_line(capsys)
    assert not list(tiny_run.checkpoint.parent.glob("*_eval.json"))


# ---------------------------------------------------------------------------------------------
# vitlab predict


def test_predict_table_and_json_for_files_and_folders(tiny_run, capsys):
    folder = tiny_run.data_dir / "dog"
    assert (
        main(
            [
                "predict",
                str(tiny_run.checkpoint),
                str(tiny_run.data_dir / "cat" / "0.png"),
                str(folder),
                "--top_k",
                "2",
            ]
        )
        == 0
    )
    table = capsys.readouterr().out
    assert table.count("%") == 2 * 9 and str(folder / "7.png") in table
    assert (
        main(
            [
                "predict",
                str(tiny_run.checkpoint),
                str(tiny_run.data_dir),
                "--json",
                "--precision",
                "fp32",
            ]
        )
        == 0
    )
    results = json.loads(capsys.readouterr().out)
    assert len(results) == 24  # folders are searched recursively
    model, names = load_model(tiny_run.checkpoint)
    for result in results[:3]:
        top = result["top_k"]
        assert len(top) == 3  # --top_k 5 of 3 classes
        assert [p["probability"] for p in top] == sorted(
            (p["probability"] for p in top), reverse=True
        )
        assert sum(p["probability"] for p in top) == pytest.approx(1.0, abs=1e-5)
        with torch.no_grad():
            probabilities = model(
                preprocess(read_image(result["image"]), model.config)[None]
            ).softmax(-1)[0]
        assert (
            top[0]["index"] == int(probabilities.argmax())
            and top[0]["class"] == names[top[0]["index"]]
        )
        assert top[0]["probability"] == pytest.approx(float(probabilities.max()), abs=1e-6)


def test_predict_reports_unreadable_images_and_goes_on(tiny_run, tmp_path, capsys):
    good = save_png(tmp_path / "good.png", size=40)  # any size: the whole image is resized
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    assert main(["predict", str(tiny_run.checkpoint), str(bad), str(good), "--json"]) == 1
    captured = capsys.readouterr()
    assert [r["image"] for r in json.loads(captured.out)] == [str(good)]
    (line,) = captured.err.strip().splitlines()
    assert str(bad) in line and "not a readable image" in line


def test_predict_refuses_a_decompression_bomb_in_one_line_and_predicts_the_rest(
    tiny_run, tmp_path, capsys
):
    from test_data import png_claiming

    good = save_png(tmp_path / "good.png", size=40)
    bomb = png_claiming(tmp_path / "bomb.png", 15_000, 12_000)
    assert main(["predict", str(tiny_run.checkpoint), str(bomb), str(good), "--json"]) == 1
    captured = capsys.readouterr()
    assert [r["image"] for r in json.loads(captured.out)] == [str(good)]
    (line,) = captured.err.strip().splitlines()
    assert (
        line
        == f"vitlab predict: skipped {bomb}: an image of more than 179 megapixels, refused (a decompression bomb, or a photo to downscale first)"
    )


@pytest.mark.parametrize("command", ["predict", "attention"])
def test_a_64_megapixel_photo_costs_little_more_memory_than_a_thumbnail(
    tiny_run, tmp_path, command
):
    # An 8000x8000 JPEG (192 MB of pixels, and four times that as floats) is decoded at a reduced scale, never whole:
    # the command's peak memory is within 200 MiB of the same command on a 40 px image (it was 1.6 GiB more).
    import subprocess
    import sys

    ramp = np.linspace(0, 255, 8000, dtype=np.uint8)
    Image.fromarray(np.stack([np.broadcast_to(ramp, (8000, 8000))] * 3, axis=-1)).save(
        tmp_path / "big.jpg", quality=90
    )
    save_png(tmp_path / "small.png", size=40)
    code = (
        "import resource, sys; from vitlab.app.cli import main; rc = main(sys.argv[1:]); "
        "print(rc, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)"
    )
    peaks = {}
    for image in ("small.png", "big.jpg"):
        argv = [command, str(tiny_run.checkpoint), str(tmp_path / image)] + (
            ["--out", str(tmp_path / f"map-{image}.png")] if command == "attention" else []
        )
        done = subprocess.run(
            [sys.executable, "-c", code, *argv], capture_output=True, text=True, check=True
        )
        rc, peaks[image] = done.stdout.split()[-2:]
        assert rc == "0", done.stderr[-2000:]
    assert int(peaks["big.jpg"]) - int(peaks["small.png"]) < 200, peaks


def corrupted_copy(checkpoint, tmp_path):
    from test_checkpoints import flip_bytes_in_largest_tensor

    path = tmp_path / "corrupt" / "best.pt"
    path.parent.mkdir()
    shutil.copy(checkpoint, path)
    flip_bytes_in_largest_tensor(path)
    return path


def test_a_corrupt_checkpoint_is_refused_by_every_command(tiny_run, tmp_path, capsys):
    path = corrupted_copy(tiny_run.checkpoint, tmp_path)
    image = str(tiny_run.data_dir / "cat" / "0.png")
    for argv in (
        ["eval", str(path), "--dataset", "imagefolder", "--data_dir", str(tiny_run.data_dir)],
        ["predict", str(path), image],
        ["attention", str(path), image],
        ["export", str(path), "--format", "safetensors", "--out", str(tmp_path / "m.st")],
    ):
        assert main(argv) == 1, argv
        line = one_error_line(capsys)
        assert str(path) in line and "corrupt" in line and "fails its CRC-32 check" in line
    assert not (tmp_path / "m.st").exists()


def test_predict_on_an_empty_folder_or_missing_path_is_one_line(tiny_run, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["predict", str(tiny_run.checkpoint), str(tmp_path / "empty")]) == 1
    assert "no images" in one_error_line(capsys)
    assert main(["predict", str(tiny_run.checkpoint), str(tmp_path / "nothing.png")]) == 1
    assert "no such file" in one_error_line(capsys)
    assert main(["predict", str(tiny_run.checkpoint), str(tmp_path), "--top_k", "0"]) == 2
    assert "--top_k" in one_error_line(capsys)


def test_predict_in_bf16_where_it_is_emulated_warns_in_one_line_and_runs(
    tiny_run, capsys, monkeypatch
):
    from vitlab import runtime

    monkeypatch.setattr(runtime, "native_bf16", lambda device: False)  # as on an AVX2 CPU
    capsys.readouterr()
    assert (
        main(
            [
                "predict",
                str(tiny_run.checkpoint),
                str(tiny_run.data_dir / "cat" / "0.png"),
                "--precision",
                "bf16",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    out, err = capsys.readouterr()
    assert err.startswith("vitlab: warning: bf16 is emulated on this CPU") and err.count("\n") == 1
    assert "0.png" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_one_line(tiny_run, capsys):
    # A setting this machine cannot use.
    assert (
        main(["predict", str(tiny_run.checkpoint), str(tiny_run.data_dir), "--device", "cuda"]) == 2
    )
    assert "CUDA is not available" in one_error_line(capsys)


def test_the_official_golden_file_loads_with_only_its_variant_named(shared_dir):
    reference = shared_dir / "reference" / "official-vit-ti16"
    model, names = load_model(reference / "ti16_224.npz", model_type="ViT-Ti_16")
    assert (model.config.num_classes, model.config.img_size, model.config.classifier) == (
        10,
        224,
        "token",
    )
    assert model.config.representation_size is None and names[9] == "class 9"
    logits, logits64, _ = float32_rounding(
        model, torch.from_numpy(np.load(reference / "ti16_224_input.npy"))
    )
    expected = torch.from_numpy(np.load(reference / "ti16_224_logits.npy"))
    assert_within_float32_rounding(logits, logits64, expected, "the official logits")


# ---------------------------------------------------------------------------------------------
# Outputs never replace data, reads are bounded, weights are finite


def digest(path) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_export_never_writes_over_its_input_and_replaces_a_file_only_when_told(
    tiny_run, tmp_path, capsys
):
    run = tmp_path / "run"
    shutil.copytree(tiny_run.checkpoint.parent, run)
    best, before = run / "best.pt", digest(run / "best.pt")
    # Onto its own input: refused either way, the checkpoint left whole
    for extra in (
        [],
        ["--overwrite"],
    ):
        assert (
            main(["export", str(best), "--format", "safetensors", "--out", str(best), *extra]) == 2
        )
        assert "would write over the input" in one_error_line(capsys)
        assert digest(best) == before
    # A folder holding it.
    assert main(["export", str(best), "--format", "hf", "--out", str(run), "--overwrite"]) == 2
    assert "would write over the input" in one_error_line(capsys) and digest(best) == before
    other = tmp_path / "other.safetensors"
    other.write_bytes(b"someone's file")
    assert main(["export", str(best), "--format", "safetensors", "--out", str(other)]) == 2
    assert "already exists; --overwrite replaces it" in one_error_line(capsys)
    assert other.read_bytes() == b"someone's file"
    assert (
        main(["export", str(best), "--format", "safetensors", "--out", str(other), "--overwrite"])
        == 0
    )
    assert load_model(other)[1] == tiny_run.class_names


def test_attention_and_eval_refuse_to_replace_their_outputs_unless_told(tiny_run, tmp_path, capsys):
    image = save_png(tmp_path / "cat.png")
    out = tmp_path / "cat_attention.png"
    out.write_bytes(b"kept")
    assert main(["attention", str(tiny_run.checkpoint), str(image)]) == 2
    assert (
        "cat_attention.png: already exists" in one_error_line(capsys)
        and out.read_bytes() == b"kept"
    )
    assert (
        main(
            ["attention", str(tiny_run.checkpoint), str(image), "--out", str(image), "--overwrite"]
        )
        == 2
    )
    assert "would write over the input" in one_error_line(capsys)
    assert main(["attention", str(tiny_run.checkpoint), str(image), "--overwrite"]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
    argv = [
        "eval",
        str(tiny_run.checkpoint),
        "--dataset",
        "imagefolder",
        "--data_dir",
        str(tiny_run.data_dir),
        "--out",
        str(tmp_path / "e"),
    ]
    assert main(argv) == 0
    capsys.readouterr()
    report = tmp_path / "e" / "best_imagefolder_eval.json"
    before = digest(report)
    assert main(argv) == 2
    assert (
        "best_imagefolder_eval.json: already exists" in one_error_line(capsys)
        and digest(report) == before
    )
    assert main([*argv, "--overwrite"]) == 0


def test_weights_that_are_not_finite_are_refused_by_every_command(tiny_run, tmp_path, capsys):
    payload = checkpoints.read_checkpoint(tiny_run.checkpoint)
    payload["model"]["head.bias"][0] = float("nan")
    bad = tmp_path / "nan.pt"
    torch.save(payload, bad)
    image = str(save_png(tmp_path / "a.png"))
    for argv in (
        ["eval", str(bad), "--dataset", "imagefolder", "--data_dir", str(tiny_run.data_dir)],
        ["predict", str(bad), image],
        ["export", str(bad), "--format", "safetensors", "--out", str(tmp_path / "x.safetensors")],
    ):
        assert main(argv) == 1
        assert "hold NaN or infinite values (head.bias)" in one_error_line(capsys)
    model = create_model("testing", num_classes=3, img_size=32)
    with torch.no_grad():
        model.head.weight.fill_(float("inf"))
    official.save_npz(model, tmp_path / "inf.npz")
    assert main(["predict", str(tmp_path / "inf.npz"), "--model_type", "testing", image]) == 1
    assert "hold NaN or infinite values (head/kernel)" in one_error_line(capsys)


def peak_rss_of(code: str) -> tuple[int, str, int]:
    """(exit status, stderr, peak resident memory in MB) of `code` run in a fresh Python."""
    import subprocess
    import sys

    probe = (
        f"import resource, subprocess, sys\ndone = subprocess.run([sys.executable, '-c', {code!r}], capture_output=True, text=True)\n"
        "print(done.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024)\nsys.stderr.write(done.stderr)"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=300
    )
    rc, peak = result.stdout.split()
    return int(rc), result.stderr, int(peak)


def test_an_npz_whose_member_inflates_to_gigabytes_is_refused_before_it_is_read(tmp_path):
    # 2 GiB of zeros deflated to a few MB, with a true header: refused from the headers, at little more memory than
    # the import of torch (the same command on a real Ti/16 file peaks at about as much).
    import zipfile

    bomb = tmp_path / "bomb.npz"
    count = 2**29
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        with archive.open("head/kernel.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(
                f, {"descr": "<f4", "fortran_order": False, "shape": (count,)}
            )
            chunk = bytes(1 << 24)
            for _ in range(count * 4 // len(chunk)):
                f.write(chunk)
    assert bomb.stat().st_size < 20e6
    image = save_png(tmp_path / "a.png")
    code = f"import sys; from vitlab.app.cli import main; sys.exit(main(['predict', {str(bomb)!r}, '--model_type', 'Ti/16', {str(image)!r}]))"
    rc, err, peak = peak_rss_of(code)
    assert rc == 1
    assert (
        f"holds {count:,} numbers, more than a checkpoint of this model can"
        in err.strip().splitlines()[-1]
    )
    print(f"peak resident memory {peak} MB")
    assert peak < 1200, f"peaked at {peak} MB"


def test_a_small_file_whose_config_claims_a_huge_model_builds_nothing(tiny_run, tmp_path):
    payload = checkpoints.read_checkpoint(tiny_run.checkpoint)
    # About 40 billion numbers.
    payload["model_config"].update(hidden_size=8192, mlp_dim=32768, depth=48, num_heads=64)
    huge = tmp_path / "huge.pt"
    torch.save(payload, huge)
    assert huge.stat().st_size < 1e6
    code = f"import sys; from vitlab.app.cli import main; sys.exit(main(['predict', {str(huge)!r}, {str(save_png(tmp_path / 'a.png'))!r}]))"
    rc, err, peak = peak_rss_of(code)
    assert rc == 1
    assert "missing keys" in err.strip().splitlines()[-1] and "batch size" not in err
    print(f"peak resident memory {peak} MB")
    assert peak < 1200, f"peaked at {peak} MB"


def test_predict_over_many_files_shows_progress_on_stderr(tiny_run, tmp_path, capsys):
    for i in range(40):
        save_png(tmp_path / "many" / f"{i:02d}.png", seed=i)
    assert (
        main(
            [
                "predict",
                str(tiny_run.checkpoint),
                str(tmp_path / "many"),
                "--batch_size",
                "8",
                "--json",
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    assert len(json.loads(captured.out)) == 40  # stdout stays the JSON alone
    assert "predict" in captured.err and "40/40" in captured.err
    assert main(["predict", str(tiny_run.checkpoint), str(tmp_path / "many" / "00.png")]) == 0
    assert capsys.readouterr().err == ""  # one batch: no bar

"""Distillation (`vitlab train --teacher`, distillation.py and losses.Distillation): the hard and soft
terms against their formulas in float64, the teacher's input conversion against a direct computation,
a teacher that gets no gradient and stays in eval mode, the refusals, tiny distilled runs of a student
with and without DeiT's distillation token, and bit-exact resume with a teacher. Tiny models (conftest's
TINY) on random images, CPU only."""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_train import (
    RESUME_FLAGS,
    SLOW_STEPS,
    finish,
    make_image_folder,
    one_error_line,
    run_cli,
    train_subprocess,
    wait_for,
)

from vitlab.distillation import Teacher
from vitlab.formats.checkpoints import load_model, read_checkpoint
from vitlab.losses import Criterion, Distillation, distillation_term
from vitlab.model import create_model

from conftest import TINY, train_tiny


def logits(batch: int = 6, classes: int = 5, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, classes, generator=torch.Generator().manual_seed(seed)) * 3


# ---------------------------------------------------------------------------------------------
# The loss


def test_the_hard_term_is_the_cross_entropy_against_the_teachers_top_class_in_float64():
    student, teacher = logits().double(), logits(seed=1).double()
    top = teacher.argmax(dim=1)
    log_p = student - student.exp().sum(dim=1, keepdim=True).log()
    expected = -log_p[torch.arange(len(top)), top].mean()
    got = distillation_term(student, teacher, "hard", 1.0)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=1e-14, atol=0)


@pytest.mark.parametrize("tau", [1.0, 2.5])
def test_the_soft_term_is_deits_kl_divided_by_images_times_classes_in_float64(tau):
    student, teacher = logits().double(), logits(seed=1).double()
    p_t = (teacher / tau).softmax(dim=1)
    log_p_s, log_p_t = (student / tau).log_softmax(dim=1), (teacher / tau).log_softmax(dim=1)
    # sum over images and classes of p_t (log p_t - log p_s), times tau^2, over B x C (DeiT's numel)
    expected = (p_t * (log_p_t - log_p_s)).sum() * tau**2 / student.numel()
    torch.testing.assert_close(
        distillation_term(student, teacher, "soft", tau), expected, rtol=1e-13, atol=0
    )


@pytest.mark.parametrize("kind", ["hard", "soft"])
@pytest.mark.parametrize("mixed", [False, True])
def test_the_loss_is_the_base_on_the_class_head_and_the_term_on_the_distillation_head(kind, mixed):
    cls, dist, teacher = logits(seed=2), logits(seed=3), logits(seed=4)
    labels = (
        torch.tensor([0, 1, 2, 3, 4, 0]) if not mixed else logits(seed=5).softmax(dim=1)
    )  # class indices, or mixup's probability rows
    images = torch.zeros(6, 3, 4, 4)
    seen = []
    loss = Distillation(
        base=Criterion(label_smoothing=0.1),
        teacher=lambda x: seen.append(x) or teacher,
        kind=kind,
        alpha=0.3,
        tau=2.0,
    )
    value = loss((cls, dist), images, labels)
    assert seen[0] is images  # the teacher sees the student's (mixed) images
    d = lambda t: t.double()  # noqa: E731
    base = F.cross_entropy(d(cls), d(labels) if mixed else labels, label_smoothing=0.1)
    expected = 0.7 * base + 0.3 * distillation_term(d(dist), d(teacher), kind, 2.0)
    torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=0)
    # Without a distillation token both terms read the one head
    one = 0.7 * base + 0.3 * distillation_term(d(cls), d(teacher), kind, 2.0)
    torch.testing.assert_close(loss(cls, images, labels).double(), one, rtol=1e-5, atol=0)


# ---------------------------------------------------------------------------------------------
# The teacher

IMAGENET = dict(image_mean=(0.485, 0.456, 0.406), image_std=(0.229, 0.224, 0.225))


def tiny_model(**changes):
    fields = {k: TINY[k] for k in ("patch_size", "depth", "hidden_size", "num_heads", "mlp_dim")}
    return create_model("Ti/16", **{**fields, "num_classes": 3, "img_size": 16, **changes})


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize("size", [8, 24])
def test_the_teacher_gets_the_students_images_as_its_own_preprocessing_wants(interpolation, size):
    from torchvision.transforms.v2 import functional as TF

    student = tiny_model().config  # mean and std 0.5, 16 px
    teacher = Teacher(
        tiny_model(img_size=size, interpolation=interpolation, **IMAGENET),
        student,
        torch.device("cpu"),
    )
    pixels = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    images = (pixels - 0.5) / 0.5  # as the student is fed
    resized = TF.resize(pixels, [size, size], interpolation=TF.InterpolationMode(interpolation))
    if interpolation == "bicubic":
        resized = resized.clamp(0, 1)
    mean, std = (torch.tensor(IMAGENET[k]).view(3, 1, 1) for k in ("image_mean", "image_std"))
    torch.testing.assert_close(teacher.inputs(images), (resized - mean) / std, rtol=0, atol=1e-5)
    # Fed alike: the very tensor
    same = Teacher(tiny_model(), student, torch.device("cpu"))
    assert same.inputs(images) is images


def test_the_teacher_gets_no_gradient_and_stays_in_eval_mode():
    teacher_model = tiny_model(dropout_rate=0.5)
    teacher = Teacher(teacher_model, tiny_model().config, torch.device("cpu"))
    student = tiny_model(distilled=True).train()
    student.heads_apart = True
    images = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    loss = Distillation(base=Criterion(), teacher=teacher, kind="soft")
    outputs = student(images)
    assert isinstance(outputs, tuple) and len(outputs) == 2
    loss(outputs, images, torch.tensor([0, 1, 2, 0])).backward()
    assert not teacher_model.training
    assert all(p.grad is None and not p.requires_grad for p in teacher_model.parameters())
    assert student.head_dist.weight.grad is not None
    # Eval mode: no dropout, the same logits twice; and no graph
    first = teacher(images)
    assert torch.equal(first, teacher(images)) and not first.requires_grad
    # The student evaluates as before: the two heads averaged
    student.eval()
    assert torch.is_tensor(student(images))


def test_the_teacher_computes_at_its_own_precision_inside_the_students_autocast():
    teacher = Teacher(tiny_model(), tiny_model().config, torch.device("cpu"))
    teacher.precision = "fp32"  # as `auto` resolves where bf16 is not native
    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    expected = teacher(images.bfloat16().float())
    # A student training in bf16: its batch is bf16, its autocast around the loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = teacher(images.bfloat16())
    assert got.dtype == torch.float32 and torch.equal(got, expected)


# ---------------------------------------------------------------------------------------------
# Runs

STUDENT_FLAGS = [
    "--dataset",
    "imagefolder",
    *sum(([f"--{k}", str(v)] for k, v in TINY.items()), []),
    "--device",
    "cpu",
    "--num_steps",
    "3",
    "--eval_every",
    "3",
    "--log_every",
    "1",
    "--train_batch_size",
    "8",
    "--val_split",
    "0.25",
    "--num_workers",
    "0",
    "--warmup_steps",
    "0",
]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A tiny run (classes cat, dog, fish) at 8 px with ImageNet's mean and std, bicubic: a teacher
    fed otherwise than the 16 px students."""
    return train_tiny(
        tmp_path_factory.mktemp("teacher"), img_size=8, interpolation="bicubic", **IMAGENET
    )


def student_argv(teacher, name: str, *extra: str) -> list[str]:
    return ["train", "--name", name, "--data_dir", str(teacher.data_dir), *STUDENT_FLAGS, *extra]


def train_losses(name: str) -> list[float]:
    lines = (Path("output") / name / "metrics.jsonl").read_text().splitlines()
    return [r["train/loss"] for r in map(json.loads, lines) if "train/loss" in r]


@pytest.mark.parametrize("distilled", [False, True])
def test_a_student_distils_from_a_teacher_trained_here(
    teacher, distilled, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    token = ["--distilled"] if distilled else []  # Ti/16 classifies by its class token
    with_teacher = ["--teacher", str(teacher.checkpoint)]
    runs = {
        "alone": [],
        "alpha0": [*with_teacher, "--distillation_alpha", "0"],
        "hard": with_teacher,
        "soft": [*with_teacher, "--distillation", "soft", "--distillation_tau", "2"],
    }
    for name, extra in runs.items():
        rc, out, err = run_cli(student_argv(teacher, name, *token, *extra), capsys)
        assert rc == 0, err
        if extra:
            assert (
                f"teacher {teacher.checkpoint} (" in out and "resized 16 -> 8 px (bicubic)" in out
            )
    if distilled:
        # The distillation head learns from the teacher alone: at alpha 0 it stays at its zero init
        heads = {n: read_checkpoint(Path("output") / n / "last.pt")["model"] for n in runs}
        assert not heads["alpha0"]["head_dist.weight"].any()
        assert heads["hard"]["head_dist.weight"].any() and heads["alone"]["head_dist.weight"].any()
    else:
        # alpha 0: the teacher's term weighs nothing, and nothing else of the run changed
        assert train_losses("alpha0") == train_losses("alone")
    assert train_losses("hard") != train_losses("alone") != train_losses("soft")
    model, names = load_model(Path("output") / "hard" / "best.pt")
    assert names == teacher.class_names and model.config.distilled == distilled
    assert read_checkpoint(Path("output") / "hard" / "last.pt")["train_config"]["teacher"] == str(
        teacher.checkpoint
    )


def test_a_teacher_of_other_classes_is_refused_naming_both(teacher, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    data = make_image_folder(tmp_path / "data")  # cat, dog, eel
    argv = student_argv(teacher, "x", "--teacher", str(teacher.checkpoint))
    argv[argv.index("--data_dir") + 1] = str(data)
    rc, _, err = run_cli(argv, capsys)
    assert rc == 2
    assert one_error_line(err).endswith(
        f"--teacher {teacher.checkpoint}: its classes (3: cat, dog, fish) are not this run's "
        "(3: cat, dog, eel)"
    )


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--distillation", "soft"], "--distillation soft: distils only with --teacher"),
        (["--distillation_alpha", "0.7"], "--distillation_alpha 0.7: distils only with --teacher"),
        (["--teacher", "t.pt", "--distillation_tau", "2"], "--distillation_tau is soft"),
        (
            ["--teacher", "t.pt", "--distillation_alpha", "1.5"],
            "--distillation_alpha must be in [0, 1]",
        ),
    ],
)
def test_distillation_settings_without_their_teacher_are_refused(
    extra, expected, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    rc, _, err = run_cli(["train", "--name", "x", *STUDENT_FLAGS, *extra], capsys)
    assert rc == 2
    assert expected in one_error_line(err)
    assert not (tmp_path / "output").exists()


def test_a_multi_label_student_is_refused(teacher, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = student_argv(teacher, "x", "--teacher", str(teacher.checkpoint), "--multi_label")
    rc, _, err = run_cli(argv, capsys)
    assert rc == 2
    assert "distillation of a multi-label model is not supported yet" in one_error_line(err)


def test_resume_with_a_teacher_is_bit_exact_and_keeps_its_settings(
    teacher, tmp_path, capsys, monkeypatch
):
    work = tmp_path
    argv = [
        *RESUME_FLAGS,
        "--data_dir",
        str(teacher.data_dir),
        "--teacher",
        str(teacher.checkpoint),
        "--mixup",
        "0.8",
        "--distilled",
    ]
    rc, _, err = finish(train_subprocess(work, ["--name", "ref", *argv]))
    assert rc == 0, err[-3000:]
    process = train_subprocess(work, ["--name", "run", *argv], code=SLOW_STEPS)
    wait_for(work / "output" / "run" / "last.pt", process)
    process.send_signal(signal.SIGKILL)
    assert finish(process)[0] == -signal.SIGKILL
    killed_at = read_checkpoint(work / "output" / "run" / "last.pt")["step"]
    assert killed_at < 16
    rc, out, err = finish(train_subprocess(work, ["--name", "run", *argv, "--resume"]))
    assert rc == 0, err[-3000:]
    ref, run = (read_checkpoint(work / "output" / n / "last.pt") for n in ("ref", "run"))
    for key in ref["model"]:
        assert torch.equal(run["model"][key], ref["model"][key]), key
    monkeypatch.chdir(work)
    assert train_losses("run") == train_losses("ref")
    # A changed distillation setting changes the run's course: refused
    rc, _, err = finish(
        train_subprocess(work, ["--name", "run", *argv, "--distillation", "soft", "--resume"])
    )
    assert rc == 2
    assert "--distillation hard, this one soft" in one_error_line(err)


def test_resume_after_the_teacher_file_was_replaced_is_refused(
    teacher, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    shutil.copy(teacher.checkpoint, tmp_path / "teacher.pt")
    argv = student_argv(teacher, "run", "--teacher", str(tmp_path / "teacher.pt"))
    assert run_cli(argv, capsys)[0] == 0
    # Another model of the same classes, written over the teacher's file
    assert run_cli(student_argv(teacher, "other"), capsys)[0] == 0
    shutil.copy(Path("output") / "other" / "last.pt", tmp_path / "teacher.pt")
    rc, _, err = run_cli([*argv, "--num_steps", "4", "--resume"], capsys)
    assert rc == 2
    assert "its run's teacher had other weights than --teacher has now" in one_error_line(err)
    # The teacher's own file back: the run goes on
    shutil.copy(teacher.checkpoint, tmp_path / "teacher.pt")
    rc, _, err = run_cli([*argv, "--num_steps", "4", "--resume"], capsys)
    assert rc == 0, err

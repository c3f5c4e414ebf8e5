"""`vitlab train`: the tutorial's flags and defaults, the schedule, gradient accumulation, bit-exact
resume after a kill (also mid-save), the two-process gloo run, image-folder errors, refused
inputs, the NaN guard and the run's outputs. Tiny models (Ti/16 cut down to patch 4 at 16 px,
depth 1, width 16) on a few dozen random images made in tmp_path, CPU only."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from vitlab import fastpaths, runs, runtime
from vitlab import train as vtrain
from vitlab.app.cli import build_parser, main, train_config_from_args
from vitlab.batches import eval_batches
from vitlab.config import ModelConfig, TrainConfig, field_type
from vitlab.data import load_image_folder
from vitlab.errors import ConfigError, TrainingError
from vitlab.evaluate import evaluate
from vitlab.formats import checkpoints
from vitlab.formats.checkpoints import CheckpointError, read_checkpoint
from vitlab.formats.official import pretrained_source
from vitlab.model import VisionTransformer
from vitlab.optim import lr_factor
from vitlab.train import train

from conftest import TINY
from rounding import assert_within, sum_bound, ulps

CLASSES = ["cat", "dog", "eel"]
# .lock: held while the run runs
RUN_FILES = {
    "config.json",
    "best.pt",
    "last.pt",
    "metrics.jsonl",
    "final_metrics.json",
    ".lock",
}
SUBPROCESS_TIMEOUT = 300


def make_image_folder(
    root: Path, per_class: int = 12, size: int = 16, seed: int = 0, ext: str = "png"
) -> Path:
    """`root/<class>/<i>.<ext>`: random images whose mean colour depends on the class, so there is something to learn."""
    rng = np.random.default_rng(seed)
    for label, name in enumerate(CLASSES):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            image = rng.integers(0, 160, (size, size, 3)) + np.eye(3, dtype=np.int64)[label] * 90
            Image.fromarray(image.astype(np.uint8)).save(folder / f"{i:03d}.{ext}")
    return root


def flags(**values) -> list[str]:
    out = []
    for key, value in values.items():
        out += [f"--{key}", str(value)]
    return out


TINY_FLAGS = flags(**TINY)


def clean_env(**extra) -> dict:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


@pytest.fixture(autouse=True)
def _single_process(monkeypatch):
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)


def tiny_config(tmp_path: Path, name: str, data_dir: Path, **changes) -> TrainConfig:
    values = dict(
        TINY,
        name=name,
        dataset="imagefolder",
        data_dir=str(data_dir),
        output_dir=str(tmp_path / "output"),
        log_dir=str(tmp_path / "logs"),
        device="cpu",
        train_batch_size=8,
        num_steps=6,
        eval_every=3,
        warmup_steps=2,
        learning_rate=0.05,
        val_split=0.25,
        dropout_rate=0.0,
        num_workers=0,
    )
    values.update(changes)
    return TrainConfig.from_dict(values)


def reordered_training_bound(config: TrainConfig):
    """How far two SGD runs of `config` may end apart, weight by weight, when they sum each gradient in another order
    (micro-batches, processes): per step, a unit of the weight for its update's own rounding, and the update's
    difference, lr / (1 - momentum) times the reordering bound of a sum over the batch's tokens, whose terms are
    taken to total at most the batch size times the clip norm (each image's share of a clipped gradient no larger
    than the whole: the assumption on which this bound rests)."""
    model = config.model_config(3)
    terms = config.train_batch_size * ((model.img_size // model.patch_size) ** 2 + 1)
    update = (
        config.learning_rate
        / (1 - config.momentum)
        * config.train_batch_size
        * config.max_grad_norm
    )
    return lambda weight: (
        ulps(weight, torch.float32, config.num_steps) + sum_bound(terms, config.num_steps * update)
    )


def model_state(path: Path) -> dict[str, torch.Tensor]:
    return read_checkpoint(path)["model"]


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """`vitlab ARGV` in this process: (exit status, stdout, stderr)."""
    capsys.readouterr()
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's own refusals
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{err}"
    assert lines[0].startswith("vitlab train: error: "), lines[0]
    return lines[0]


# ---------------------------------------------------------------------------------------------
# 1. The tutorial's command line


def parse(argv: list[str]) -> TrainConfig:
    return train_config_from_args(build_parser().parse_args(argv))


# The seed: the tutorial's train.py, every flag with its default and, where it has them, its choices (its
# --train_batch_size is 16: the run behind its headline, 95.66% after 100 steps, logs train_batch_size=16).
SEED_FLAGS = {
    "name": (None, None),  # required
    "dataset": ("cifar10", ("cifar10", "cifar100")),
    "model_type": (
        "ViT-B_16",
        ("ViT-B_16", "ViT-B_32", "ViT-L_16", "ViT-L_32", "ViT-H_14", "R50-ViT-B_16"),
    ),
    "pretrained_dir": ("checkpoint/ViT-B_16.npz", None),
    "output_dir": ("output", None),
    "img_size": (224, None),
    "train_batch_size": (16, None),
    "eval_batch_size": (64, None),
    "eval_every": (100, None),
    "learning_rate": (3e-2, None),
    "weight_decay": (0, None),
    "num_steps": (10000, None),
    "decay_type": ("cosine", ("cosine", "linear")),
    "warmup_steps": (500, None),
    "max_grad_norm": (1.0, None),
    "local_rank": (-1, None),
    "seed": (42, None),
    "gradient_accumulation_steps": (1, None),
    "fp16": (False, None),  # store_true
    "fp16_opt_level": ("O2", None),
    "loss_scale": (0, None),
}
ANY = object()  # a setting the seed's run never reads (AdamW's betas: it ran SGD)
# vitlab's own settings that change a run's course (resume="same"), at the value that computes what the seed did
SEED_BEHAVIOUR = {
    "val_split": 0.0,  # it evaluated on the test split
    "precision": "fp32",
    "optimizer": "sgd",
    "momentum": 0.9,
    "adam_betas": ANY,
    "label_smoothing": 0.0,
    "augment": "resized_crop",
    "min_scale": 0.05,
    "hflip": False,
    "randaugment": "",
    "mixup": 0.0,
    "cutmix": 0.0,
    "mixup_switch_prob": ANY,
    "random_erasing": 0.0,
    "ema": 0.0,
    "layer_decay": 1.0,
    "freeze": "none",
    "model": {},
    "teacher": "",
    "distillation": ANY,  # read only with a teacher
    "distillation_alpha": ANY,
    "distillation_tau": ANY,
}


def seed_departures() -> dict[str, object]:
    """vitlab's defaults that differ from what the seed ran, by setting."""
    seed = {name: default for name, (default, _) in SEED_FLAGS.items()} | SEED_BEHAVIOUR
    defaults = TrainConfig()
    return {
        name: getattr(defaults, name)
        for name, value in seed.items()
        if name != "name" and value is not ANY and getattr(defaults, name) != value
    }


def test_every_flag_of_the_seed_keeps_its_default_and_choices():
    defaults = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for name, (default, choices) in SEED_FLAGS.items():
        assert name in defaults, name
        if name != "name" and name not in seed_departures():
            assert getattr(TrainConfig(), name) == default, name
        for choice in choices or ():  # each of the seed's choices is taken
            parse(["train", "--name", "x", f"--{name}", choice]).validate()
    # --name is required, and the tutorial's job's command line gives the seed's run
    with pytest.raises(ConfigError, match="--name is required"):
        parse(["train"]).validate()
    config = parse(
        "train --name cifar10-100_500 --dataset cifar10 --model_type ViT-B_16 --num_steps 100".split()
    )
    config.validate()
    assert config == TrainConfig(name="cifar10-100_500", num_steps=100)
    assert (config.train_batch_size, config.gradient_accumulation_steps) == (16, 1)


def test_vitlabs_settings_that_change_a_run_are_each_at_the_seeds_value_or_a_listed_departure():
    # A new setting that changes a run's course must say what the seed did, here
    course = {f.name for f in dataclasses.fields(TrainConfig) if f.metadata.get("resume") == "same"}
    assert course - set(SEED_FLAGS) == set(SEED_BEHAVIOUR)
    assert seed_departures() == {
        "pretrained_dir": "auto",
        "val_split": 0.02,
        "hflip": True,
        "precision": "auto",
    }


def test_the_readme_lists_the_departures_from_the_seed():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    listed = readme.split("Departures from the tutorial's run", 1)[1].split("\n\n", 1)[0]
    items = re.findall(r"^- `--(\w+)(?: ([^`]+))?`", listed, flags=re.MULTILINE)
    assert {name: value or True for name, value in items} == {
        name: str(value) if not isinstance(value, bool) else value
        for name, value in seed_departures().items()
    }


def test_the_vitlab_command_keeps_freed_memory_for_reuse(monkeypatch):
    # Every command runs with malloc keeping freed memory (a training step reuses the last one's pages).
    import vitlab

    calls = []
    monkeypatch.setattr(vitlab, "keep_freed_memory", lambda: calls.append(True) or True)
    assert main(["models"]) == 0
    assert calls == [True]


def test_dashed_spellings_and_local_rank():
    config = parse(
        [
            "train",
            "--name",
            "x",
            "--train-batch-size",
            "8",
            "--eval-batch-size",
            "4",
            "--gradient-accumulation-steps",
            "2",
            "--learning-rate",
            "0.1",
            "--decay-type",
            "linear",
            "--warmup-steps",
            "3",
            "--fp16-opt-level",
            "O1",
            "--loss-scale",
            "128",
            "--no-hflip",
        ]
    )
    assert (
        config.train_batch_size,
        config.eval_batch_size,
        config.gradient_accumulation_steps,
    ) == (8, 4, 2)
    assert (config.learning_rate, config.decay_type, config.warmup_steps) == (0.1, "linear", 3)
    assert (config.fp16_opt_level, config.loss_scale, config.hflip) == ("O1", 128.0, False)
    assert parse(["train", "--name", "x", "--local_rank", "0"]).local_rank == 0
    assert parse(["train", "--name", "x", "--local-rank", "0"]).local_rank == 0
    # Torch.distributed.launch's spelling
    assert parse(["train", "--name", "x", "--local-rank=1"]).local_rank == 1
    assert parse(["train", "--name", "x", "--fp16"]).fp16 is True
    assert parse(["train", "--name", "x", "--fp16"]).effective_precision() == "fp16"
    assert (
        parse(["train", "--name", "x", "--fp16", "--fp16_opt_level", "O0"]).effective_precision()
        == "fp32"
    )


def test_resume_flag_forms():
    assert parse(["train", "--name", "x"]).resume is None
    assert parse(["train", "--name", "x", "--resume"]).resume == "last"
    assert parse(["train", "--name", "x", "--resume", "some/where.pt"]).resume == "some/where.pt"
    assert parse(["train", "--name", "x", "--adam_betas", "0.8", "0.95"]).adam_betas == (0.8, 0.95)


def test_model_override_flags_reach_the_model_config():
    config = parse(
        [
            "train",
            "--name",
            "x",
            "--model_type",
            "Ti/16",
            "--img_size",
            "32",
            "--patch-size",
            "4",
            "--gelu",
            "exact",
            "--pos-embed-init",
            "sincos2d",
            "--classifier",
            "gap",
            "--patch-drop-rate",
            "0.5",
            "--attention-init",
            "mimetic",
            "--layer_norm_eps",
            "1e-12",
            "--final-norm",
            "after_pool",
            "--stem_norm",
            "timm",
        ]
    )
    model_config = config.model_config(num_classes=10)
    assert (model_config.patch_size, model_config.gelu, model_config.pos_embed_init) == (
        4,
        "exact",
        "sincos2d",
    )
    assert (model_config.patch_drop_rate, model_config.attention_init) == (0.5, "mimetic")
    assert (model_config.layer_norm_eps, model_config.final_norm, model_config.stem_norm) == (
        1e-12,
        "after_pool",
        "timm",
    )
    assert TrainConfig().model_config(10).gelu == "tanh"  # the official weights' form unless asked


@pytest.mark.parametrize("kind", ["json", "toml"])
def test_precedence_recipe_then_config_file_then_flags(tmp_path, kind):
    path = tmp_path / f"settings.{kind}"
    if kind == "json":
        path.write_text(
            json.dumps({"num_steps": 50, "learning_rate": 0.1, "adam_betas": [0.7, 0.8], "seed": 7})
        )
    else:
        path.write_text("num_steps = 50\nlearning_rate = 0.1\nadam_betas = [0.7, 0.8]\nseed = 7\n")
    argv = [
        "train",
        "--name",
        "p",
        "--recipe",
        "finetune-cifar10",
        "--config",
        str(path),
        "--learning_rate",
        "0.2",
    ]
    config = parse(argv)
    assert config.warmup_steps == 100 and config.train_batch_size == 512  # the recipe's, untouched
    assert config.num_steps == 50 and config.seed == 7  # the file over the recipe
    assert config.adam_betas == (0.7, 0.8)
    assert config.learning_rate == 0.2  # the flag over the file
    assert config.name == "p"
    # Without the file the recipe shows through; without the recipe, the defaults.
    assert parse(["train", "--name", "p", "--recipe", "finetune-cifar10"]).num_steps == 500
    bare = parse(["train", "--name", "p", "--config", str(path)])
    assert bare.num_steps == 50 and bare.warmup_steps == 500


def test_pretrained_auto_prefers_the_tutorials_checkpoint_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # The official ImageNet-21k file, by name (no download here)
    assert pretrained_source("auto", "ViT-B_16") == "ViT-B_16"
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "ViT-B_16.npz").write_bytes(b"")
    assert pretrained_source("auto", "ViT-B_16") == str(Path("checkpoint") / "ViT-B_16.npz")
    assert pretrained_source("none", "ViT-B_16") is None
    assert pretrained_source("None", "ViT-B_16") is None


# ---------------------------------------------------------------------------------------------
# 3. Gradient accumulation


def test_gradient_accumulation_equals_the_large_batch(tmp_path):
    data = make_image_folder(tmp_path / "data")
    states = {}
    for accum in (1, 4):
        config = tiny_config(
            tmp_path,
            f"accum{accum}",
            data,
            gradient_accumulation_steps=accum,
            num_steps=5,
            eval_every=5,
        )
        train(config)
        states[accum] = model_state(tmp_path / "output" / config.name / "last.pt")
    torch.manual_seed(42)  # the run's own initialisation, to show the runs moved the weights
    initial = VisionTransformer(tiny_config(tmp_path, "init", data).model_config(3)).state_dict()
    moved = max((states[1][k] - initial[k]).abs().max().item() for k in initial)
    assert moved > 1e-3
    bound = reordered_training_bound(tiny_config(tmp_path, "bound", data, num_steps=5))
    for key in states[1]:
        assert_within(states[4][key], states[1][key], bound(states[1][key]), key)


def memory_holding(monkeypatch, images: float) -> None:
    """This machine's memory, as `vitlab train` measures it, made to hold `images` images a micro-batch."""
    monkeypatch.setattr(
        runtime, "step_memory", lambda *a, **k: runtime.StepMemory(fixed=0, per_image=1)
    )
    monkeypatch.setattr(
        runtime, "available_memory", lambda device: runtime.Memory(images, "free", 1.0)
    )


def test_a_batch_that_does_not_fit_is_accumulated_to_the_same_update(tmp_path, monkeypatch, capsys):
    # 10 images where 4 fit: micro-batches of 4, 3 and 3, each loss weighted by its share of the batch
    data = make_image_folder(tmp_path / "data")
    states, lines = {}, {}
    for name, fits in (("whole", 100), ("split", 4.5)):
        memory_holding(monkeypatch, fits)
        capsys.readouterr()
        train(tiny_config(tmp_path, name, data, train_batch_size=10, num_steps=5, eval_every=5))
        lines[name] = [
            line for line in capsys.readouterr().out.splitlines() if line.startswith("batch ")
        ]
        checkpoint = read_checkpoint(tmp_path / "output" / name / "last.pt")
        states[name] = (checkpoint["model"], checkpoint["accumulation_steps"])
    assert lines["whole"] == [lines["whole"][0]] and lines["whole"][0].startswith(
        "batch 10 in one pass (it fits;"
    )
    assert lines["split"][0].startswith(
        "batch 10: 3 micro-batches of at most 4 images, accumulated (the whole batch would not fit;"
    )
    assert (states["whole"][1], states["split"][1]) == (1, 3)
    bound = reordered_training_bound(
        tiny_config(tmp_path, "bound", data, train_batch_size=10, num_steps=5)
    )
    for key, value in states["whole"][0].items():
        assert_within(states["split"][0][key], value, bound(value), key)


def test_resume_keeps_the_runs_micro_batches_where_they_fit(data_dir, monkeypatch, capsys):
    memory_holding(monkeypatch, 4)  # 8 images: 2 micro-batches of 4
    assert run_cli(base_argv(data_dir, "--num_steps", "2"), capsys)[0] == 0
    memory_holding(monkeypatch, 100)
    rc, out, err = run_cli(base_argv(data_dir, "--num_steps", "4", "--resume"), capsys)
    assert rc == 0, err
    assert "batch 8: 2 micro-batches of 4 images, accumulated (as the run resumed had it;" in out
    assert read_checkpoint(Path("output") / "x" / "last.pt")["accumulation_steps"] == 2
    memory_holding(monkeypatch, 2)
    rc, out, err = run_cli(base_argv(data_dir, "--num_steps", "6", "--resume"), capsys)
    assert rc == 0, err
    assert (
        "vitlab: warning: the run accumulated 2 micro-batches an update and goes on with 4 here: it will not be "
        "bit-exact with an uninterrupted run\n"
    ) in err
    assert read_checkpoint(Path("output") / "x" / "last.pt")["accumulation_steps"] == 4


def test_the_remaining_time_is_counted_from_the_end_of_the_first_step(monkeypatch, capsys):
    from tqdm import std

    clock = [1000.0]
    monkeypatch.setattr(std, "time", lambda: clock[0])  # tqdm's clock
    bar = runs.ProgressBar(TrainConfig(name="x", num_steps=11), 0, show=True)
    clock[0] += 30.0  # the first step, with its one-off set-up
    bar.update(1)
    bar.time_from_here()
    for _ in range(2):
        clock[0] += 2.0
        bar.update(1)
    shown = bar.format_meter(**bar.format_dict)
    bar.close()
    # 8 steps left at 2 s each (the first step's 30 s counted would have said 01:31), 34 s elapsed
    assert "3/11 [00:34<00:16,  2.00s/step" in shown


# ---------------------------------------------------------------------------------------------
# 4. Resume after a kill: bit-exact, and a kill while saving leaves last.pt whole

# Dropout stays at the variant's 0.1: the resumed RNG must match
RESUME_FLAGS = TINY_FLAGS + flags(
    dataset="imagefolder",
    data_dir="data",
    device="cpu",
    train_batch_size=8,
    num_steps=16,
    eval_every=2,
    log_every=1,
    warmup_steps=3,
    learning_rate=0.05,
    val_split=0.25,
    num_workers=0,
)

# Runs `vitlab train` with each step slowed down, so that the parent can kill it part-way.
SLOW_STEPS = """
import sys, time
import vitlab.train as t
real = t.set_learning_rate
def slow(*args):
    time.sleep(0.15)
    return real(*args)
t.set_learning_rate = slow
from vitlab.app.cli import main
sys.exit(main(sys.argv[1:]))
"""

# Runs `vitlab train` and, at step 4, writes the file "held" and waits for a file "release" in its working folder.
HOLD_AT_STEP_4 = """
import sys, time
from pathlib import Path
import vitlab.train as t
real = t.set_learning_rate
def hold(optimizer, config, step):
    if step == 4:
        Path("held").touch()
        while not Path("release").exists():
            time.sleep(0.05)
    return real(optimizer, config, step)
t.set_learning_rate = hold
from vitlab.app.cli import main
sys.exit(main(sys.argv[1:]))
"""

# Runs `vitlab train` and kills itself (SIGKILL) half-way through writing last.pt for the second time.
KILL_WHILE_SAVING = """
import os, signal, sys
real_fsync = os.fsync
saves = 0
def fsync(fd):
    global saves
    if ".last.pt." in os.readlink(f"/proc/self/fd/{fd}"):
        saves += 1
        if saves == 2:
            os.ftruncate(fd, os.fstat(fd).st_size // 2)
            os.kill(os.getpid(), signal.SIGKILL)
    real_fsync(fd)
os.fsync = fsync
from vitlab.app.cli import main
sys.exit(main(sys.argv[1:]))
"""


def train_subprocess(
    cwd: Path, args: list[str], code: str | None = None, **popen
) -> subprocess.Popen:
    head = [sys.executable, "-c", code] if code else [sys.executable, "-m", "vitlab.app.cli"]
    return subprocess.Popen(
        head + ["train", *args],
        cwd=cwd,
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=default_sigint,
        **popen,
    )


def default_sigint() -> None:
    """Ctrl-C's default in the run, as at a terminal: a suite started in the background (`make test &`, some CI runners)
    ignores SIGINT, and the run would inherit that and never stop when a test interrupts it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def finish(process: subprocess.Popen) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=SUBPROCESS_TIMEOUT)
    return process.returncode, out, err


@pytest.fixture(scope="module")
def resume_workdir(tmp_path_factory):
    """A folder with the data and the uninterrupted reference run `ref`."""
    work = tmp_path_factory.mktemp("resume")
    make_image_folder(work / "data")
    rc, _, err = finish(train_subprocess(work, ["--name", "ref", *RESUME_FLAGS]))
    assert rc == 0, err[-3000:]
    return work


def losses(run_dir: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["train/loss"]) for r in records if "train/loss" in r]


def assert_same_final_state(work: Path, name: str) -> None:
    ref, run = (
        read_checkpoint(work / "output" / "ref" / "last.pt"),
        read_checkpoint(work / "output" / name / "last.pt"),
    )
    assert run["step"] == ref["step"] == 16
    assert ref["model"].keys() == run["model"].keys()
    for key in ref["model"]:
        assert torch.equal(run["model"][key], ref["model"][key]), key
    assert run["best"] == ref["best"]
    # The log replays from the checkpoint
    assert losses(work / "output" / name) == losses(work / "output" / "ref")
    assert [s for s, _ in losses(work / "output" / name)] == list(range(1, 17))
    ref_final = json.loads((work / "output" / "ref" / "final_metrics.json").read_text())
    run_final = json.loads((work / "output" / name / "final_metrics.json").read_text())
    for key in ("best_val_accuracy", "best_step", "steps"):
        assert run_final[key] == ref_final[key], key


def test_resume_after_sigkill_is_bit_exact(resume_workdir):
    work = resume_workdir
    last = work / "output" / "run" / "last.pt"
    process = train_subprocess(work, ["--name", "run", *RESUME_FLAGS], code=SLOW_STEPS)
    deadline = time.monotonic() + SUBPROCESS_TIMEOUT
    while not last.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    rc, _, err = finish(process)
    assert rc == -signal.SIGKILL, (
        f"the run ended before it could be killed (rc {rc}):\n{err[-3000:]}"
    )
    killed_at = read_checkpoint(last)["step"]
    assert 2 <= killed_at < 16
    assert not (work / "output" / "run" / "final_metrics.json").exists()

    rc, out, err = finish(train_subprocess(work, ["--name", "run", *RESUME_FLAGS, "--resume"]))
    assert rc == 0, err[-3000:]
    assert f"resuming from step {killed_at}" in out
    assert_same_final_state(work, "run")


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_or_ctrl_c_saves_at_the_step_boundary_and_resume_is_bit_exact(resume_workdir, how):
    # What SLURM and Kubernetes send before they preempt a job, to a real process: the step in progress ends, last.pt
    # is written at that step (not the last evaluation's), one line says so, and the exit status is 128 + the signal.
    work, name = resume_workdir, f"stop-{how.name.lower()}"
    process = train_subprocess(
        work, ["--name", name, *RESUME_FLAGS, "--eval_every", "5"], code=SLOW_STEPS
    )
    wait_for(work / "output" / name / "metrics.jsonl", process)
    deadline = time.monotonic() + SUBPROCESS_TIMEOUT
    while (
        len(losses(work / "output" / name)) < 6
        and process.poll() is None
        and time.monotonic() < deadline
    ):
        time.sleep(0.01)
    process.send_signal(how)
    rc, _, err = finish(process)
    assert rc == 128 + how, f"the run ended before it could be stopped (rc {rc}):\n{err[-3000:]}"
    stopped_at = read_checkpoint(work / "output" / name / "last.pt")["step"]
    # Saved at the signal's step, not at an evaluation
    assert 6 <= stopped_at < 16 and stopped_at % 5, stopped_at
    last = [line for line in err.splitlines() if line.strip()][-1]
    assert last == (
        f"vitlab train: stopped by {how.name} at step {stopped_at}; saved {Path('output') / name / 'last.pt'}: "
        "--resume continues the run"
    )
    rc, out, err = finish(
        train_subprocess(work, ["--name", name, *RESUME_FLAGS, "--eval_every", "5", "--resume"])
    )
    assert rc == 0, err[-3000:]
    assert f"resuming from step {stopped_at}" in out
    ref, run = (
        read_checkpoint(work / "output" / "ref" / "last.pt"),
        read_checkpoint(work / "output" / name / "last.pt"),
    )
    for key in ref["model"]:
        assert torch.equal(run["model"][key], ref["model"][key]), key
    assert losses(work / "output" / name) == losses(work / "output" / "ref")


def test_kill_while_saving_leaves_last_pt_whole(resume_workdir):
    work = resume_workdir
    out_dir = work / "output" / "run2"
    rc, _, err = finish(
        train_subprocess(work, ["--name", "run2", *RESUME_FLAGS], code=KILL_WHILE_SAVING)
    )
    assert rc == -signal.SIGKILL, err[-3000:]
    strays = sorted(out_dir.glob(".last.pt.*"))
    assert len(strays) == 1  # the half-written temporary file ...
    with pytest.raises(CheckpointError):
        read_checkpoint(strays[0])
    state = read_checkpoint(out_dir / "last.pt")  # ... while last.pt is the previous, complete one
    assert state["step"] == 2
    assert read_checkpoint(out_dir / "best.pt")["step"] in (2, 4)

    rc, out, err = finish(
        train_subprocess(work, ["--name", "run2", *RESUME_FLAGS, "--resume", "output/run2/last.pt"])
    )
    assert rc == 0, err[-3000:]
    assert "resuming from step 2" in out
    assert_same_final_state(work, "run2")
    assert {p.name for p in out_dir.iterdir() if not p.name.startswith(".")} == RUN_FILES - {
        ".lock"
    }


def wait_for(path: Path, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + SUBPROCESS_TIMEOUT
    while not path.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)


def make_mixed_size_folder(root: Path) -> Path:
    """An image folder whose images differ in size: it streams through DataLoader workers, as a large one does."""
    make_image_folder(root)
    for i, name in enumerate(CLASSES):
        Image.fromarray(np.full((20 + i, 18, 3), 40 * i, dtype=np.uint8)).save(
            root / name / "odd.png"
        )
    return root


@pytest.fixture(scope="module")
def streaming_workdir(tmp_path_factory):
    """A mixed-size folder (the streaming path) and, per worker count, the uninterrupted reference run."""
    work = tmp_path_factory.mktemp("streaming")
    make_mixed_size_folder(work / "data")
    for workers in (0, 2):
        rc, _, err = finish(
            train_subprocess(
                work, ["--name", f"ref{workers}", *RESUME_FLAGS, "--num_workers", str(workers)]
            )
        )
        assert rc == 0, err[-3000:]
    return work


@pytest.mark.parametrize("workers, how", [(0, signal.SIGKILL), (2, signal.SIGINT)])
def test_resume_on_the_streaming_path_is_bit_exact(streaming_workdir, workers, how):
    # Images of mixed sizes stream through DataLoader workers; dropout is on (0.1), so a resumed run that drew one
    # random number more or less than the uninterrupted one would differ.
    work, name = streaming_workdir, f"{how.name.lower()}{workers}"
    argv = ["--name", name, *RESUME_FLAGS, "--num_workers", str(workers)]
    process = train_subprocess(work, argv, code=SLOW_STEPS)
    wait_for(work / "output" / name / "last.pt", process)
    process.send_signal(how)
    rc, _, err = finish(process)
    assert rc == (130 if how == signal.SIGINT else -signal.SIGKILL), (
        f"the run ended before it could be stopped (rc {rc}):\n{err[-3000:]}"
    )
    killed_at = read_checkpoint(work / "output" / name / "last.pt")["step"]
    assert 2 <= killed_at < 16
    rc, out, err = finish(train_subprocess(work, [*argv, "--resume"]))
    assert rc == 0, err[-3000:]
    assert f"resuming from step {killed_at}" in out
    ref, run = (
        read_checkpoint(work / "output" / f"ref{workers}" / "last.pt"),
        read_checkpoint(work / "output" / name / "last.pt"),
    )
    for key in ref["model"]:
        assert torch.equal(run["model"][key], ref["model"][key]), key
    assert losses(work / "output" / name) == losses(work / "output" / f"ref{workers}")


# ---------------------------------------------------------------------------------------------
# 4b. A run directory belongs to one run: no second live run, no finished run replaced by mistake


def digests(run_dir: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(run_dir.iterdir())
        if p.name != ".lock"
    }


@pytest.mark.parametrize("finished", [True, False])
def test_a_new_run_over_an_existing_one_is_refused_and_leaves_it_whole(data_dir, capsys, finished):
    # Finished, or interrupted and then started again without --resume: either way its files must survive.
    argv = base_argv(data_dir, "--num_steps", "4", "--eval_every", "2")
    assert run_cli(argv, capsys)[0] == 0
    if not finished:  # as a run killed after its last checkpoint leaves it
        (Path("output") / "x" / "final_metrics.json").unlink()
    before = digests(Path("output") / "x")
    rc, _, err = run_cli(argv, capsys)
    assert rc == 2
    line = one_error_line(err)
    assert "output/x holds a run" in line and "--resume" in line and "--overwrite" in line
    assert digests(Path("output") / "x") == before


def test_overwrite_moves_the_earlier_run_aside(data_dir, capsys):
    argv = base_argv(data_dir, "--num_steps", "2")
    assert run_cli(argv, capsys)[0] == 0
    before = digests(Path("output") / "x")
    rc, out, err = run_cli([*argv, "--overwrite", "--seed", "7"], capsys)
    assert rc == 0, err
    aside = [p for p in Path("output").iterdir() if p.name.startswith("x.replaced-")]
    assert len(aside) == 1 and digests(aside[0]) == before
    assert (Path("logs") / aside[0].name).is_dir()  # its TensorBoard logs went with it
    assert json.loads((Path("output") / "x" / "config.json").read_text())["seed"] == 7
    assert "moved the earlier run's" in out


def test_a_second_live_run_on_the_same_name_is_refused(tmp_path):
    # Two real processes: the first holds output/<name> while it runs; the second is refused at once, in one line,
    # and the first's outputs are its own (its metrics not interleaved with another's, its checkpoints not deleted).
    make_image_folder(tmp_path / "data")
    first = train_subprocess(tmp_path, ["--name", "same", *RESUME_FLAGS], code=HOLD_AT_STEP_4)
    wait_for(tmp_path / "held", first)
    second = finish(train_subprocess(tmp_path, ["--name", "same", *RESUME_FLAGS, "--seed", "3"]))
    (tmp_path / "release").touch()
    rc, _, err = finish(first)
    assert rc == 0, err[-3000:]
    assert second[0] == 2
    line = one_error_line(second[2])
    assert "output/same is in use by a run still going (process" in line
    steps = [s for s, _ in losses(tmp_path / "output" / "same")]
    assert steps == list(range(1, 17))
    assert json.loads((tmp_path / "output" / "same" / "config.json").read_text())["seed"] == 42


@pytest.mark.parametrize(
    "change, named",
    [
        (["--seed", "7"], "--seed 42, this one 7"),
        (["--train_batch_size", "4"], "--train_batch_size 8"),
        (["--learning_rate", "0.1"], "--learning_rate 0.05, this one 0.1"),
        (["--patch_drop_rate", "0.25"], "--patch_drop_rate the variant's, this one 0.25"),
        (["--precision", "bf16"], "--precision fp32, this one bf16"),
        (["--precision", "auto"], "--precision fp32, this one auto"),
    ],
)
def test_resume_with_a_setting_that_changes_the_run_is_refused(data_dir, capsys, change, named):
    argv = base_argv(
        data_dir, "--num_steps", "4", "--eval_every", "2", "--learning_rate", "0.05", "--seed", "42"
    )
    assert run_cli([*argv, "--num_steps", "2"], capsys)[0] == 0
    rc, _, err = run_cli([*argv, "--resume", *change], capsys)
    assert rc == 2
    # On a CPU that emulates bf16 (AVX2) asking for it also warns, a line of its own, first
    emulated = "vitlab: warning: bf16 is emulated"
    assert named in one_error_line("".join(ln for ln in err.splitlines(True) if emulated not in ln))


@pytest.mark.parametrize("change", ["relabelled", "added", "moved"])
def test_resume_on_other_images_or_labels_is_refused_and_a_moved_folder_goes_on(
    data_dir, capsys, change
):
    assert run_cli(base_argv(data_dir, "--num_steps", "2"), capsys)[0] == 0
    classes = sorted(p for p in data_dir.iterdir() if p.is_dir())
    image = sorted(classes[0].iterdir())[0]
    if change == "relabelled":  # an image moved to another class
        image.rename(classes[1] / f"{classes[0].name}_{image.name}")
    elif change == "added":
        (classes[0] / "new.png").write_bytes(image.read_bytes())
    else:
        data_dir = data_dir.rename(data_dir.with_name("moved"))
    before = (Path("output") / "x" / "last.pt").read_bytes()
    rc, _, err = run_cli(base_argv(data_dir, "--num_steps", "4", "--resume"), capsys)
    if change == "moved":
        assert rc == 0, err
        return
    assert rc == 2
    assert "its run trained on other images or labels" in one_error_line(err)
    assert (Path("output") / "x" / "last.pt").read_bytes() == before


def test_a_corrupt_checkpoint_is_refused_for_fine_tuning_and_resuming(data_dir, capsys):
    from test_checkpoints import flip_bytes_in_largest_tensor

    assert run_cli(base_argv(data_dir, "--num_steps", "2"), capsys)[0] == 0
    last = Path("output") / "x" / "last.pt"
    flip_bytes_in_largest_tensor(last)
    for argv in (
        base_argv(data_dir, "--resume", name="x"),
        base_argv(data_dir, "--pretrained_dir", str(last), name="y"),
    ):
        rc, _, err = run_cli(argv, capsys)
        assert rc == 1
        assert f"{last}: corrupt:" in one_error_line(err)


def test_resume_with_more_steps_warns_in_one_line_and_goes_on(data_dir, capsys):
    argv = base_argv(data_dir, "--eval_every", "2")
    assert run_cli([*argv, "--num_steps", "2"], capsys)[0] == 0
    rc, out, err = run_cli([*argv, "--num_steps", "4", "--resume"], capsys)
    assert rc == 0, err
    warning = [line for line in err.splitlines() if line.startswith("vitlab: warning:")]
    assert warning == [
        "vitlab: warning: --num_steps 4: the run was set for 2 steps; the schedule is recomputed for the new length "
        "from step 2 on"
    ]
    assert read_checkpoint(Path("output") / "x" / "last.pt")["step"] == 4


# ---------------------------------------------------------------------------------------------
# 4c. The training kit: EMA, and resume with every option on

KIT_FLAGS = [
    "--randaugment",
    "2,9",
    "--mixup",
    "0.8",
    "--cutmix",
    "1.0",
    "--random_erasing",
    "0.25",
    "--drop_path",
    "0.1",
    "--ema",
    "0.9",
    "--layer_decay",
    "0.75",
    "--label_smoothing",
    "0.1",
]


def test_ema_with_decay_0_is_the_weights_and_is_what_evaluation_and_the_commands_use(
    data_dir, capsys
):
    assert (
        run_cli(
            base_argv(data_dir, "--num_steps", "3", "--eval_every", "3", "--ema", "1e-12"), capsys
        )[0]
        == 0
    )
    last = read_checkpoint(Path("output") / "x" / "last.pt")
    for key, value in last["model"].items():
        # ema = d ema + (1 - d) w with d = 1e-12: w to one rounding, and d ema beside it
        assert_within(
            last["ema"][key],
            value,
            ulps(value, torch.float32) + 1e-12 * last["ema"][key].abs(),
            key,
        )
    assert (
        run_cli(
            base_argv(data_dir, "--num_steps", "3", "--eval_every", "3", "--ema", "0.9", name="y"),
            capsys,
        )[0]
        == 0
    )
    best = read_checkpoint(Path("output") / "y" / "best.pt")
    assert any(not torch.equal(best["ema"][k], best["model"][k]) for k in best["model"])
    model, _ = checkpoints.load_model(Path("output") / "y" / "best.pt")
    # The weights evaluation chose it by
    assert all(torch.equal(v, best["ema"][k]) for k, v in model.state_dict().items())


def test_resume_with_every_option_of_the_kit_is_bit_exact(tmp_path):
    make_image_folder(tmp_path / "data")
    argv = [*RESUME_FLAGS, *KIT_FLAGS]
    rc, _, err = finish(train_subprocess(tmp_path, ["--name", "ref", *argv]))
    assert rc == 0, err[-3000:]
    process = train_subprocess(tmp_path, ["--name", "run", *argv], code=SLOW_STEPS)
    wait_for(tmp_path / "output" / "run" / "last.pt", process)
    process.send_signal(signal.SIGKILL)
    assert finish(process)[0] == -signal.SIGKILL
    rc, _, err = finish(train_subprocess(tmp_path, ["--name", "run", *argv, "--resume"]))
    assert rc == 0, err[-3000:]
    ref, run = (
        read_checkpoint(tmp_path / "output" / "ref" / "last.pt"),
        read_checkpoint(tmp_path / "output" / "run" / "last.pt"),
    )
    for part in ("model", "ema"):
        for key in ref[part]:
            assert torch.equal(run[part][key], ref[part][key]), (part, key)
    assert losses(tmp_path / "output" / "run") == losses(tmp_path / "output" / "ref")


# ---------------------------------------------------------------------------------------------
# 5. Two processes over gloo equal one process at the same total batch


@pytest.fixture(scope="module")
def gloo_runs(tmp_path_factory):
    """The same run as one process (in this process) and as two gloo processes with 2 accumulation steps
    each (`torchrun --standalone --nproc_per_node 2 -m vitlab.app.cli train ...`), total batch 8 in both."""
    tmp_path = tmp_path_factory.mktemp("gloo")
    data = make_image_folder(tmp_path / "data")
    common = dict(
        num_steps=6,
        eval_every=3,
        warmup_steps=2,
        learning_rate=0.05,
        val_split=0.25,
        dropout_rate=0.0,
        log_every=1,
    )
    single_final = train(tiny_config(tmp_path, "single", data, **common))
    args = TINY_FLAGS + flags(
        name="dist",
        dataset="imagefolder",
        data_dir=str(data),
        device="cpu",
        train_batch_size=8,
        gradient_accumulation_steps=2,
        num_workers=0,
        output_dir=str(tmp_path / "output"),
        log_dir=str(tmp_path / "logs"),
        **common,
    )
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "vitlab.app.cli",
        "train",
        *args,
    ]
    work = tmp_path / "cwd"
    work.mkdir()
    result = subprocess.run(
        command,
        check=False,
        cwd=work,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
    )
    return SimpleNamespace(root=tmp_path, work=work, result=result, single_final=single_final)


def test_two_process_gloo_run_exits_cleanly(gloo_runs):
    result = gloo_runs.result
    assert result.returncode == 0, result.stderr[-4000:]


def test_two_process_gloo_run_equals_one_process(gloo_runs):
    out = gloo_runs.root / "output"
    assert (out / "dist" / "final_metrics.json").exists(), gloo_runs.result.stderr[-4000:]
    dist_state, single_state = (
        model_state(out / "dist" / "last.pt"),
        model_state(out / "single" / "last.pt"),
    )
    assert dist_state.keys() == single_state.keys()
    bound = reordered_training_bound(
        tiny_config(gloo_runs.root, "bound", gloo_runs.root, num_steps=6, learning_rate=0.05)
    )
    for key in single_state:
        assert_within(dist_state[key], single_state[key], bound(single_state[key]), key)
    dist_final = json.loads((out / "dist" / "final_metrics.json").read_text())
    assert dist_final["best_val_accuracy"] == pytest.approx(
        gloo_runs.single_final["best_val_accuracy"]
    )
    assert (
        dist_final["best_step"] == gloo_runs.single_final["best_step"] and dist_final["steps"] == 6
    )
    # Only rank 0 writes: one set of run files, one event file, nothing in the working folder.
    assert {p.name for p in (out / "dist").iterdir()} == RUN_FILES
    assert [p.name for p in (gloo_runs.root / "logs" / "dist").iterdir() if p.name != ".lock"][
        0
    ].startswith("events.out.tfevents")
    # And the lock, held while the run runs
    assert len(list((gloo_runs.root / "logs" / "dist").iterdir())) == 2
    assert list(gloo_runs.work.iterdir()) == []
    # One record per step, not one per process
    assert [s for s, _ in losses(out / "dist")] == list(range(1, 7))


def test_two_process_gloo_run_logs_the_loss_of_the_whole_batch(gloo_runs):
    # train/loss is the loss of the global batch, as with one process, not rank 0's share of it.
    out = gloo_runs.root / "output"
    dist_losses, single_losses = losses(out / "dist"), losses(out / "single")
    assert [s for s, _ in dist_losses] == [s for s, _ in single_losses] == list(range(1, 7))
    assert [v for _, v in dist_losses] == pytest.approx(
        [v for _, v in single_losses], rel=1e-5, abs=1e-6
    )


# ---------------------------------------------------------------------------------------------
# 6. Image folders through the training command


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return make_image_folder(tmp_path / "data")


def base_argv(data: Path, *extra: str, name: str | None = "x") -> list[str]:
    argv = ["train"] + (["--name", name] if name else [])
    argv += [
        "--dataset",
        "imagefolder",
        "--data_dir",
        str(data),
        *TINY_FLAGS,
        "--device",
        "cpu",
        "--num_steps",
        "2",
        "--eval_every",
        "2",
        "--train_batch_size",
        "8",
        "--val_split",
        "0.25",
        "--num_workers",
        "0",
    ]
    return argv + list(extra)


def test_cli_names_a_file_that_is_not_an_image(data_dir, capsys):
    bogus = data_dir / "dog" / "zz_bogus.jpg"
    bogus.write_bytes(np.random.default_rng(1).integers(0, 256, 500, dtype=np.uint8).tobytes())
    rc, _, err = run_cli(base_argv(data_dir), capsys)
    assert rc != 0
    line = one_error_line(err)
    assert str(bogus) in line and "not a readable image" in line


def test_resume_with_another_head_count_is_refused(data_dir, capsys):
    # A run resumed with other heads would load its weights cleanly (same shapes) and train another function.
    assert run_cli(base_argv(data_dir, "--num_heads", "1"), capsys)[0] == 0
    rc, _, err = run_cli(
        base_argv(data_dir, "--num_heads", "2", "--num_steps", "4", "--resume"), capsys
    )
    assert rc != 0
    assert "trained with --num_heads 1" in one_error_line(err)


def test_from_scratch_recipe_trains(tmp_path, monkeypatch, capsys):
    # The CPU recipe whole (Muon, mimetic init, patch dropout, precision auto, pad-crop) for two steps on 32 px images.
    monkeypatch.chdir(tmp_path)
    make_image_folder(tmp_path / "data", size=32)
    rc, out, err = run_cli(
        [
            "train",
            "--recipe",
            "scratch-cifar10-cpu",
            "--name",
            "scratch",
            "--dataset",
            "imagefolder",
            "--data_dir",
            "data",
            "--device",
            "cpu",
            "--num_steps",
            "2",
            "--warmup_steps",
            "1",
            "--eval_every",
            "2",
            "--train_batch_size",
            "8",
            "--eval_batch_size",
            "9",
            "--val_split",
            "0.25",
        ],
        capsys,
    )
    assert rc == 0, err
    config = json.loads((tmp_path / "output" / "scratch" / "config.json").read_text())
    assert (config["optimizer"], config["model"]["attention_init"], config["precision"]) == (
        "muon",
        "mimetic",
        "auto",
    )
    native = fastpaths.native_bf16(torch.device("cpu"))
    # Auto: bf16 only where it is native
    assert f"device cpu, precision {'bf16' if native else 'fp32'} (auto: " in out
    state = read_checkpoint(tmp_path / "output" / "scratch" / "last.pt")
    assert set(state["optimizer"]) == {"muon", "adamw"} and state["step"] == 2


def test_train_runs_auto_precision_by_default_and_says_so_in_its_first_lines(data_dir, capsys):
    argv = base_argv(data_dir, name="default")
    del argv[
        argv.index("--precision") : argv.index("--precision") + 2
    ]  # TINY's fp32 out: the default
    rc, out, err = run_cli(argv, capsys)
    assert rc == 0, err
    native = fastpaths.native_bf16(torch.device("cpu"))
    why = "bf16 runs natively here" if native else "bf16 is not native here"
    first = f"device cpu, precision {'bf16' if native else 'fp32'} (auto: {why}; --precision fp32 computes as the tutorial did)"
    lines = out.splitlines()
    at = lines.index(first)
    assert lines[at + 1].startswith("batch 8 in one pass (it fits; a step needs about ")
    assert lines[at + 2].startswith("fast paths: ")
    assert json.loads(Path("output/default/config.json").read_text())["precision"] == "auto"
    assert read_checkpoint(Path("output/default/last.pt"))["precision"] == (
        "bf16" if native else "fp32"
    )
    rc, out, err = run_cli(base_argv(data_dir, "--precision", "fp32", name="fp32"), capsys)
    assert rc == 0, err
    assert "device cpu, precision fp32" in out.splitlines()


def test_resume_with_another_optimizer_is_refused(data_dir, capsys):
    assert run_cli(base_argv(data_dir, "--optimizer", "muon"), capsys)[0] == 0
    rc, _, err = run_cli(
        base_argv(data_dir, "--optimizer", "adamw", "--num_steps", "4", "--resume"), capsys
    )
    assert rc != 0
    assert "used --optimizer muon, this one adamw" in one_error_line(err)


def test_cli_refuses_an_empty_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    rc, _, err = run_cli(base_argv(tmp_path / "empty"), capsys)
    assert rc != 0
    assert "no class folders" in one_error_line(err)


def test_training_on_a_folder_of_mixed_modes_and_formats(tmp_path):
    data = make_image_folder(tmp_path / "data", per_class=4)
    rng = np.random.default_rng(5)
    Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8), mode="L").save(
        data / "cat" / "gray.png"
    )
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).convert("P").save(
        data / "dog" / "palette.png"
    )
    Image.fromarray(rng.integers(0, 256, (16, 16, 4), dtype=np.uint8), mode="RGBA").save(
        data / "eel" / "alpha.png"
    )
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(
        data / "eel" / "photo.jpeg"
    )
    final = train(tiny_config(tmp_path, "modes", data, num_steps=2, eval_every=2))
    assert final["steps"] == 2
    assert read_checkpoint(tmp_path / "output" / "modes" / "last.pt")["class_names"] == CLASSES


# ---------------------------------------------------------------------------------------------
# 7. Every refused input: a non-zero exit and one line on stderr naming the problem

REFUSALS = {
    "missing-name": (["--name", None], "--name is required"),
    "bad-decay-type": (["--decay_type", "exponential"], "decay_type"),
    "batch-not-divisible": (
        ["--train_batch_size", "10", "--gradient_accumulation_steps", "4"],
        "--train_batch_size 10",
    ),
    "unknown-model": (["--model_type", "ViT-Q_99"], "ViT-Q_99"),
    "missing-pretrained": (["--pretrained_dir", "nowhere/ViT-B_16.npz"], "nowhere/ViT-B_16.npz"),
    "fp16-opt-level-O3": (["--fp16_opt_level", "O3"], "O3"),
    "val-split-1.5": (["--val_split", "1.5"], "--val_split"),
    "resume-missing-file": (["--resume", "gone/last.pt"], "gone/last.pt"),
    "resume-without-last": (["--resume"], str(Path("output") / "x" / "last.pt")),
    "missing-data-dir": (["--data_dir", "no_such_data"], "no_such_data"),
    "not-a-number": (["--num_steps", "ten"], "--num_steps"),
    "unknown-flag": (["--nmu_steps", "5"], "--nmu_steps"),
    "missing-config": (["--config", "nope.json"], "nope.json"),
    "bad-optimizer-setting-in-config": (["--config", "{unknown}"], "unknown settings"),
    "corrupt-json-config": (["--config", "{json}"], "not valid JSON"),
    "corrupt-toml-config": (["--config", "{toml}"], "not valid TOML"),
    "config-not-a-table": (["--config", "{list}"], "expected a table"),
    "wrong-type-in-config": (["--config", "{string}"], "label_smoothing must be float"),
    "log-every-0": (["--log_every", "0"], "--log_every must be positive"),
    "label-smoothing-2": (["--label_smoothing", "2"], "--label_smoothing must be in [0, 1)"),
    "img-size-not-a-multiple-of-the-patch": (
        ["--img_size", "30"],
        "img_size 30 is not a multiple of patch_size 4: the last 2 rows",
    ),
    "resume-and-overwrite": (["--resume", "--overwrite"], "pass one"),
    "randaugment-not-n-m": (["--randaugment", "two"], "--randaugment 'two': expected N,M"),
    "randaugment-magnitude-31": (["--randaugment", "2,31"], "M in 0..30"),
    "mixup-on-an-odd-micro-batch": (["--mixup", "0.2", "--train_batch_size", "9"], "must be even"),
    "ema-1": (["--ema", "1"], "--ema must be in [0, 1)"),
    "layer-decay-0": (["--layer_decay", "0"], "--layer_decay must be in (0, 1]"),
    "freeze-what": (["--freeze", "everything"], "everything"),
    "dropout-2": (["--dropout_rate", "2.0"], "dropout_rate must be in [0, 1), got 2.0"),
    "attention-dropout-negative": (
        ["--attention_dropout_rate", "-0.1"],
        "attention_dropout_rate must be in [0, 1), got -0.1",
    ),
    "adam-betas-over-1": (
        ["--optimizer", "adamw", "--adam_betas", "0.9", "5"],
        "--adam_betas must be in [0, 1), got (0.9, 5.0)",
    ),
    "momentum-1": (["--momentum", "1"], "--momentum must be in [0, 1), got 1.0"),
    "dropout-2-in-a-config-file": (
        ["--config", "{dropout}"],
        "dropout_rate must be in [0, 1), got 2",
    ),
    "num-workers-negative": (["--num_workers", "-1"], "--num_workers must be 0 or more, got -1"),
}
# The exit status: 2 for a bad flag or setting (as argparse's own refusals), 1 for a file or folder that cannot be used.
FILE_REFUSALS = {
    "missing-pretrained",
    "resume-missing-file",
    "resume-without-last",
    "missing-data-dir",
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refused_input_gives_one_clear_line(case, data_dir, capsys):
    extra, expected = REFUSALS[case]
    files = {
        "{json}": ("bad.json", '{"num_steps": 5,'),
        "{toml}": ("bad.toml", "num_steps = = 5\n"),
        "{list}": ("list.json", "[1, 2]"),
        "{unknown}": ("unknown.json", '{"nmu_steps": 5}'),
        "{string}": ("string.json", '{"label_smoothing": "high"}'),
        "{dropout}": ("dropout.json", '{"dropout_rate": 2}'),
    }
    extra = list(extra)
    for i, value in enumerate(extra):
        if value in files:
            filename, text = files[value]
            (data_dir.parent / filename).write_text(text)
            extra[i] = filename
    if case == "missing-name":
        argv = base_argv(data_dir, name=None)
    else:
        argv = base_argv(data_dir, *extra)
    rc, _, err = run_cli(argv, capsys)
    assert rc == (1 if case in FILE_REFUSALS else 2)
    line = one_error_line(err)
    assert expected in line
    if case.startswith("corrupt") or case in ("missing-config", "config-not-a-table"):
        assert extra[1] in line  # the file is named


def test_every_setting_is_checked_against_its_range_in_the_python_api_too():
    with pytest.raises(ConfigError, match=r"dropout_rate must be in \[0, 1\), got 2.0"):
        ModelConfig(dropout_rate=2.0)
    with pytest.raises(ConfigError, match=r"--adam_betas must be in \[0, 1\), got \(0.9, 5\)"):
        TrainConfig(name="x", adam_betas=(0.9, 5)).validate()
    with pytest.raises(ConfigError, match="--eval_batch_size must be positive, got 0"):
        TrainConfig(name="x", eval_batch_size=0).validate()
    # Each range is declared once, beside its default: every numeric field of both configs has one.
    for cls in (ModelConfig, TrainConfig):
        numeric = [
            f
            for f in dataclasses.fields(cls)
            if field_type(cls, f.name)[0] in (int, float) or float in field_type(cls, f.name)[1]
        ]
        assert [f.name for f in numeric if f.metadata.get("valid") is None] == []


@pytest.mark.parametrize("name", ["../escape", "/abs/path", ".", "..", "team/run1"])
def test_a_run_name_is_one_folder_name_checked_before_anything_is_written(
    name, tmp_path, monkeypatch, capsys
):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    data = make_image_folder(tmp_path / "data")
    # Another run's folder, which "." would have moved aside
    (work / "output" / "other").mkdir(parents=True)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    rc, _, err = run_cli(base_argv(data, "--overwrite", name=name), capsys)
    assert rc == 2
    assert "a run's name is one folder name" in one_error_line(err)
    # Nothing written, nothing moved
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_the_log_folder_is_the_runs_too(tmp_path):
    # Two runs of one name under different --output_dir share logs/<name>: the second is refused while the first runs,
    # with or without --overwrite (which would move the live run's logs aside), and the first's logs are its own.
    make_image_folder(tmp_path / "data")
    first = train_subprocess(
        tmp_path, ["--name", "same", *RESUME_FLAGS, "--output_dir", "out1"], code=HOLD_AT_STEP_4
    )
    wait_for(tmp_path / "held", first)
    refused = [
        finish(
            train_subprocess(
                tmp_path, ["--name", "same", *RESUME_FLAGS, "--output_dir", "out2", *extra]
            )
        )
        for extra in ([], ["--overwrite"])
    ]
    (tmp_path / "release").touch()
    rc, _, err = finish(first)
    assert rc == 0, err[-3000:]
    for rc, _, err in refused:
        assert rc == 2
        assert "logs/same is in use by a run still going" in one_error_line(err)
    assert not (tmp_path / "out2" / "same" / "config.json").exists()
    assert [p.name for p in (tmp_path / "logs").iterdir()] == ["same"]  # nothing moved aside
    steps = sorted({step for step, _ in read_events(tmp_path / "logs" / "same")["train/loss"]})
    assert steps == list(range(1, 17))  # one run's records, each once


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_fp16_on_a_cpu_only_machine_is_refused(data_dir, capsys):
    for extra in (["--fp16"], ["--fp16", "--device", "auto"], ["--precision", "fp16"]):
        rc, _, err = run_cli(base_argv(data_dir, *extra), capsys)
        assert rc not in (0, None)
        line = one_error_line(err)
        assert "fp16" in line and "CUDA" in line
    with pytest.raises(ConfigError, match="CUDA"):
        train(dataclasses.replace(parse(base_argv(data_dir)), fp16=True))


# ---------------------------------------------------------------------------------------------
# 8. A non-finite loss stops the run; the last good checkpoint is kept


def test_nan_loss_stops_the_run_and_keeps_the_last_checkpoint(data_dir, capsys, monkeypatch):
    real_criterion, calls = vtrain.criterion, {"n": 0}

    def criterion(*args):  # the training loss only (losses.py's seam); evaluation has its own
        loss_of = real_criterion(*args)

        def nan_at_the_sixth_step(*inputs):
            calls["n"] += 1
            loss = loss_of(*inputs)
            return loss * float("nan") if calls["n"] == 6 else loss

        return nan_at_the_sixth_step

    saved = {}
    real_save = checkpoints.save_training_checkpoint

    def save_training_checkpoint(path, model, *args):
        real_save(path, model, *args)
        if Path(path).name == "last.pt":
            saved[read_checkpoint(path)["step"]] = (
                hashlib.sha256(Path(path).read_bytes()).hexdigest(),
                {k: v.clone() for k, v in model.state_dict().items()},
            )

    monkeypatch.setattr(vtrain, "criterion", criterion)
    monkeypatch.setattr(checkpoints, "save_training_checkpoint", save_training_checkpoint)
    rc, _, err = run_cli(base_argv(data_dir, "--num_steps", "10", "--eval_every", "4"), capsys)
    assert rc not in (0, None)
    last = Path("output") / "x" / "last.pt"
    message = f"vitlab train: error: loss is nan at step 6; stopped, the last good checkpoint {last} (step 4) is kept"
    assert message in err
    assert list(saved) == [4]
    digest, model = saved[4]
    assert hashlib.sha256(last.read_bytes()).hexdigest() == digest
    state = read_checkpoint(last)
    assert state["step"] == 4
    assert all(torch.equal(state["model"][k], model[k]) for k in model)
    assert not (Path("output") / "x" / "final_metrics.json").exists()
    # The message stands on its own line, the last one: not glued to the progress bar, nor followed by it.
    lines = [line for line in err.splitlines() if line.strip()]
    assert message in lines, "the error shares its line with the progress bar"
    assert lines[-1] == message, f"stderr goes on after the error: {lines[-1]!r}"


def test_diverging_run_keeps_a_finite_checkpoint(tmp_path, monkeypatch):
    """Weights that blow up in an update (here: the third SGD step leaves one at infinity, which a learning rate far
    too large does at a step that depends on the torch version): the run must stop, and the checkpoint it calls
    'the last good checkpoint' must hold finite weights."""
    real_step, calls = torch.optim.SGD.step, {"n": 0}

    def step(self, *args, **kwargs):
        result = real_step(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("inf")
        return result

    monkeypatch.setattr(torch.optim.SGD, "step", step)
    data = make_image_folder(tmp_path / "data")
    config = tiny_config(
        tmp_path, "diverge", data, max_grad_norm=0.0, warmup_steps=0, num_steps=30, eval_every=1
    )
    with pytest.raises(
        TrainingError,
        match="weights became non-finite at step 3; stopped, the last good checkpoint .* [(]step 2[)] is kept",
    ):
        train(config)
    state = read_checkpoint(tmp_path / "output" / "diverge" / "last.pt")
    bad = [k for k, v in state["model"].items() if not torch.isfinite(v).all()]
    assert state["step"] == 2 and not bad, (
        f"last.pt (step {state['step']}) holds non-finite weights: {bad}"
    )


def test_a_run_that_goes_non_finite_before_its_first_checkpoint_names_no_file(
    tmp_path, monkeypatch
):
    real_step = torch.optim.SGD.step

    def step(self, *args, **kwargs):
        result = real_step(self, *args, **kwargs)
        with torch.no_grad():
            self.param_groups[0]["params"][0].view(-1)[0] = float("nan")
        return result

    monkeypatch.setattr(torch.optim.SGD, "step", step)
    data = make_image_folder(tmp_path / "data")
    config = tiny_config(tmp_path, "nan", data, num_steps=6, eval_every=3)
    with pytest.raises(TrainingError) as raised:
        train(config)
    assert "no checkpoint was saved before it" in str(raised.value) and "last.pt" not in str(
        raised.value
    )
    assert not (tmp_path / "output" / "nan" / "last.pt").exists()


# ---------------------------------------------------------------------------------------------
# 9. The run's outputs


def read_events(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {
        tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
    }


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_outputs_of_a_run_with_held_out_validation_and_a_val_folder(tmp_path):
    root = tmp_path / "data"
    make_image_folder(root / "train", per_class=12, seed=0)
    make_image_folder(root / "val", per_class=4, seed=1)
    config = tiny_config(
        tmp_path, "outs", root, num_steps=6, eval_every=3, log_every=2, learning_rate=0.1
    )
    final = train(config)
    run_dir = tmp_path / "output" / "outs"
    assert {p.name for p in run_dir.iterdir()} == RUN_FILES  # no temporary files left behind

    assert TrainConfig.from_dict(json.loads((run_dir / "config.json").read_text())) == config
    saved_final = json.loads((run_dir / "final_metrics.json").read_text())
    assert saved_final == pytest.approx(final)
    assert final["steps"] == 6 and final["best_step"] in (3, 6)

    last, best = read_checkpoint(run_dir / "last.pt"), read_checkpoint(run_dir / "best.pt")
    for state in (last, best):
        assert state["class_names"] == CLASSES
        assert state["model_config"] == config.model_config(3).to_dict()
        assert state["train_config"] == config.to_dict()
    assert last["step"] == 6 and best["step"] == final["best_step"]
    assert best["best"] == {"accuracy": final["best_val_accuracy"], "step": final["best_step"]}

    # test_accuracy is that of the best checkpoint, on the val folder.
    model = VisionTransformer(ModelConfig.from_dict(best["model_config"]))
    model.load_state_dict(best["model"])
    test_set = load_image_folder(root / "val", CLASSES)
    cpu = torch.device("cpu")
    expected = evaluate(
        model, eval_batches(test_set, model.config, 64, cpu, num_workers=0), 3, cpu, progress=False
    )
    assert final["test_accuracy"] == pytest.approx(expected["accuracy"], abs=1e-12)
    assert final["test_loss"] == pytest.approx(expected["loss"], rel=1e-6)
    assert expected["count"] == 12

    records = read_metrics(run_dir)
    by_step = {}
    for r in records:
        by_step.setdefault(r["step"], {}).update(r)
    assert [r["step"] for r in records if "train/loss" in r] == [2, 4, 6]
    assert [r["step"] for r in records if "val/accuracy" in r] == [3, 6]
    assert [r["step"] for r in records if "test/accuracy" in r] == [6]
    assert by_step[6]["test/accuracy"] == pytest.approx(final["test_accuracy"])
    assert max(r["val/accuracy"] for r in records if "val/accuracy" in r) == pytest.approx(
        final["best_val_accuracy"]
    )
    for step in (2, 4, 6):  # the learning rate of each step's update
        assert by_step[step]["train/lr"] == pytest.approx(0.1 * lr_factor(step - 1, 2, 6, "cosine"))

    events = read_events(tmp_path / "logs" / "outs")
    for tag in ("train/loss", "train/lr", "val/accuracy", "val/loss", "test/accuracy"):
        assert tag in events, tag
    assert [s for s, _ in events["train/loss"]] == [2, 4, 6]
    assert [v for _, v in events["train/loss"]] == pytest.approx(
        [by_step[s]["train/loss"] for s in (2, 4, 6)], rel=1e-6
    )
    assert [s for s, _ in events["val/accuracy"]] == [3, 6]
    assert [v for _, v in events["train/lr"]] == pytest.approx(
        [by_step[s]["train/lr"] for s in (2, 4, 6)], rel=1e-6
    )


def test_val_split_zero_validates_on_the_val_folder_as_test(tmp_path):
    root = tmp_path / "data"
    make_image_folder(root / "train", per_class=8, seed=0)
    make_image_folder(root / "val", per_class=4, seed=1)
    final = train(
        tiny_config(
            tmp_path, "seedlike", root, val_split=0.0, num_steps=4, eval_every=2, log_every=1
        )
    )
    run_dir = tmp_path / "output" / "seedlike"
    assert {p.name for p in run_dir.iterdir()} == RUN_FILES
    records = read_metrics(run_dir)
    assert not any(k.startswith("val/") for r in records for k in r)
    accuracies = [(r["step"], r["test/accuracy"]) for r in records if "test/accuracy" in r]
    assert [s for s, _ in accuracies] == [2, 4]
    assert final["test_accuracy"] == final["best_val_accuracy"] == max(a for _, a in accuracies)
    events = read_events(tmp_path / "logs" / "seedlike")
    assert "test/accuracy" in events and "val/accuracy" not in events
    assert [s for s, _ in events["test/accuracy"]] == [2, 4]
    # The evaluation covered the whole val folder: its accuracy is a multiple of 1/12.
    assert all(abs(a * 12 - round(a * 12)) < 1e-9 for _, a in accuracies)


def test_resume_from_another_run_that_never_improves_still_tests(tmp_path):
    # The new run's folder has no best.pt of its own: it tests its final weights instead of failing.
    layout = tmp_path / "data"
    make_image_folder(layout / "train")
    make_image_folder(layout / "val", per_class=4, seed=1)
    train(tiny_config(tmp_path, "first", layout, val_split=0.25))
    first = tmp_path / "output" / "first" / "last.pt"
    state = read_checkpoint(first)
    state["best"] = {"accuracy": 2.0, "step": state["step"]}  # a best no later evaluation can beat
    torch.save(state, first)
    final = train(
        tiny_config(tmp_path, "second", layout, val_split=0.25, num_steps=9, resume=str(first))
    )
    assert not (tmp_path / "output" / "second" / "best.pt").exists()
    assert 0.0 <= final["test_accuracy"] <= 1.0
    assert (tmp_path / "output" / "second" / "final_metrics.json").exists()


# ---------------------------------------------------------------------------------------------
# 10. Multi-label runs from labels CSVs (--labels, --test_labels, --multi_label)


def make_multi_label_csvs(root: Path, n_train: int = 32, n_test: int = 8) -> tuple[Path, Path]:
    """root/train.csv and root/test.csv (`path,label;label`) over random 16 px PNGs in root/images,
    each class present at random in half of them and brightening its own colour channel, so there
    is something to learn."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    rows = []
    for i in range(n_train + n_test):
        present = rng.random(3) < 0.5
        image = rng.integers(0, 140, (16, 16, 3)) + present * 110
        Image.fromarray(image.astype(np.uint8)).save(root / "images" / f"{i:03d}.png")
        labels = ";".join(c for c, p in zip(CLASSES, present, strict=True) if p)
        rows.append(f"images/{i:03d}.png,{labels}\n")
    (root / "train.csv").write_text("".join(rows[:n_train]))
    (root / "test.csv").write_text("".join(rows[n_train:]))
    return root / "train.csv", root / "test.csv"


def multi_label_argv(train_csv: Path, test_csv: Path, *extra: str, name: str = "ml") -> list[str]:
    return [
        "train",
        *("--name", name, "--dataset", "imagefolder", "--multi_label"),
        *("--labels", str(train_csv), "--test_labels", str(test_csv)),
        *TINY_FLAGS,
        *("--device", "cpu", "--num_workers", "0", "--val_split", "0.25"),
        *("--train_batch_size", "8", "--num_steps", "6", "--eval_every", "2"),
        *("--warmup_steps", "0", "--learning_rate", "0.1", "--label_smoothing", "0.1"),
        *extra,
    ]


def test_a_multi_label_run_keeps_the_checkpoint_of_the_best_map(tmp_path, monkeypatch, capsys):
    from vitlab.data import load_image_list
    from vitlab.evaluate import evaluate_multi_label

    monkeypatch.chdir(tmp_path)
    train_csv, test_csv = make_multi_label_csvs(tmp_path)
    rc, out, err = run_cli(multi_label_argv(train_csv, test_csv, "--mixup", "0.4"), capsys)
    assert rc == 0, err[-3000:]
    run_dir = tmp_path / "output" / "ml"
    final = json.loads((run_dir / "final_metrics.json").read_text())
    records = read_metrics(run_dir)
    scores = [(r["step"], r["val/mAP"]) for r in records if "val/mAP" in r]
    assert [s for s, _ in scores] == [2, 4, 6] and not any("val/accuracy" in r for r in records)
    assert all("val/loss" in r for r in records if "val/mAP" in r)
    # best.pt: the first evaluation of the highest mAP
    best_step, best_map = max(scores, key=lambda s: (s[1], -s[0]))
    assert (final["best_val_mAP"], final["best_step"]) == (best_map, best_step)
    best = read_checkpoint(run_dir / "best.pt")
    assert best["step"] == best_step and best["best"] == {"mAP": best_map, "step": best_step}
    assert f"step {best_step}: val mAP {best_map:.4f}" in err + out
    # The test of the best checkpoint, and `vitlab eval` of it, read the model as multi-label
    model, class_names = checkpoints.load_model(run_dir / "best.pt")
    assert model.config.multi_label and class_names == CLASSES
    cpu = torch.device("cpu")
    test = load_image_list(test_csv, multi_label=True, class_names=CLASSES)
    expected = evaluate_multi_label(
        model, eval_batches(test, model.config, 64, cpu, num_workers=0), 3, cpu, progress=False
    )
    assert final["test_mAP"] == pytest.approx(expected["mAP"], abs=1e-12)
    assert final["test_f1_micro"] == pytest.approx(expected["f1_micro"], abs=1e-12)
    argv = ["eval", str(run_dir / "best.pt"), "--labels", str(test_csv), "--precision", "fp32"]
    assert run_cli(argv, capsys)[0] == 0
    report = json.loads((run_dir / "best_test_eval.json").read_text())
    assert report["mAP"] == pytest.approx(final["test_mAP"], abs=1e-12)
    images = sorted(str(p) for p in (tmp_path / "images").glob("*.png"))[:4]
    rc, out, _ = run_cli(["predict", str(run_dir / "best.pt"), *images, "--json"], capsys)
    assert rc == 0 and all("labels" in entry for entry in json.loads(out))


def test_resume_of_a_multi_label_run_is_bit_exact(tmp_path):
    train_csv, test_csv = make_multi_label_csvs(tmp_path)
    # Mixing multi-hot rows, label smoothing and dropout (the variant's 0.1) all replayed; the later
    # --num_steps wins
    mixing = ("--mixup", "0.4", "--cutmix", "1.0", "--num_steps", "12", "--log_every", "1")
    argv = multi_label_argv(train_csv, test_csv, *mixing, name="ref")[1:]
    rc, _, err = finish(train_subprocess(tmp_path, argv))
    assert rc == 0, err[-3000:]
    run_argv = multi_label_argv(train_csv, test_csv, *mixing, name="run")[1:]
    process = train_subprocess(tmp_path, run_argv, code=SLOW_STEPS)
    wait_for(tmp_path / "output" / "run" / "last.pt", process)
    process.send_signal(signal.SIGKILL)
    assert finish(process)[0] == -signal.SIGKILL
    rc, out, err = finish(train_subprocess(tmp_path, [*run_argv, "--resume"]))
    assert rc == 0, err[-3000:]
    assert "resuming from step" in out
    ref, run = (
        read_checkpoint(tmp_path / "output" / "ref" / "last.pt"),
        read_checkpoint(tmp_path / "output" / "run" / "last.pt"),
    )
    assert run["step"] == ref["step"] == 12 and run["best"] == ref["best"]
    assert set(ref["best"]) == {"mAP", "step"}
    for key in ref["model"]:
        assert torch.equal(run["model"][key], ref["model"][key]), key
    assert losses(tmp_path / "output" / "run") == losses(tmp_path / "output" / "ref")


MULTI_LABEL_REFUSALS = {
    "multi-label-on-cifar": (
        ["--dataset", "cifar10", "--multi_label"],
        "--multi_label trains on several labels an image: pass them as --labels CSV",
        2,
    ),
    "labels-with-cifar": (
        ["--dataset", "cifar10", "--labels", "{train}"],
        "--labels names image files: pass --dataset imagefolder, not cifar10",
        2,
    ),
    "test-labels-alone": (["--test_labels", "{test}"], "--test_labels needs --labels", 2),
    "missing-csv": (
        ["--labels", "gone.csv", "--multi_label"],
        "gone.csv: no such labels file",
        1,
    ),
    "unknown-label-in-test": (
        ["--labels", "{train}", "--test_labels", "{horse}", "--multi_label"],
        "labels ['horse'] are not among the 3 classes",
        1,
    ),
    "several-labels-without-multi-label": (
        ["--labels", "{train}"],
        "has not one label; --multi_label takes several",
        1,
    ),
}


@pytest.mark.parametrize("case", list(MULTI_LABEL_REFUSALS))
def test_a_refused_multi_label_input_is_one_line(case, data_dir, capsys):
    extra, expected, status = MULTI_LABEL_REFUSALS[case]
    train_csv, test_csv = make_multi_label_csvs(data_dir.parent / "csv")
    (data_dir.parent / "horse.csv").write_text("csv/images/000.png,horse\n")
    files = {"{train}": train_csv, "{test}": test_csv, "{horse}": data_dir.parent / "horse.csv"}
    extra = [str(files.get(value, value)) for value in extra]
    rc, _, err = run_cli(base_argv(data_dir, *extra), capsys)
    assert rc == status
    assert expected in one_error_line(err)
    assert not (data_dir.parent / "output" / "x" / "best.pt").exists()

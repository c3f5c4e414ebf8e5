"""A run's folders and what guards them: output/<name> and logs/<name> claimed by one live run (a
lock in each), an earlier run never replaced unless asked, a resume refused where it would change
the run's course, the metrics log replayed from a checkpoint, the progress bar, and the signals a
scheduler sends before it preempts a job turned into a stop at the next step boundary. `train.py`
is the training itself."""

from __future__ import annotations

import dataclasses
import fcntl
import json
import math
import os
import signal
import socket
import threading
import time
import warnings
from pathlib import Path

from tqdm.auto import tqdm

from .config import TrainConfig
from .errors import CheckpointError, ConfigError, VitlabError, VitlabWarning


def claim_run_directory(config: TrainConfig) -> list:
    """output/<name> and logs/<name> for this run alone: a lock in each that a second live run on
    either cannot take (released by the kernel when this process ends, however it ends), and no
    finished or interrupted run replaced unless --resume continues it or --overwrite moves it aside.
    Returns the open lock files."""
    out_dir = Path(config.output_dir) / config.name
    folders = (out_dir, Path(config.log_dir) / config.name)
    locks = _lock_all(folders)
    held = [name for name in RUN_FILES if (out_dir / name).exists()]
    if held and not config.resume:
        if not config.overwrite:
            release(locks)
            raise ConfigError(
                f"{out_dir} holds a run ({', '.join(held)}); --resume continues it, --overwrite "
                "moves it aside and starts afresh, or choose another --name"
            )
        aside = f"{config.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"
        for folder in folders:  # moved with their locks held (a lock follows its file), then locked anew where they were
            folder.rename(folder.with_name(aside))
            print(f"moved the earlier run's {folder} aside to {folder.with_name(aside)}")
        release(locks)
        locks = _lock_all(folders)
    # Left by a run of this name killed while saving; none is running now
    for stray in out_dir.glob(".*.pt.*.tmp"):
        stray.unlink()
    return locks


def _lock_all(folders) -> list:
    locks = []
    try:
        for folder in folders:
            locks.append(_lock(folder))
    except BaseException:
        release(locks)
        raise
    return locks


def release(locks) -> None:
    for lock in locks:
        lock.close()


RUN_FILES = ("config.json", "last.pt", "best.pt", "metrics.jsonl", "final_metrics.json")


def _lock(out_dir: Path):
    out_dir.mkdir(parents=True, exist_ok=True)
    lock = open(out_dir / ".lock", "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "another process"
        lock.close()
        raise ConfigError(
            f"{out_dir} is in use by a run still going ({holder}); wait for it to end, or choose "
            "another --name"
        ) from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"process {os.getpid()} on {socket.gethostname()}")
    lock.flush()
    return lock


def check_resume(
    payload: dict, config: TrainConfig, precision: str, path: Path, data: dict | None = None
) -> None:
    """Refuse to resume with a setting that changes the run's course (its seed, batch, schedule,
    optimizer, augmentation, model: config.py marks them resume="same"), or on other training
    images, labels or teacher weights than the run's (`data`: {"images": count, "sha256":
    ImageSet.digest(), "teacher": digest}, where the checkpoint has its own); a longer or shorter
    --num_steps, or another precision where `auto` picked differently on this machine, continue
    with a warning."""
    try:
        theirs = TrainConfig.from_dict(payload["train_config"])
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{path}: its training settings are unreadable ({e})") from None
    differ = [
        f.name
        for f in dataclasses.fields(TrainConfig)
        if f.metadata.get("resume") == "same" and getattr(theirs, f.name) != getattr(config, f.name)
    ]
    shown = [
        (f"--{key}", theirs.model.get(key, "the variant's"), config.model.get(key, "the variant's"))
        for key in sorted(set(theirs.model) | set(config.model))
        if theirs.model.get(key) != config.model.get(key)
    ]
    shown += [
        (f"--{name}", getattr(theirs, name), getattr(config, name))
        for name in differ
        if name != "model"
    ]
    if shown:
        said = "; ".join(f"{flag} {a}, this one {b}" for flag, a, b in shown)
        raise ConfigError(
            f"{path}: its run used {said}; resuming needs the run's own settings (or start afresh "
            "with --overwrite)"
        )
    _check_same_data(payload.get("data"), data, path)
    if theirs.num_steps != config.num_steps:
        warnings.warn(
            f"--num_steps {config.num_steps}: the run was set for {theirs.num_steps} steps; the "
            f"schedule is recomputed for the new length from step {payload['step']} on",
            VitlabWarning,
            stacklevel=2,
        )
    if payload.get("precision", precision) != precision:
        warnings.warn(
            f"the run trained in {payload['precision']} and goes on in {precision} here "
            f"(--precision {config.precision} resolves by machine): it will not be bit-exact with "
            "an uninterrupted run",
            VitlabWarning,
            stacklevel=2,
        )


def _check_same_data(theirs: dict | None, ours: dict | None, path: Path) -> None:
    """The run's training images and labels, and its teacher's weights, where its checkpoint
    records them (older ones do not), are this one's: the same settings on other data would not
    continue the run."""
    if theirs is None or ours is None:
        return
    if theirs.get("teacher") != ours.get("teacher"):
        raise ConfigError(
            f"{path}: its run's teacher had other weights than --teacher has now (the file was "
            "replaced); resuming needs the run's own teacher (or start afresh with --overwrite)"
        )
    if theirs != ours:
        raise ConfigError(
            f"{path}: its run trained on other images or labels ({theirs.get('images')} images, "
            f"this one {ours['images']}: the files or the labels differ); resuming needs the run's "
            "own data (or start afresh with --overwrite)"
        )


class MetricsLog:
    """Rank 0's records: TensorBoard scalars under logs/<name>, the same as JSON lines in
    output/<name>/metrics.jsonl."""

    def __init__(self, config: TrainConfig, out_dir: Path):
        self.path, self.log_dir, self.writer = (
            out_dir / "metrics.jsonl",
            Path(config.log_dir) / config.name,
            None,
        )

    def start(self, step: int) -> None:
        """A resumed run replays what came after its checkpoint: the records past `step` go, in both
        logs."""
        from torch.utils.tensorboard import SummaryWriter

        if step > 0 and self.path.exists():
            kept_lines = [
                line for line in self.path.read_text().splitlines() if _record_step(line) <= step
            ]
            self.path.write_text("".join(line + "\n" for line in kept_lines))
        elif self.path.exists():
            self.path.unlink()
        self.writer = SummaryWriter(str(self.log_dir), purge_step=step if step > 0 else None)

    def write(self, step: int, **scalars: float) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **scalars}) + "\n")

    def close(self) -> None:
        self.writer.close()


def _record_step(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):  # a line cut short by a kill
        return math.inf


class ProgressBar(tqdm):
    """The run's bar: steps done, the time elapsed and the time remaining at the average rate (the
    evaluations counted as they come, which a moving average would take for a slowdown), counted
    from the end of the first step once `time_from_here` is called there: that step also pays for
    one-off set-up (kernels chosen and built, memory first touched; 2-3x a later step on a 2-core
    CPU), which would stretch the whole run's estimate."""

    def __init__(self, config: TrainConfig, step: int, show: bool):
        self.since: tuple[float, float] | None = None  # (elapsed, steps) where the rate starts
        super().__init__(
            total=config.num_steps,
            initial=step,
            desc="train",
            unit="step",
            disable=not show,
            dynamic_ncols=True,
            smoothing=0,
        )

    def time_from_here(self) -> None:
        self.since = (self.format_dict["elapsed"], self.n)

    @property
    def format_dict(self) -> dict:
        values = super().format_dict
        if self.since and values["elapsed"] > self.since[0] and values["n"] > self.since[1]:
            values["rate"] = (values["n"] - self.since[1]) / (values["elapsed"] - self.since[0])
        return values


# ---------------------------------------------------------------------------------------------
# Stopping at a step boundary


class Stopped(VitlabError):
    """The run stopped on a signal at a step boundary, its last.pt saved there; exits 128 + the
    signal's number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class StopSignals:
    """SIGTERM (what SLURM and Kubernetes send before they preempt a job) and Ctrl-C (SIGINT),
    caught while the loop runs: `received` says which came, and the loop stops at the next step
    boundary, saving there. A second signal stops at once (KeyboardInterrupt). A signal the process
    was started to ignore stays ignored (a job started in the background ignores Ctrl-C, as its
    shell intends); outside the main thread nothing is installed."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                previous = signal.getsignal(signum)
                if previous is not signal.SIG_IGN:
                    self._previous[signum] = previous
                    signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame) -> None:
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signum

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)

"""The training loop: fine-tuning as the tutorial did it (SGD, warmup then cosine or linear decay,
gradient clipping, accumulation, mixed precision, DistributedDataParallel), plus training from
scratch, held-out validation, a guard against non-finite values, atomic checkpoints and bit-exact
resume.

`train(config)` reads top to bottom: set up (`Job`: what stays fixed), start or resume
(`TrainState`: what a resumed run restores), then one step per batch, evaluating and saving every
`eval_every` steps, then the test. Every random choice comes from (seed, step): the batches and
their augmentation (data.py) and, reseeded at each step, dropout; so a resumed run takes exactly the
steps the uninterrupted run would have taken.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from . import randomness
from .augment import Augmentation
from .batches import TrainBatches
from .config import TrainConfig
from .data import ImageSet, training_data
from .distillation import with_teacher
from .errors import TrainingError
from .evaluate import evaluate_run, headline, ranked_by
from .fastpaths import describe
from .formats import checkpoints, official
from .losses import Distillation, Loss, criterion
from .model import VisionTransformer
from .optim import configure_optimizer, freeze, set_learning_rate
from .runs import (
    MetricsLog,
    ProgressBar,
    Stopped,
    StopSignals,
    check_resume,
    claim_run_directory,
    release,
)
from .runtime import DTYPES, Processes, autocast, micro_batches, precision_line, resolve_precision


@dataclass
class TrainState:
    """What a resumed run restores besides the weights and the optimizer: where the run is and its
    best so far."""

    step: int = 0
    best: float = -1.0  # the best validation figure so far, of `metric`
    best_step: int = 0
    saved_step: int = 0  # the step of last.pt, the last good checkpoint
    accumulation_steps: int = 1  # micro-batches an update (runtime.choose_accumulation)
    metric: str = "accuracy"  # what ranks checkpoints (evaluate.ranked_by), the key of `best`

    def progress(self) -> dict:
        best = {self.metric: self.best, "step": self.best_step}
        return {"step": self.step, "best": best, "accumulation_steps": self.accumulation_steps}


@dataclass(frozen=True, kw_only=True)
class Job:
    """A run's fixed parts, built once: what it trains, on what, with what, and where it writes."""

    config: TrainConfig
    processes: Processes
    precision: str  # resolved: fp32, bf16 or fp16
    train_data: ImageSet
    val_data: ImageSet
    test_data: ImageSet | None
    model: VisionTransformer  # the weights
    # The same model, compiled and/or wrapped for DDP: what forward passes go through.
    train_model: torch.nn.Module
    ema: AveragedModel | None  # the moving average of the weights (--ema), which evaluation uses
    criterion: Loss  # what a step minimises
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    out_dir: Path
    log: MetricsLog | None  # rank 0's records
    # the training images' count and ImageSet.digest(), the teacher's weights' digest: kept in
    # checkpoints, checked on --resume
    data: dict

    @property
    def class_names(self) -> list[str]:
        return self.train_data.class_names

    @property
    def eval_model(self) -> torch.nn.Module:
        return self.ema.module if self.ema is not None else self.train_model


def train(config: TrainConfig) -> dict:
    """Run a whole training job; returns the final metrics (also saved as
    output/<name>/final_metrics.json)."""
    processes, locks = Processes(config.device, config.local_rank), []
    try:
        config.validate(processes.world_size)
        locks = claim_run_directory(config) if processes.is_main else []  # before any slow set-up
        job = set_up(config, processes)
        batches = TrainBatches(  # the dataset on the device before its memory is measured
            job.train_data,
            Augmentation.from_config(config, job.model.config, DTYPES[job.precision]),
            batch_size=config.train_batch_size,
            seed=config.seed,
            device=processes.device,
            rank=processes.rank,
            world_size=processes.world_size,
            num_workers=config.num_workers,
        )
        state = start(job)
        bar = ProgressBar(config, state.step, show=processes.is_main)
        job.train_model.train()
        started, images_seen, first = time.perf_counter(), 0, state.step
        with bar, StopSignals() as stops:
            for images, labels in batches(state.step, config.num_steps):
                lr = set_learning_rate(job.optimizer, config, state.step)
                dropout = state.step * processes.world_size + processes.rank
                torch.manual_seed(randomness.stream_seed(config.seed, "dropout", dropout))
                loss = train_step(job, images, labels, state)
                state.step += 1
                images_seen += config.train_batch_size
                speed = images_seen / (time.perf_counter() - started)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{speed:.1f}")
                if state.step == first + 1:
                    bar.time_from_here()
                if job.log and (
                    state.step % config.log_every == 0 or state.step == config.num_steps
                ):
                    job.log.write(
                        state.step,
                        **{"train/loss": loss, "train/lr": lr, "train/images_per_second": speed},
                    )
                if state.step % config.eval_every == 0 or state.step == config.num_steps:
                    evaluate_and_save(job, state, bar)
                stop = processes.agree(stops.received)  # every process stops at the same step
                if stop and state.step < config.num_steps:
                    stop_at_step_boundary(job, state, stop)
        final = finish(job, state, time.perf_counter() - started, images_seen)
        if processes.distributed:
            torch.distributed.barrier()  # gloo can abort at exit if one process tears down while another still talks
        return final
    finally:
        processes.close()
        release(locks)  # the kernel releases a lock with its file, or with the process if it dies


# ---------------------------------------------------------------------------------------------
# Set-up


def set_up(config: TrainConfig, processes: Processes) -> Job:
    # Refuses fp16 without CUDA now
    precision = resolve_precision(config.effective_precision(), processes.device)
    scaler = make_scaler(config, precision, processes.device)
    torch.manual_seed(randomness.stream_seed(config.seed, "init"))
    with processes.main_first():  # rank 0 downloads first
        train_data, val_data, test_data = training_data(config)
        model = build_model(config, len(train_data.class_names), verbose=processes.is_main).to(
            processes.device
        )
    freeze(model, config.freeze)
    model.grad_checkpointing = config.grad_checkpointing
    optimizer = configure_optimizer(model, config)
    ema = (
        AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(config.ema), use_buffers=True)
        if config.ema > 0
        else None
    )
    train_model = torch.compile(model) if config.compile else model
    if processes.distributed:
        ids = [processes.device.index] if processes.device.type == "cuda" else None
        train_model = torch.nn.parallel.DistributedDataParallel(train_model, device_ids=ids)
    out_dir = Path(config.output_dir) / config.name
    log = MetricsLog(config, out_dir) if processes.is_main else None
    loss = with_teacher(
        criterion(config, model.config.multi_label),
        config=config,
        model=model,
        class_names=train_data.class_names,
        processes=processes,
    )
    # What the run learns from: its images and labels, and its teacher's weights
    data = {"images": len(train_data), "sha256": train_data.digest()}
    if isinstance(loss, Distillation):
        data["teacher"] = loss.teacher.digest
    return Job(
        config=config,
        processes=processes,
        precision=precision,
        train_data=train_data,
        val_data=val_data,
        test_data=test_data,
        model=model,
        train_model=train_model,
        ema=ema,
        criterion=loss,
        optimizer=optimizer,
        scaler=scaler,
        out_dir=out_dir,
        log=log,
        data=data,
    )


def build_model(config: TrainConfig, num_classes: int, verbose: bool) -> VisionTransformer:
    """The model to train: from scratch as `config` says, or as its pretrained file says, with the
    task's classes, image size and regularisation (`checkpoints.pretrained_model`)."""
    wanted = config.model_config(num_classes)
    source = official.pretrained_source(config.pretrained_dir, config.model_type)
    if source is None:
        return VisionTransformer(wanted)
    model = checkpoints.pretrained_model(source, wanted, frozenset(config.model), verbose)
    if verbose:
        print(f"initialised from {source}")
    return model


def make_scaler(config: TrainConfig, precision: str, device: torch.device) -> torch.amp.GradScaler:
    if precision == "fp16" and config.loss_scale > 0:
        # Kept static by update(new_scale)
        return torch.amp.GradScaler(device.type, init_scale=config.loss_scale)
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def start(job: Job) -> TrainState:
    """A fresh state, or the state of the checkpoint --resume names (weights, optimizer and scaler
    restored too); the update's micro-batches chosen, and the run's first lines printed."""
    config, state, payload = job.config, TrainState(metric=ranked_by(job.model.config)), {}
    if config.resume:
        path = job.out_dir / "last.pt" if config.resume == "last" else Path(config.resume)
        payload = checkpoints.read_checkpoint(path)
        checkpoints.check_training_state(payload, path, job.model.config)
        check_resume(payload, config, job.precision, path, job.data)
        checkpoints.restore_training_checkpoint(
            payload, path, job.model, optimizer=job.optimizer, scaler=job.scaler, ema=job.ema
        )
        best, metric = payload["best"], state.metric  # older runs' files: {"accuracy", "step"}
        state = TrainState(
            payload["step"], best[metric], best["step"], payload["step"], metric=metric
        )
    state.accumulation_steps, split = micro_batches(
        job.model,
        batch_size=config.train_batch_size // job.processes.world_size,
        at_least=config.gradient_accumulation_steps,
        precision=job.precision,
        previous=payload.get("accumulation_steps"),
    )
    if job.processes.is_main:
        if config.resume:
            print(f"resuming from step {state.step} ({path})")
        print(json.dumps(config.to_dict(), indent=2))
        print(
            f"device {job.processes.device}, "
            f"{precision_line(config.effective_precision(), job.precision)}\n{split}\n"
            f"{describe(job.processes.device)}"
        )
        (job.out_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        job.log.start(state.step)
    return state


# ---------------------------------------------------------------------------------------------
# A step, an evaluation, the end


def train_step(job: Job, images: torch.Tensor, labels: torch.Tensor, state: TrainState) -> float:
    """One update from this process's share of the batch, split into the run's micro-batches; returns
    the loss of the whole batch (averaged over processes). A non-finite loss or gradient stops the run
    (fp16's scaler skips steps with overflowing gradients by design)."""
    config, processes = job.config, job.processes
    accum = state.accumulation_steps
    loss_sum = torch.zeros((), device=processes.device)
    for i, (x, y) in enumerate(
        zip(images.tensor_split(accum), labels.tensor_split(accum), strict=True)
    ):
        # DDP all-reduces gradients on the last micro-batch only
        sync = i == accum - 1 or not processes.distributed
        with (
            contextlib.nullcontext() if sync else job.train_model.no_sync(),
            autocast(processes.device, job.precision),
        ):
            # Its share of the batch's mean: 1 / accum where the micro-batches are equal
            loss = job.criterion(job.train_model(x), x, y) / (len(images) / len(x))
        job.scaler.scale(loss).backward()
        loss_sum += loss.detach()
    if processes.distributed:
        torch.distributed.all_reduce(loss_sum)
        loss_sum /= processes.world_size
    job.scaler.unscale_(job.optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(
        job.model.parameters(), config.max_grad_norm if config.max_grad_norm > 0 else math.inf
    )
    loss_value = loss_sum.item()
    if not math.isfinite(loss_value) or (job.precision != "fp16" and not torch.isfinite(grad_norm)):
        what = (
            f"loss is {loss_value}"
            if not math.isfinite(loss_value)
            else f"gradient norm is {grad_norm.item()}"
        )
        raise TrainingError(f"{what} at step {state.step + 1}; stopped, {kept(job, state)}")
    job.scaler.step(job.optimizer)
    job.scaler.update(
        config.loss_scale if job.precision == "fp16" and config.loss_scale > 0 else None
    )
    job.optimizer.zero_grad(set_to_none=True)
    if job.ema is not None:
        job.ema.update_parameters(job.model)
    return loss_value


def kept(job: Job, state: TrainState) -> str:
    """What a stopped run leaves to resume from, naming only a file that is there."""
    last = job.out_dir / "last.pt"
    if state.saved_step and last.is_file():
        return f"the last good checkpoint {last} (step {state.saved_step}) is kept"
    return "no checkpoint was saved before it"


def check_finite(job: Job, state: TrainState) -> None:
    """Stop the run, naming what is kept, if its weights went non-finite: nothing is evaluated or saved
    from them."""
    if not all(torch.isfinite(p).all() for p in job.model.parameters()):
        raise TrainingError(
            f"weights became non-finite at step {state.step}; stopped, {kept(job, state)}"
        )


def save_checkpoints(job: Job, state: TrainState, names: tuple[str, ...] = ("last.pt",)) -> None:
    """The run's state as `names` in its folder (rank 0 writes), for --resume to continue bit-exact
    from this step."""
    if job.processes.is_main:
        for name in names:
            checkpoints.save_training_checkpoint(
                job.out_dir / name,
                job.model,
                checkpoints.RunState(
                    class_names=job.class_names,
                    train_config=job.config.to_dict(),
                    optimizer=job.optimizer,
                    scaler=job.scaler,
                    progress={**state.progress(), "precision": job.precision, "data": job.data},
                    ema=job.ema,
                ),
            )
    state.saved_step = state.step


def stop_at_step_boundary(job: Job, state: TrainState, signum: int) -> None:
    """A signal came (SIGTERM before a preemption, Ctrl-C): last.pt at this step, then a one-line
    stop."""
    check_finite(job, state)
    save_checkpoints(job, state)
    raise Stopped(
        f"stopped by {signal.Signals(signum).name} at step {state.step}; saved "
        f"{job.out_dir / 'last.pt'}: --resume continues the run",
        signum,
    )


def evaluate_on(job: Job, data: ImageSet) -> dict:
    # Fed as the model's config says
    return evaluate_run(
        job.eval_model,
        data,
        model_config=job.model.config,
        config=job.config,
        processes=job.processes,
        precision=job.precision,
    )


def evaluate_and_save(job: Job, state: TrainState, bar) -> None:
    """Validation accuracy (a multi-label run's mAP) now; best.pt if it is the best so far, and
    last.pt, unless the weights went non-finite."""
    check_finite(job, state)
    result, metric = evaluate_on(job, job.val_data), state.metric
    improved = result[metric] > state.best
    if improved:
        state.best, state.best_step = result[metric], state.step
    if job.processes.is_main:
        tag = "test" if job.config.val_split == 0 else "val"
        job.log.write(
            state.step, **{f"{tag}/loss": result["loss"], f"{tag}/{metric}": result[metric]}
        )
        bar.write(
            f"step {state.step}: {tag} {metric} {result[metric]:.4f}, loss "
            f"{result['loss']:.4f} (best {state.best:.4f} at step {state.best_step})"
        )
    save_checkpoints(job, state, ("best.pt", "last.pt") if improved else ("last.pt",))


def finish(job: Job, state: TrainState, seconds: float, images_seen: int) -> dict:
    """Final metrics; the test split, if held apart, evaluated once on the best checkpoint."""
    metric = state.metric
    final = {
        f"best_val_{metric}": state.best,
        "best_step": state.best_step,
        "steps": state.step,
        "train_seconds": seconds,
        "images_per_second": images_seen / seconds if seconds else 0.0,
    }
    if job.config.val_split == 0:
        final[f"test_{metric}"] = state.best
    elif job.test_data is not None:
        load_best(job)
        test = evaluate_on(job, job.test_data)
        final.update({f"test_{k}": v for k, v in headline(test).items()})
        if job.log:
            job.log.write(state.step, **{f"test/{metric}": test[metric], "test/loss": test["loss"]})
            print(
                f"test {metric} of the best checkpoint (step {state.best_step}): {test[metric]:.4f}"
            )
    if job.log:
        (job.out_dir / "final_metrics.json").write_text(json.dumps(final, indent=2) + "\n")
        job.log.close()
        print(json.dumps(final))
    return final


def load_best(job: Job) -> None:
    """The weights of this run's best.pt, on every process. A run resumed from another run's
    checkpoint that never beat that run's best has no best.pt of its own: its test is of the weights
    it ends with."""
    best_path = job.out_dir / "best.pt"
    best = (
        checkpoints.read_checkpoint(best_path)
        if job.processes.is_main and best_path.is_file()
        else None
    )
    if job.processes.distributed:
        holder = [best]
        torch.distributed.broadcast_object_list(holder, src=0)
        best = holder[0]
    if best is not None:
        job.model.load_state_dict(best["model"])
        if job.ema is not None:
            job.ema.module.load_state_dict(best["ema"])
    elif job.processes.is_main:
        print(f"no {best_path}: testing the final weights")

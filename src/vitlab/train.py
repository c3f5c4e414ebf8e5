"""The training loop: fine-tuning as the seed did it (SGD, warmup then cosine or linear decay,
gradient clipping, accumulation, mixed precision, DistributedDataParallel), plus training from
scratch, held-out validation, NaN guard, atomic checkpoints and bit-exact resume."""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import checkpoints
from .config import TrainConfig, canonical_name, seed_name
from .data import Augmentation, TrainBatches, eval_batches, load_datasets
from .evaluate import autocast, evaluate
from .model import VisionTransformer


class TrainingError(RuntimeError):
    """A run that cannot go on; the message says why and what was kept."""


def lr_factor(step: int, warmup_steps: int, total_steps: int, decay_type: str) -> float:
    """The seed's schedule (WarmupCosineSchedule / WarmupLinearSchedule): linear warmup from 0, then
    cosine or linear decay to 0 at `total_steps`. Multiplies the base learning rate at `step`."""
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if decay_type == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    return max(0.0, (total_steps - step) / max(1.0, total_steps - warmup_steps))


def configure_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """SGD as the seed (weight decay on every parameter); AdamW decays only matrices, not norms,
    biases, class token and position embeddings."""
    if config.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=config.learning_rate, momentum=config.momentum, weight_decay=config.weight_decay)
    decay = [p for p in model.parameters() if p.ndim >= 2 and p.requires_grad]
    no_decay = [p for p in model.parameters() if p.ndim < 2 and p.requires_grad]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.learning_rate, betas=config.adam_betas)


# ---------------------------------------------------------------------------------------------
# Set-up

class Runtime:
    """Device and process group of this process (torchrun, torch.distributed.launch, or neither)."""

    def __init__(self, config: TrainConfig):
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        local_rank = int(os.environ.get("LOCAL_RANK", config.local_rank))
        self.distributed = world_size > 1
        self.rank = int(os.environ.get("RANK", "0")) if self.distributed else 0
        self.world_size = world_size
        if config.device == "auto":
            self.device = torch.device(f"cuda:{max(local_rank, 0)}" if torch.cuda.is_available() else "cpu")
        else:
            self.device = torch.device(config.device)
            if self.device.type == "cuda" and self.distributed and self.device.index is None:
                self.device = torch.device(f"cuda:{max(local_rank, 0)}")
        if self.device.type == "cuda":
            if not torch.cuda.is_available():
                raise TrainingError(f"--device {config.device}: CUDA is not available on this machine")
            torch.cuda.set_device(self.device)
        if self.distributed:
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            torch.distributed.init_process_group(backend=backend, device_id=self.device if backend == "nccl" else None)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def close(self) -> None:
        if self.distributed:
            torch.distributed.destroy_process_group()


def resolve_pretrained(config: TrainConfig) -> str | None:
    """What --pretrained_dir names: a file path, an official checkpoint name, or None for from scratch."""
    source = config.pretrained_dir
    if source.lower() == "none":
        return None
    if source == "auto":
        local = Path("checkpoint") / f"{seed_name(canonical_name(config.model_type))}.npz"
        if local.is_file():
            return str(local)
        official = checkpoints.default_checkpoint(canonical_name(config.model_type))
        if official is None:
            raise TrainingError(f"no official checkpoint for {config.model_type}; pass --pretrained_dir FILE or --pretrained_dir none")
        return official
    return source


def build_model(config: TrainConfig, num_classes: int, verbose: bool) -> VisionTransformer:
    model = VisionTransformer(config.model_config(num_classes))
    source = resolve_pretrained(config)
    if source is not None:
        path = checkpoints.resolve_checkpoint(source)
        checkpoints.load_pretrained(model, path, verbose=verbose)
        if verbose:
            print(f"initialised from {path}")
    return model


def make_scaler(config: TrainConfig, device: torch.device) -> torch.amp.GradScaler:
    precision = config.effective_precision()
    if precision == "fp16" and device.type != "cuda":
        raise TrainingError("fp16 training needs a CUDA device; on a CPU use --precision bf16")
    if precision == "fp16" and config.loss_scale > 0:
        return torch.amp.GradScaler(device.type, init_scale=config.loss_scale)  # kept static by update(new_scale)
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


# ---------------------------------------------------------------------------------------------
# Outputs

class RunLog:
    """Rank 0's records: TensorBoard scalars under logs/<name>, the same as JSON lines in output/<name>."""

    def __init__(self, config: TrainConfig, out_dir: Path, start_step: int):
        from torch.utils.tensorboard import SummaryWriter

        self.path = out_dir / "metrics.jsonl"
        if start_step > 0 and self.path.exists():  # a resumed run replays what came after its checkpoint
            kept = [line for line in self.path.read_text().splitlines() if _record_step(line) <= start_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        elif self.path.exists():
            self.path.unlink()
        self.writer = SummaryWriter(str(Path(config.log_dir) / config.name), purge_step=start_step if start_step > 0 else None)

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


# ---------------------------------------------------------------------------------------------
# The run

def train(config: TrainConfig) -> dict:
    """Run a whole training job; returns the final metrics (also saved as output/<name>/final_metrics.json)."""
    runtime = Runtime(config)
    try:
        config.validate(runtime.world_size)
        return _train(config, runtime)
    finally:
        runtime.close()


def _train(config: TrainConfig, rt: Runtime) -> dict:
    out_dir = Path(config.output_dir) / config.name
    torch.manual_seed(config.seed)
    train_data, val_data, test_data = load_datasets(config.dataset, config.data_dir, config.val_split, config.seed)
    class_names = train_data.class_names
    model = build_model(config, len(class_names), verbose=rt.is_main).to(rt.device)
    optimizer = configure_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, config.warmup_steps, config.num_steps, config.decay_type)
    )
    scaler = make_scaler(config, rt.device)
    start_step, best = 0, {"accuracy": -1.0, "step": 0}
    if config.resume:
        resume_path = out_dir / "last.pt" if config.resume == "last" else Path(config.resume)
        state = checkpoints.read_checkpoint(resume_path)
        for key in ("optimizer", "scheduler", "step", "rng"):
            if key not in state:
                raise TrainingError(f"{resume_path}: holds no training state ({key}); only checkpoints written by `vitlab train` resume")
        checkpoints.load_state(model, state["model"], resume_path)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start_step, best = state["step"], state["best"]
        torch.set_rng_state(state["rng"]["torch"])
        if rt.device.type == "cuda" and state["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"], rt.device)
    if rt.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        print(json.dumps(config.to_dict(), indent=2))
        (out_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        if start_step:
            print(f"resuming from step {start_step}")
    train_model = model
    if config.compile:
        train_model = torch.compile(train_model)
    if rt.distributed:
        ids = [rt.device.index] if rt.device.type == "cuda" else None
        train_model = torch.nn.parallel.DistributedDataParallel(train_model, device_ids=ids)
    precision = config.effective_precision()
    augmentation = Augmentation(config.img_size, config.augment, config.min_scale, config.hflip)
    batches = TrainBatches(train_data, augmentation, config.train_batch_size, config.seed, rt.device, rt.rank, rt.world_size, config.num_workers)
    log = RunLog(config, out_dir, start_step) if rt.is_main else None

    def run_eval(data, step: int) -> dict:
        shards = eval_batches(data, config.img_size, config.eval_batch_size, rt.device, rt.rank, rt.world_size, config.num_workers)
        total = math.ceil(len(data) / rt.world_size / config.eval_batch_size)
        return evaluate(train_model, shards, len(class_names), rt.device, precision, total, rt.is_main, rt.distributed)

    def save(step: int, filename: str) -> None:
        payload = {
            "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "model_config": model.config.to_dict(), "class_names": class_names, "train_config": config.to_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
            "step": step, "best": best,
            "rng": {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(rt.device) if rt.device.type == "cuda" else None},
        }  # fmt: skip
        checkpoints.save_checkpoint(payload, out_dir / filename)

    accum = config.gradient_accumulation_steps
    micro = config.train_batch_size // rt.world_size // accum
    bar = tqdm(total=config.num_steps, initial=start_step, desc="train", unit="step", disable=not rt.is_main, dynamic_ncols=True)
    train_model.train()
    started, images_seen, saved_step = time.perf_counter(), 0, start_step
    step = start_step
    for step, (images, labels) in enumerate(batches(start_step, config.num_steps), start=start_step + 1):
        loss_sum = torch.zeros((), device=rt.device)
        for i in range(accum):
            x, y = images[i * micro : (i + 1) * micro], labels[i * micro : (i + 1) * micro]
            sync = i == accum - 1 or not rt.distributed
            with (contextlib.nullcontext() if sync else train_model.no_sync()), autocast(rt.device, precision):
                logits = train_model(x)
                loss = F.cross_entropy(logits.float(), y, label_smoothing=config.label_smoothing) / accum
            scaler.scale(loss).backward()
            loss_sum += loss.detach()
        loss_value = loss_sum.item()
        if not math.isfinite(loss_value):
            kept = out_dir / "last.pt"
            raise TrainingError(f"loss is {loss_value} at step {step}; stopped, the last good checkpoint {kept} (step {saved_step}) is kept")
        scaler.unscale_(optimizer)
        if config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        scaler.step(optimizer)
        scaler.update(config.loss_scale if precision == "fp16" and config.loss_scale > 0 else None)
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        images_seen += config.train_batch_size
        speed = images_seen / (time.perf_counter() - started)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}", img_s=f"{speed:.1f}")
        if log and (step % config.log_every == 0 or step == config.num_steps):
            log.write(step, **{"train/loss": loss_value, "train/lr": lr, "train/images_per_second": speed})
        if step % config.eval_every == 0 or step == config.num_steps:
            last = run_eval(val_data, step)
            improved = last["accuracy"] > best["accuracy"]
            if improved:
                best = {"accuracy": last["accuracy"], "step": step}
            if rt.is_main:
                tag = "test" if config.val_split == 0 else "val"
                log.write(step, **{f"{tag}/loss": last["loss"], f"{tag}/accuracy": last["accuracy"]})
                bar.write(f"step {step}: {tag} accuracy {last['accuracy']:.4f}, loss {last['loss']:.4f} (best {best['accuracy']:.4f} at {best['step']})")
                if improved:
                    save(step, "best.pt")
                save(step, "last.pt")
            saved_step = step
    bar.close()
    elapsed = time.perf_counter() - started
    final = {"best_val_accuracy": best["accuracy"], "best_step": best["step"], "steps": step,
             "train_seconds": elapsed, "images_per_second": images_seen / elapsed if images_seen else 0.0}  # fmt: skip
    if config.val_split == 0:
        final["test_accuracy"] = best["accuracy"]
    elif test_data is not None:
        best_state = checkpoints.read_checkpoint(out_dir / "best.pt") if rt.is_main else None
        if rt.distributed:
            holder = [best_state]
            torch.distributed.broadcast_object_list(holder, src=0)
            best_state = holder[0]
        model.load_state_dict(best_state["model"])
        test = run_eval(test_data, step)
        final.update(test_accuracy=test["accuracy"], test_loss=test["loss"], test_top5_accuracy=test["top5_accuracy"])
        if rt.is_main:
            log.write(step, **{"test/accuracy": test["accuracy"], "test/loss": test["loss"]})
            print(f"test accuracy of the best checkpoint (step {best['step']}): {test['accuracy']:.4f}")
    if rt.is_main:
        (out_dir / "final_metrics.json").write_text(json.dumps(final, indent=2) + "\n")
        log.close()
        print(json.dumps(final))
    return final


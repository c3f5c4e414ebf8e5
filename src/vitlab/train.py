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
from .config import ModelConfig, TrainConfig, canonical_name, seed_name
from .data import Augmentation, TrainBatches, eval_batches, load_datasets
from .errors import TrainingError
from .evaluate import evaluate
from .fastpaths import describe
from .model import VisionTransformer
from .runtime import Processes, autocast, resolve_precision


def lr_factor(step: int, warmup_steps: int, total_steps: int, decay_type: str) -> float:
    """The seed's schedule (WarmupCosineSchedule / WarmupLinearSchedule): linear warmup from 0, then
    cosine or linear decay to 0 at `total_steps`. Multiplies the base learning rate at `step`."""
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if decay_type == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    return max(0.0, (total_steps - step) / max(1.0, total_steps - warmup_steps))


def configure_optimizer(model: VisionTransformer, config: TrainConfig) -> torch.optim.Optimizer:
    """SGD as the seed (weight decay on every parameter); AdamW decays only matrices, not norms,
    biases, class token and position embeddings; Muon takes the encoder blocks' matrices and AdamW the rest."""
    if config.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=config.learning_rate, momentum=config.momentum, weight_decay=config.weight_decay)
    trained = [p for p in model.parameters() if p.requires_grad]
    hidden = {id(p) for p in model.blocks.parameters() if p.ndim == 2} if config.optimizer == "muon" else set()
    undecayed = {id(p) for p in trained if p.ndim < 2} | {id(p) for p in (model.pos_embed, model.cls_token) if p is not None}
    decay = [p for p in trained if id(p) not in undecayed and id(p) not in hidden]
    no_decay = [p for p in trained if id(p) in undecayed]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    adamw = torch.optim.AdamW(groups, lr=config.learning_rate, betas=config.adam_betas)
    if config.optimizer == "adamw":
        return adamw
    # Muon is for hidden layers' matrices: the patch embedding, head and vectors stay with AdamW, as its authors
    # advise. "match_rms_adamw" scales its orthogonal updates to AdamW's size, so both share one lr and decay.
    muon = torch.optim.Muon([p for p in trained if id(p) in hidden], lr=config.learning_rate, weight_decay=config.weight_decay,
                            adjust_lr_fn="match_rms_adamw")  # fmt: skip
    return Combined(muon=muon, adamw=adamw)


class Combined(torch.optim.Optimizer):
    """Several optimizers, each over its own parameters, stepped as one: one learning-rate schedule moves
    every group (they are the same group dicts), one gradient scaler, one state dict keyed by name."""

    def __init__(self, **parts: torch.optim.Optimizer):
        self.parts = parts
        super().__init__([g for part in parts.values() for g in part.param_groups], {})

    def step(self, closure=None):
        loss = None
        if closure is not None:  # evaluated once, not once per part
            with torch.enable_grad():
                loss = closure()
        for part in self.parts.values():
            part.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for part in self.parts.values():
            part.zero_grad(set_to_none)

    def state_dict(self) -> dict:
        return {name: part.state_dict() for name, part in self.parts.items()}

    def load_state_dict(self, state_dict: dict) -> None:
        if set(state_dict) != set(self.parts):
            raise ValueError(f"optimizer state for {sorted(state_dict)}, this run has {sorted(self.parts)}")
        for name, part in self.parts.items():
            part.load_state_dict(state_dict[name])


# ---------------------------------------------------------------------------------------------
# Set-up

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


def make_scaler(config: TrainConfig, precision: str, device: torch.device) -> torch.amp.GradScaler:
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
    runtime = Processes(config.device, config.local_rank)
    try:
        config.validate(runtime.world_size)
        run = Run(config, runtime)
        run.fit()
        final = run.finish()
        if runtime.distributed:
            torch.distributed.barrier()  # gloo can abort at exit if one process tears down while another still talks
        return final
    finally:
        runtime.close()


class Run:
    """One training job's state: data, model, optimizer, schedule, scaler, step and best result."""

    def __init__(self, config: TrainConfig, rt: Processes):
        self.config, self.rt = config, rt
        self.out_dir = Path(config.output_dir) / config.name
        self.precision = resolve_precision(config.effective_precision(), rt.device)  # refuses fp16 without CUDA now
        self.scaler = make_scaler(config, self.precision, rt.device)
        torch.manual_seed(config.seed)
        with rt.main_first():
            self.train_data, self.val_data, self.test_data = load_datasets(config.dataset, config.data_dir, config.val_split, config.seed)
            self.class_names = self.train_data.class_names
            self.model = build_model(config, len(self.class_names), verbose=rt.is_main).to(rt.device)
        self.optimizer = configure_optimizer(self.model, config)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step, config.warmup_steps, config.num_steps, config.decay_type)
        )
        self.step, self.saved_step, self.best = 0, 0, {"accuracy": -1.0, "step": 0}
        self.images_seen, self.train_seconds = 0, 0.0  # this process's run, not counting before a resume
        if config.resume:
            self._restore(self.out_dir / "last.pt" if config.resume == "last" else Path(config.resume))
        if rt.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            for stray in self.out_dir.glob(".*.pt.*.tmp"):  # left by a run killed while saving
                stray.unlink()
            print(json.dumps(config.to_dict(), indent=2))
            print(f"device {rt.device}, precision {self.precision}; {describe(rt.device)}")
            (self.out_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        self.train_model = torch.compile(self.model) if config.compile else self.model
        if rt.distributed:
            ids = [rt.device.index] if rt.device.type == "cuda" else None
            self.train_model = torch.nn.parallel.DistributedDataParallel(self.train_model, device_ids=ids)
        self.log = RunLog(config, self.out_dir, self.step) if rt.is_main else None

    def _restore(self, path: Path) -> None:
        state = checkpoints.read_checkpoint(path)
        for key in ("optimizer", "scheduler", "scaler", "step", "best", "rng"):
            if key not in state:
                raise TrainingError(f"{path}: holds no training state ({key}); only checkpoints written by `vitlab train` resume")
        checkpoints.check_same_function(ModelConfig.from_dict(state["model_config"]), self.model.config, path)
        theirs = state.get("train_config", {}).get("optimizer", self.config.optimizer)
        if theirs != self.config.optimizer:  # another optimizer's state does not load, or loads into the wrong slots
            raise TrainingError(f"{path}: its run used --optimizer {theirs}, this one {self.config.optimizer}; pass --optimizer {theirs}")
        checkpoints.load_state(self.model, state["model"], path)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.step = self.saved_step = state["step"]
        self.best = state["best"]
        torch.set_rng_state(state["rng"]["torch"])
        if self.rt.device.type == "cuda" and state["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.rt.device)
        if self.rt.is_main:
            print(f"resuming from step {self.step} ({path})")

    def fit(self) -> None:
        config, rt = self.config, self.rt
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision, torch.float32)
        augmentation = Augmentation(config.img_size, config.augment, config.min_scale, config.hflip, dtype=dtype)
        batches = TrainBatches(self.train_data, augmentation, config.train_batch_size, config.seed, rt.device, rt.rank,
                               rt.world_size, config.num_workers)  # fmt: skip
        bar = tqdm(total=config.num_steps, initial=self.step, desc="train", unit="step", disable=not rt.is_main, dynamic_ncols=True)
        self.train_model.train()
        started = time.perf_counter()
        try:
            for images, labels in batches(self.step, config.num_steps):
                lr = self.scheduler.get_last_lr()[0]
                loss = self.train_step(images, labels)
                self.step += 1
                self.images_seen += config.train_batch_size
                self.train_seconds = time.perf_counter() - started
                speed = self.images_seen / self.train_seconds
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{speed:.1f}")
                if self.log and (self.step % config.log_every == 0 or self.step == config.num_steps):
                    self.log.write(self.step, **{"train/loss": loss, "train/lr": lr, "train/images_per_second": speed})
                if self.step % config.eval_every == 0 or self.step == config.num_steps:
                    self.evaluate_and_save(bar)
        finally:
            bar.close()

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        """One update from this process's share of the batch, split into accumulation steps; returns the
        loss of the whole batch (averaged over processes)."""
        config, rt = self.config, self.rt
        accum = config.gradient_accumulation_steps
        micro = len(images) // accum
        loss_sum = torch.zeros((), device=rt.device)
        for i in range(accum):
            x, y = images[i * micro : (i + 1) * micro], labels[i * micro : (i + 1) * micro]
            sync = i == accum - 1 or not rt.distributed  # DDP all-reduces gradients on the last micro-batch only
            with (contextlib.nullcontext() if sync else self.train_model.no_sync()), autocast(rt.device, self.precision):
                logits = self.train_model(x)
                loss = F.cross_entropy(logits.float(), y, label_smoothing=config.label_smoothing) / accum
            self.scaler.scale(loss).backward()
            loss_sum += loss.detach()
        if rt.distributed:
            torch.distributed.all_reduce(loss_sum)
            loss_sum /= rt.world_size
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), config.max_grad_norm if config.max_grad_norm > 0 else math.inf)
        loss_value = loss_sum.item()
        # fp16's scaler skips steps with overflowing gradients by design; elsewhere a non-finite value is fatal.
        if not math.isfinite(loss_value) or (self.precision != "fp16" and not torch.isfinite(grad_norm)):
            what = f"loss is {loss_value}" if not math.isfinite(loss_value) else f"gradient norm is {grad_norm.item()}"
            raise TrainingError(
                f"{what} at step {self.step + 1}; stopped, the last good checkpoint {self.out_dir / 'last.pt'} (step {self.saved_step}) is kept"
            )
        self.scaler.step(self.optimizer)
        self.scaler.update(config.loss_scale if self.precision == "fp16" and config.loss_scale > 0 else None)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_value

    def run_eval(self, data) -> dict:
        config, rt = self.config, self.rt
        shards = eval_batches(data, config.img_size, config.eval_batch_size, rt.device, rt.rank, rt.world_size, config.num_workers)
        total = math.ceil(len(data) / rt.world_size / config.eval_batch_size)
        return evaluate(self.train_model, shards, len(self.class_names), rt.device, self.precision, total, rt.is_main, rt.distributed)

    def evaluate_and_save(self, bar) -> None:
        if not all(torch.isfinite(p).all() for p in self.model.parameters()):
            raise TrainingError(
                f"weights became non-finite at step {self.step}; stopped, the last good checkpoint "
                f"{self.out_dir / 'last.pt'} (step {self.saved_step}) is kept"
            )
        result = self.run_eval(self.val_data)
        improved = result["accuracy"] > self.best["accuracy"]
        if improved:
            self.best = {"accuracy": result["accuracy"], "step": self.step}
        if self.rt.is_main:
            tag = "test" if self.config.val_split == 0 else "val"
            self.log.write(self.step, **{f"{tag}/loss": result["loss"], f"{tag}/accuracy": result["accuracy"]})
            bar.write(f"step {self.step}: {tag} accuracy {result['accuracy']:.4f}, loss {result['loss']:.4f} "
                      f"(best {self.best['accuracy']:.4f} at step {self.best['step']})")  # fmt: skip
            if improved:
                self.save("best.pt")
            self.save("last.pt")
        self.saved_step = self.step

    def save(self, filename: str) -> None:
        payload = {
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "model_config": self.model.config.to_dict(), "class_names": self.class_names, "train_config": self.config.to_dict(),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
            "step": self.step, "best": self.best,
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state(self.rt.device) if self.rt.device.type == "cuda" else None},
        }  # fmt: skip
        checkpoints.save_checkpoint(payload, self.out_dir / filename)

    def finish(self) -> dict:
        """Final metrics; the test split, if held apart, evaluated once on the best checkpoint."""
        seconds = self.train_seconds
        final = {"best_val_accuracy": self.best["accuracy"], "best_step": self.best["step"], "steps": self.step,
                 "train_seconds": seconds, "images_per_second": self.images_seen / seconds if seconds else 0.0}  # fmt: skip
        if self.config.val_split == 0:
            final["test_accuracy"] = self.best["accuracy"]
        elif self.test_data is not None:
            # A run resumed from another run's checkpoint that never beat that run's best has no best.pt
            # of its own: its test is of the weights it ends with.
            best_path = self.out_dir / "best.pt"
            best_state = checkpoints.read_checkpoint(best_path)["model"] if self.rt.is_main and best_path.is_file() else None
            if self.rt.distributed:
                holder = [best_state]
                torch.distributed.broadcast_object_list(holder, src=0)
                best_state = holder[0]
            if best_state is not None:
                self.model.load_state_dict(best_state)
            elif self.rt.is_main:
                print(f"no {best_path}: testing the final weights")
            test = self.run_eval(self.test_data)
            final.update(test_accuracy=test["accuracy"], test_loss=test["loss"], test_top5_accuracy=test["top5_accuracy"])
            if self.rt.is_main:
                self.log.write(self.step, **{"test/accuracy": test["accuracy"], "test/loss": test["loss"]})
                print(f"test accuracy of the best checkpoint (step {self.best['step']}): {test['accuracy']:.4f}")
        if self.rt.is_main:
            (self.out_dir / "final_metrics.json").write_text(json.dumps(final, indent=2) + "\n")
            self.log.close()
            print(json.dumps(final))
        return final

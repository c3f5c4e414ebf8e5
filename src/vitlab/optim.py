"""What trains the weights: the optimizers (which parameters get weight decay, which get Muon) and the learning-rate
schedule, a pure function of the step."""

from __future__ import annotations

import math

import torch

from .config import TrainConfig
from .model import VisionTransformer


def lr_factor(step: int, warmup_steps: int, total_steps: int, decay_type: str) -> float:
    """The seed's schedule (WarmupCosineSchedule / WarmupLinearSchedule): linear warmup from 0, then
    cosine or linear decay to 0 at `total_steps`. Multiplies the base learning rate at `step`."""
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if decay_type == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    return max(0.0, (total_steps - step) / max(1.0, total_steps - warmup_steps))


def set_learning_rate(optimizer: torch.optim.Optimizer, config: TrainConfig, step: int) -> float:
    """Every group's learning rate for `step` of the schedule; returns the base rate at that step."""
    lr = config.learning_rate * lr_factor(step, config.warmup_steps, config.num_steps, config.decay_type)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


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

"""What trains the weights: the optimizers (which parameters get weight decay, which get Muon) and
the learning-rate schedule, a pure function of the step."""

from __future__ import annotations

import math

import torch

from .config import TrainConfig
from .model import VisionTransformer


def lr_factor(step: int, warmup_steps: int, total_steps: int, decay_type: str) -> float:
    """The tutorial's schedule (WarmupCosineSchedule / WarmupLinearSchedule): linear warmup from 0,
    then cosine or linear decay to 0 at `total_steps`. Multiplies the base learning rate at
    `step`."""
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if decay_type == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    return max(0.0, (total_steps - step) / max(1.0, total_steps - warmup_steps))


def set_learning_rate(optimizer: torch.optim.Optimizer, config: TrainConfig, step: int) -> float:
    """Every group's learning rate for `step` of the schedule (times its layer's scale); returns the
    base rate."""
    lr = config.learning_rate * lr_factor(
        step, config.warmup_steps, config.num_steps, config.decay_type
    )
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    return lr


def freeze(model: VisionTransformer, what: str) -> None:
    """Stop training part of the model: "backbone", the stem before the transformer (the hybrid's
    ResNet, a plain ViT's patch embedding); "all-but-head", everything but the head (a linear
    probe); "none", nothing."""
    if what == "none":
        return
    head = {id(p) for p in model.head.parameters()}
    stem = {id(p) for p in (*model.stem.parameters(), *model.patch_embed.parameters())}
    for p in model.parameters():
        if (what == "backbone" and id(p) in stem) or (what == "all-but-head" and id(p) not in head):
            p.requires_grad_(False)


def layer_of(name: str, depth: int) -> int:
    """0 for the embeddings, i + 1 for block i, depth + 1 for what follows the blocks (the BEiT/timm
    numbering)."""
    if name.startswith(("cls_token", "pos_embed", "patch_embed", "stem")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def _groups(
    model: VisionTransformer, config: TrainConfig, params: list[str], decayed
) -> list[dict]:
    """Parameter groups by layer (each with its learning-rate scale, `layer_decay` ** layers above
    it) and by decay."""
    depth, named = model.config.depth, dict(model.named_parameters())
    groups: dict[tuple[int, bool], dict] = {}
    for name in params:
        # One layer when nothing decays
        layer = layer_of(name, depth) if config.layer_decay < 1 else depth + 1
        decay = decayed(name, named[name])
        group = groups.setdefault(
            (layer, not decay),
            {
                "params": [],
                "weight_decay": config.weight_decay if decay else 0.0,
                "lr_scale": config.layer_decay ** (depth + 1 - layer),
            },
        )
        group["params"].append(named[name])
    return [groups[key] for key in sorted(groups)]


def configure_optimizer(model: VisionTransformer, config: TrainConfig) -> torch.optim.Optimizer:
    """SGD as the tutorial (weight decay on every parameter); AdamW decays only matrices, not norms,
    biases, class token and position embeddings; Muon takes the encoder blocks' matrices and AdamW
    the rest. Frozen parameters are left out; with `layer_decay` < 1 each layer's learning rate is
    scaled (layer-wise decay, BEiT)."""
    trained = [name for name, p in model.named_parameters() if p.requires_grad]
    if config.optimizer == "sgd":
        groups = _groups(model, config, trained, lambda name, p: True)
        return torch.optim.SGD(groups, lr=config.learning_rate, momentum=config.momentum)
    hidden = (
        {n for n in trained if n.startswith("blocks.") and model.get_parameter(n).ndim == 2}
        if config.optimizer == "muon"
        else set()
    )
    undecayed = lambda name, p: p.ndim < 2 or name in ("pos_embed", "cls_token")  # noqa: E731
    adamw = torch.optim.AdamW(
        _groups(
            model, config, [n for n in trained if n not in hidden], lambda n, p: not undecayed(n, p)
        ),
        lr=config.learning_rate,
        betas=config.adam_betas,
    )
    if config.optimizer == "adamw":
        return adamw
    # Muon is for hidden layers' matrices: the patch embedding, head and vectors stay with AdamW, as
    # its authors advise. "match_rms_adamw" scales its orthogonal updates to AdamW's size, so both
    # share one lr and decay.
    muon = torch.optim.Muon(
        _groups(model, config, [n for n in trained if n in hidden], lambda n, p: True),
        lr=config.learning_rate,
        adjust_lr_fn="match_rms_adamw",
    )
    return Combined(muon=muon, adamw=adamw)


class Combined(torch.optim.Optimizer):
    """Several optimizers, each over its own parameters, stepped as one: one learning-rate schedule
    moves every group (they are the same group dicts), one gradient scaler, one state dict keyed by
    name."""

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
            raise ValueError(
                f"optimizer state for {sorted(state_dict)}, this run has {sorted(self.parts)}"
            )
        for name, part in self.parts.items():
            part.load_state_dict(state_dict[name])

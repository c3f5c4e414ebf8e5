"""The optimizers and the schedule: the tutorial's warmup and decay, which parameters Muon and AdamW take and decay,
Muon's orthogonalised updates, and the combined optimizer's state."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from vitlab.config import TrainConfig
from vitlab.model import VisionTransformer
from vitlab.optim import configure_optimizer, freeze, lr_factor, set_learning_rate

from conftest import TINY


def _one_step(model: VisionTransformer, optimizer: torch.optim.Optimizer, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    images, labels = (
        torch.randn(8, 3, 16, 16, generator=generator),
        torch.randint(0, 3, (8,), generator=generator),
    )
    optimizer.zero_grad()
    torch.nn.functional.cross_entropy(model(images), labels).backward()
    optimizer.step()


def test_lr_factor_cosine():
    warmup, total = 10, 110
    f = lambda step: lr_factor(step, warmup, total, "cosine")  # noqa: E731  a one-line helper
    assert f(0) == 0.0
    assert f(5) == pytest.approx(0.5)
    assert f(1) == pytest.approx(0.1)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.5)  # half-way through the decay
    assert f(35) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))  # a quarter of the way: 0.8536
    assert f(85) == pytest.approx(0.5 * (1 + math.cos(3 * math.pi / 4)))  # three quarters: 0.1464
    assert f(110) == pytest.approx(0.0, abs=1e-12)
    values = [f(s) for s in range(10, 111)]
    assert all(a >= b for a, b in itertools.pairwise(values))  # decays monotonically


def test_lr_factor_linear():
    warmup, total = 10, 110
    f = lambda step: lr_factor(step, warmup, total, "linear")  # noqa: E731  a one-line helper
    assert f(0) == 0.0
    assert f(5) == pytest.approx(0.5)
    assert f(10) == pytest.approx(1.0)
    assert f(35) == pytest.approx(0.75)
    assert f(60) == pytest.approx(0.5)
    assert f(85) == pytest.approx(0.25)
    assert f(110) == 0.0
    assert f(130) == 0.0  # never negative


def test_lr_factor_without_warmup():
    assert lr_factor(0, 0, 100, "cosine") == pytest.approx(1.0)
    assert lr_factor(0, 0, 100, "linear") == pytest.approx(1.0)
    assert lr_factor(50, 0, 100, "cosine") == pytest.approx(0.5)
    assert lr_factor(50, 0, 100, "linear") == pytest.approx(0.5)
    assert lr_factor(100, 0, 100, "cosine") == pytest.approx(0.0, abs=1e-12)


def tiny_model() -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(
        TrainConfig.from_dict(dict(name="x", **TINY, dropout_rate=0.0)).model_config(3)
    )


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    model = tiny_model()
    optimizer = configure_optimizer(
        model, TrainConfig(name="x", optimizer="muon", weight_decay=0.05)
    )
    muon, adamw = optimizer.parts["muon"], optimizer.parts["adamw"]
    in_muon = {id(p) for g in muon.param_groups for p in g["params"]}
    assert in_muon == {
        id(p) for name, p in model.named_parameters() if name.startswith("blocks.") and p.ndim == 2
    }
    decayed, undecayed = ({id(p) for p in g["params"]} for g in adamw.param_groups)
    assert [g["weight_decay"] for g in adamw.param_groups] == [0.05, 0.0] and muon.param_groups[0][
        "weight_decay"
    ] == 0.05
    assert {id(model.head.weight), id(model.patch_embed.weight)} <= decayed and id(
        model.pos_embed
    ) in undecayed
    everything = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert sorted(everything) == sorted(id(p) for p in model.parameters())  # each parameter once
    torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5)  # one schedule moves both
    assert {g["lr"] for part in (muon, adamw) for g in part.param_groups} == {
        0.5 * TrainConfig().learning_rate
    }


def test_adamw_decays_matrices_but_not_positions_class_token_norms_or_biases():
    model = tiny_model()
    decayed, undecayed = configure_optimizer(
        model, TrainConfig(name="x", optimizer="adamw", weight_decay=0.05)
    ).param_groups
    names = {id(p): name for name, p in model.named_parameters()}
    assert decayed["weight_decay"] == 0.05 and undecayed["weight_decay"] == 0.0
    assert {names[id(p)] for p in undecayed["params"]} == {
        n for n, p in model.named_parameters() if p.ndim < 2
    } | {"cls_token", "pos_embed"}
    assert all(names[id(p)].endswith("weight") for p in decayed["params"])


def test_muon_updates_are_orthogonalised():
    model = tiny_model()
    optimizer = configure_optimizer(
        model, TrainConfig(name="x", optimizer="muon", learning_rate=1.0, weight_decay=0.0)
    )
    generator = torch.Generator().manual_seed(0)
    for p in model.parameters():
        # Singular values 0.01 to 1
        p.grad = torch.randn(p.shape, generator=generator) * torch.logspace(-2, 0, p.shape[-1])
    weight = model.blocks[0].mlp.fc1.weight  # (32, 16)
    before = weight.detach().clone()
    optimizer.step()
    # Newton-Schulz puts every singular value of the update near 1 (0.5 to 1.5 by design), times match_rms_adamw's 0.2 sqrt(32)
    singular = torch.linalg.svdvals(before - weight.detach()) / (0.2 * math.sqrt(32))
    assert singular.min() > 0.3 and singular.max() < 1.7


def test_combined_optimizer_state_round_trip(tmp_path):
    config = TrainConfig(name="x", optimizer="muon", learning_rate=1e-2, weight_decay=0.05)
    model = tiny_model()
    optimizer = configure_optimizer(model, config)
    for seed in range(3):
        _one_step(model, optimizer, seed)
    copy = tiny_model()
    copy.load_state_dict(model.state_dict())
    restored = configure_optimizer(copy, config)
    torch.save(optimizer.state_dict(), tmp_path / "optimizer.pt")
    restored.load_state_dict(torch.load(tmp_path / "optimizer.pt", weights_only=True))
    for m, o in ((model, optimizer), (copy, restored)):
        _one_step(m, o, seed=3)
    for (name, a), b in zip(model.state_dict().items(), copy.state_dict().values(), strict=False):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="optimizer state for"):
        restored.load_state_dict(
            configure_optimizer(tiny_model(), TrainConfig(name="x", optimizer="adamw")).state_dict()
        )


def test_layer_decay_scales_each_layers_learning_rate():
    model = tiny_model()  # depth 1: embeddings are layer 0, the block 1, the rest 2
    config = TrainConfig.from_dict(
        dict(name="x", optimizer="adamw", layer_decay=0.5, weight_decay=0.05)
    )
    optimizer = configure_optimizer(model, config)
    scale_of = {id(p): g["lr_scale"] for g in optimizer.param_groups for p in g["params"]}
    assert scale_of[id(model.pos_embed)] == scale_of[id(model.patch_embed.weight)] == 0.25
    assert scale_of[id(model.blocks[0].mlp.fc1.weight)] == 0.5
    assert scale_of[id(model.head.weight)] == scale_of[id(model.norm.weight)] == 1.0
    set_learning_rate(optimizer, config, config.warmup_steps)  # the peak
    lrs = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    assert lrs[id(model.pos_embed)] == pytest.approx(0.25 * config.learning_rate)
    # Decay still by kind within each layer
    assert {g["weight_decay"] for g in optimizer.param_groups} == {
        0.0,
        0.05,
    }


@pytest.mark.parametrize(
    "what, trained", [("all-but-head", {"head.weight", "head.bias"}), ("backbone", None)]
)
def test_freezing_leaves_parameters_out_of_the_optimizer_and_unchanged(what, trained):
    model = tiny_model()
    freeze(model, what)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    if trained is None:  # the stem: a plain ViT's patch embedding
        trained = {n for n, _ in model.named_parameters() if not n.startswith("patch_embed.")}
    assert names == trained
    optimizer = configure_optimizer(model, TrainConfig.from_dict(dict(name="x", learning_rate=0.5)))
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {
        id(p) for p in model.parameters() if p.requires_grad
    }
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        model.head.weight.normal_()  # a head that passes gradients back
    _one_step(model, optimizer, seed=0)
    for n, p in model.named_parameters():
        if n not in trained:
            assert torch.equal(p, before[n]), n

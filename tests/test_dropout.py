"""vitlab's CPU dropout: the drop rate is p (every float32 uniform enumerated, and counts within many standard
deviations at fixed seeds), kept values are scaled exactly and gradients masked alike, the masks follow the seed and
step and are replayed by gradient checkpointing, and torch's own dropout runs wherever the sparse path does not."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from vitlab import dropout, fastpaths, randomness
from vitlab.dropout import (
    Dropout,
    DroppedLinear,
    DroppedMlp,
    dropped_positions,
    gaps_of,
    use_sparse_dropout,
)
from vitlab.model import create_model

from conftest import randomise_parameters

# Counts of events are held within this many standard deviations of their expected value: at fixed seeds the counts
# are fixed numbers, and a correct sampler lands outside 7 sigmas once in about 10^11 draws of the seed.
SIGMAS = 7


@pytest.mark.parametrize("p", [0.1, 0.5, 0.3, 1e-4])
def test_the_gaps_of_every_float32_uniform_give_rate_p_to_2_to_the_minus_22(p):
    # torch.rand's float32 uniforms are the multiples of 2^-24 in [0, 1), each as likely: through the sampler's own
    # arithmetic they give the exact distribution of a gap; a Bernoulli(p) sequence's gaps are geometric.
    grid = torch.arange(2**24, dtype=torch.float64).mul_(2.0**-24).float()
    pmf = torch.bincount(gaps_of(grid, p)).double() / 2**24
    k = torch.arange(pmf.numel(), dtype=torch.float64)
    assert pmf[0] == 0  # every gap at least 1: no position drawn twice
    tail = 1 - pmf.cumsum(0)  # P(gap > k)
    assert (tail - (1 - p) ** k).abs().max() <= 2.0**-22
    rate = 1 / (pmf * k).sum().item()  # the share of positions dropped
    assert abs(rate - p) <= 2.0**-22


def test_the_uniforms_lie_on_the_grid_the_enumeration_assumes():
    u = dropout.uniforms(2**62 - 1, 0, 100_000).double() * 2**24
    assert torch.equal(u, u.floor()) and u.min() >= 0 and u.max() < 2**24
    assert abs(u.mean().item() / 2**24 - 0.5) < SIGMAS * math.sqrt(1 / 12 / 100_000)


def test_the_uniforms_taken_up_from_any_start_are_the_streams_own():
    whole = dropout.uniforms(77, 0, 5_001)
    for start in (1, 2, 999, 2_500):  # odd starts take up a 64-bit output half drawn
        assert torch.equal(dropout.uniforms(77, start, 5_001 - start), whole[start:])
    assert not torch.equal(dropout.uniforms(78, 0, 5_001), whole)


@pytest.mark.parametrize("p", [0.01, 0.1, 0.25, 0.5])
def test_drop_counts_lie_within_many_sigmas_of_p(p):
    # The count of dropped elements, in each half, and of adjacent pairs both dropped (p^2 if independent).
    n = 1_000_000
    torch.manual_seed(12)
    dropped = torch.zeros(n, dtype=torch.bool)
    dropped[dropped_positions(n, p)] = True
    for part in (dropped, dropped[: n // 2], dropped[n // 2 :]):
        expected, sigma = part.numel() * p, math.sqrt(part.numel() * p * (1 - p))
        assert abs(part.sum().item() - expected) <= SIGMAS * sigma
    pairs = (dropped[1:] & dropped[:-1]).sum().item()
    # Overlapping pairs: variance n (q (1 - q) + 2 p^3 (1 - p)) below 3 n q, q = p^2
    q = p * p
    assert abs(pairs - (n - 1) * q) <= SIGMAS * math.sqrt(3 * n * q)


def test_positions_are_the_same_when_the_first_draw_runs_short(monkeypatch):
    # The second draw goes on from the last position: the same uniforms, so the same positions.
    torch.manual_seed(3)
    whole = dropped_positions(100_000, 0.1)
    monkeypatch.setattr(dropout, "_MARGIN_SIGMAS", -5)  # 5 sigmas short: several draws
    torch.manual_seed(3)
    pieced = dropped_positions(100_000, 0.1)
    assert torch.equal(pieced, whole)
    assert whole[-1] < 100_000 and torch.all(whole[1:] > whole[:-1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_kept_values_are_scaled_exactly_and_gradients_masked_alike(dtype):
    p = 0.1
    x = (torch.rand(4, 33, 40, generator=torch.Generator().manual_seed(0)) + 0.5).to(dtype)
    x.requires_grad_()
    upstream = torch.randn(4, 33, 40, generator=torch.Generator().manual_seed(1)).to(dtype)
    torch.manual_seed(2)
    y = Dropout(p).train()(x)
    y.backward(upstream)
    assert y.dtype == dtype and x.grad.dtype == dtype
    kept = y != 0  # x has no zeros: a zero is a dropped element
    # torch scales by 1/(1-p) in float32 (float64 for float64 tensors), rounding the product once to the dtype
    scale = torch.tensor(
        1 / (1 - p), dtype=torch.float64 if dtype == torch.float64 else torch.float32
    )
    expected = (x.detach().double() * scale.double()).to(scale.dtype).to(dtype)
    assert torch.equal(y.detach()[kept], expected[kept])
    grad_expected = (upstream.double() * scale.double()).to(scale.dtype).to(dtype)
    assert torch.equal(x.grad, torch.where(kept, grad_expected, torch.zeros((), dtype=dtype)))
    assert 0 < (~kept).sum() < x.numel()


def test_a_non_contiguous_input_is_dropped_by_its_own_element_order():
    x = torch.rand(40, 30).t() + 0.5  # (30, 40), transposed
    torch.manual_seed(4)
    y = Dropout(0.2).train()(x)
    torch.manual_seed(4)
    z = Dropout(0.2).train()(x.contiguous())
    assert torch.equal(y, z)


def test_the_masks_follow_the_seed_and_step():
    layer = Dropout(0.1).train()
    x = torch.ones(64, 50)

    def mask(step: int) -> torch.Tensor:
        torch.manual_seed(randomness.stream_seed(5, "dropout", step))
        return layer(x) == 0

    assert torch.equal(mask(7), mask(7))
    assert not torch.equal(mask(7), mask(8))


def test_checkpointing_recomputes_the_same_masks():
    layer = nn.Sequential(nn.Linear(24, 24), Dropout(0.3), nn.Linear(24, 24)).train()
    x = torch.randn(16, 24, generator=torch.Generator().manual_seed(0))
    grads = []
    for recompute in (False, True):
        layer.zero_grad()
        torch.manual_seed(6)
        out = checkpoint(layer, x, use_reentrant=False) if recompute else layer(x)
        out.square().sum().backward()
        grads.append([p.grad.clone() for p in layer.parameters()])
    for plain, recomputed in zip(*grads, strict=True):
        assert torch.equal(plain, recomputed)


def test_evaluation_and_rate_zero_are_the_identity():
    x = torch.randn(8, 10)
    assert Dropout(0.1).eval()(x) is x
    assert Dropout(0.0).train()(x) is x


@pytest.mark.parametrize("case", ["fast paths off", "rate above one half", "in place"])
def test_torch_dropout_runs_where_the_sparse_path_does_not(case, monkeypatch):
    p, inplace = 0.1, False
    if case == "fast paths off":
        monkeypatch.setenv("VITLAB_FASTPATHS", "off")
    elif case == "rate above one half":
        p = 0.7
    else:
        inplace = True
    x = torch.randn(32, 40, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(9)
    want = F.dropout(x.clone(), p, True, inplace)
    torch.manual_seed(9)
    got = Dropout(p, inplace).train()(x.clone())
    assert torch.equal(got, want)


def tiny(dropout_rate: float):
    return create_model(
        "Ti/16", img_size=16, patch_size=4, depth=2, num_classes=3, dropout_rate=dropout_rate
    )


def test_the_model_uses_it_for_every_dropout_fused_in_its_blocks_and_keeps_its_state_dict():
    model = tiny(0.1)
    assert type(model.pos_drop) is Dropout and model.pos_drop.p == 0.1
    for block in model.blocks:
        assert type(block.mlp) is DroppedMlp and block.mlp.drop.p == 0.1
        assert type(block.attn.proj) is DroppedLinear and block.attn.proj.p == 0.1
        assert isinstance(block.drop, nn.Identity) and type(block.attn.attn_drop) is Dropout
    assert model.state_dict().keys() == tiny(0.0).state_dict().keys()
    plain = nn.Sequential(nn.Dropout(0.2))
    assert type(use_sparse_dropout(plain)[0]) is Dropout and plain[0].p == 0.2


def test_a_rate_set_on_the_models_dropout_modules_reaches_every_fused_dropout():
    # Setting every nn.Dropout's p (timm's way, the benchmarks') must reach the fused layers too
    model = tiny(0.1).train()
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(images), model.eval()(images))
    assert all(block.attn.proj.p == 0.0 for block in model.blocks)


def unfused_twin(model):
    """The same model with its dropout unfused: vitlab's Dropout after each layer, as model.py writes it."""
    twin = tiny(0.0)  # rate 0: nothing fused
    twin.load_state_dict(model.state_dict())
    for name, layer in twin.named_modules():
        if isinstance(layer, Dropout) and not name.endswith("attn_drop"):
            layer.p = model.config.dropout_rate
    return twin.to(next(model.parameters()).dtype)


def outputs_and_gradients(model, images, seed: int = 5):
    model.zero_grad()
    torch.manual_seed(seed)
    out = model.train()(images)
    out.square().sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_the_fused_blocks_draw_the_same_masks_and_compute_the_same_function():
    # In float64 the 1/(1-p) folded into fc2's and the projection's weights moves results by float64's rounding only;
    # a mask drawn otherwise would move them by the size of the dropped elements.
    model = randomise_parameters(tiny(0.1), seed=2, std=0.3).double()
    twin = unfused_twin(model)
    images = torch.rand(
        3, 3, 16, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64
    )
    got, got_grads = outputs_and_gradients(model, images)
    want, want_grads = outputs_and_gradients(twin, images)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-10, atol=1e-12, msg=name)
    assert (got - outputs_and_gradients(twin, images, seed=6)[0]).abs().max() > 1e-3  # another mask


@pytest.mark.parametrize("onednn", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_fused_dropouts_zero_fresh_tensors_that_autograd_need_not_copy(
    dtype, onednn, monkeypatch
):
    # Zeroing a view in place makes autograd copy the whole gradient through CopySlices and AsStridedBackward.
    monkeypatch.setattr(fastpaths, "onednn_linear_faster", lambda *args: onednn)
    model = tiny(0.1).train()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        logits = model(torch.rand(2, 3, 16, 16))
    seen, stack = set(), [logits.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and node not in seen:
            seen.add(node)
            stack.extend(next_node for next_node, _ in node.next_functions)
    names = {type(node).__name__ for node in seen}
    assert "_ZeroAtBackward" in names and "_GeluZeroAtBackward" in names
    assert not names & {"CopySlices", "AsStridedBackward0"}


@pytest.mark.parametrize("case", ["evaluation", "fast paths off"])
def test_the_fused_blocks_are_the_plain_computation_elsewhere(case, monkeypatch):
    model = randomise_parameters(tiny(0.1), seed=2, std=0.3)
    twin = unfused_twin(model)
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    if case == "evaluation":
        with torch.no_grad():
            assert torch.equal(model.eval()(images), twin.eval()(images))
        return
    monkeypatch.setenv(
        "VITLAB_FASTPATHS", "off"
    )  # torch's dropout in both, the same draws in the same order
    got, got_grads = outputs_and_gradients(model, images)
    want, want_grads = outputs_and_gradients(twin, images)
    assert torch.equal(got, want)
    for name, grad in want_grads.items():
        assert torch.equal(got_grads[name], grad), name

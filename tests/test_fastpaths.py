"""The fast paths: each equals the plain computation, turns itself off when its self-check fails (raises or
disagrees), runs where its timing verdict says it is faster (tests/test_timings.py), an AVX2 CPU imitated by
environment variables, and the memory settings."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from vitlab import fastpaths, timings
from vitlab.fastpaths import Linear
from vitlab.model import create_model

from rounding import ELEMENTWISE_ULPS, assert_within, sum_bound, ulps

AVX2_IMITATION = {
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
}


@pytest.fixture(autouse=True)
def fresh_verdicts():
    """Every test sees the self-checks run anew, and leaves none of its verdicts behind."""
    for path in (fastpaths.ONEDNN_LINEAR, fastpaths.SDPA):
        path.verdicts.clear(), path.reasons.clear()
    yield
    for path in (fastpaths.ONEDNN_LINEAR, fastpaths.SDPA):
        path.verdicts.clear(), path.reasons.clear()


def force_policy_on(monkeypatch):
    """Every fast path taken as the faster, whatever its timing here, so that their checks and fallbacks run on any
    machine."""
    monkeypatch.setattr(timings, "faster", lambda path, case, ways: True)


# Max |gelu'| and |gelu''| over the reals, both forms (computed in float64)
GELU_SLOPE, GELU_CURVATURE = (
    1.129,
    0.798,
)


def linear_rounding_bounds(x, weight, bias, grad_out, gelu, dtype):
    """How far two computations of act(x @ weight.T + bias) and its three gradients may lie apart when they differ
    only in their kernels' summation orders (and, at inference, a GELU fused on the float32 accumulator), elementwise.
    Under bf16 autocast both sides round the inputs alike, accumulate in float32 and round each result to bf16."""
    narrow = dtype != torch.float32
    x, weight, bias, grad_out = (t.detach().to(dtype).double() for t in (x, weight, bias, grad_out))

    def rounded(value):  # the two results rounded to the output type: one unit apart at most
        return ulps(value, dtype) if narrow else torch.zeros_like(value)

    pre = x @ weight.T + bias
    pre_bound = sum_bound(weight.shape[1] + 1, x.abs() @ weight.abs().T + bias.abs()) + rounded(pre)
    if gelu is None:
        out, out_bound, grad_pre, grad_pre_bound = pre, pre_bound, grad_out, torch.zeros_like(pre)
    else:
        out = F.gelu(pre, approximate=gelu)
        # The GELU of inputs that differ, by implementations within a few units of its exact value.
        out_bound = (
            GELU_SLOPE * pre_bound + rounded(out) + ulps(out, torch.float32, ELEMENTWISE_ULPS)
        )
        slope = torch.autograd.functional.jacobian(lambda t: F.gelu(t, approximate=gelu).sum(), pre)
        grad_pre = grad_out * slope
        grad_pre_bound = grad_out.abs() * GELU_CURVATURE * pre_bound + rounded(grad_pre)
    tokens = grad_pre.reshape(-1, grad_pre.shape[-1])
    x_flat, bound_flat = x.reshape(-1, x.shape[-1]), grad_pre_bound.reshape(tokens.shape)
    grad_x = tokens @ weight
    grad_w = tokens.T @ x_flat
    grad_b = tokens.sum(0)
    bounds = (
        bound_flat @ weight.abs()
        + sum_bound(weight.shape[0], tokens.abs() @ weight.abs())
        + rounded(grad_x),
        bound_flat.T @ x_flat.abs()
        + sum_bound(tokens.shape[0], tokens.abs().T @ x_flat.abs())
        + rounded(grad_w),
        bound_flat.sum(0) + sum_bound(tokens.shape[0], tokens.abs().sum(0)) + rounded(grad_b),
    )
    return out_bound, (bounds[0].reshape(x.shape), *bounds[1:])


@pytest.mark.parametrize("gelu", [None, "tanh", "none"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("policy", ["this CPU's", "all on"])
def test_linear_equals_nn_linear_forward_and_backward(gelu, precision, policy, monkeypatch):
    # vitlab's Linear (oneDNN, bias and GELU fused, where on) against F.linear and F.gelu under the same autocast,
    # to the rounding that their other summation orders allow (tests/rounding.py).
    if policy == "all on":
        force_policy_on(monkeypatch)
    torch.manual_seed(0)
    layer = Linear(48, 80, gelu=gelu)
    x = torch.randn(3, 9, 48, requires_grad=True)
    # (3, 9, 80), not contiguous, as autograd may pass it
    grad_out = torch.randn(80, 9, 3).permute(2, 1, 0)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        got = layer(x)
        expected = F.linear(x, layer.weight, layer.bias)
        expected = expected if gelu is None else F.gelu(expected, approximate=gelu)
        with torch.no_grad():
            inferred = layer(x)
    want = torch.bfloat16 if precision == "bf16" else torch.float32
    assert got.dtype == inferred.dtype == expected.dtype == want
    out_bound, grad_bounds = linear_rounding_bounds(
        x, layer.weight, layer.bias, grad_out, gelu, want
    )
    assert_within(got, expected, out_bound, "training output")
    assert_within(inferred, expected, out_bound, "inference output")
    grads = torch.autograd.grad(got, (x, layer.weight, layer.bias), grad_out)
    expected_grads = torch.autograd.grad(expected, (x, layer.weight, layer.bias), grad_out)
    for name, g, e, bound in zip(
        ("input", "weight", "bias"), grads, expected_grads, grad_bounds, strict=False
    ):
        # fp32 gradients for the fp32 parameters, as autocast gives
        assert g.dtype == e.dtype == torch.float32
        assert_within(g, e, bound, f"{name} gradient")


def test_the_rounding_bounds_tell_a_wrong_linear_layer_apart():
    # The bounds above are tight enough to fail the errors a fast path could make: the other GELU form, a bias lost.
    torch.manual_seed(0)
    x, weight, bias = torch.randn(3, 9, 48), torch.randn(80, 48) / 7, torch.randn(80) / 7
    out_bound, _ = linear_rounding_bounds(
        x, weight, bias, torch.randn(3, 9, 80), "tanh", torch.float32
    )
    pre = F.linear(x, weight, bias)
    with pytest.raises(AssertionError):
        assert_within(F.gelu(pre), F.gelu(pre, approximate="tanh"), out_bound)
    with pytest.raises(AssertionError):
        assert_within(
            F.gelu(F.linear(x, weight), approximate="tanh"),
            F.gelu(pre, approximate="tanh"),
            out_bound,
        )


def test_linear_runs_through_onednn_where_it_is_on_and_f_linear_elsewhere(monkeypatch):
    force_policy_on(monkeypatch)
    layer = Linear(16, 8)
    x = torch.randn(4, 16, requires_grad=True)
    on = fastpaths.onednn_linear_usable(torch.float32)
    assert type(layer(x).grad_fn).__name__ == ("_OneDnnLinearBackward" if on else "AddmmBackward0")
    # What oneDNN is not asked to do goes to F.linear: float64, and tracing (exporters see a plain linear).
    assert type(layer.double()(x.double()).grad_fn).__name__ == "AddmmBackward0"
    traced = torch.jit.trace(layer.float(), (x.detach(),))
    assert "mkldnn" not in str(traced.graph) and "linear" in str(traced.graph)
    with pytest.raises(RuntimeError):  # no autocast: mixed dtypes are an error, as in nn.Linear
        layer(x.bfloat16())


def small_model(**overrides):
    torch.manual_seed(0)
    model = create_model(
        "Ti/16",
        img_size=16,
        patch_size=4,
        depth=2,
        hidden_size=32,
        num_heads=2,
        mlp_dim=64,
        num_classes=5,
        dropout_rate=0.0,
        **overrides,
    )
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model


def logits_and_gradients(model, precision: str):
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        logits = model(images)
    logits.float().square().sum().backward()
    return logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def assert_same_as_plain(model, precision, monkeypatch):
    got, got_grads = logits_and_gradients(model, precision)
    with monkeypatch.context() as m:
        m.setenv("VITLAB_FASTPATHS", "off")
        m.setattr(timings, "faster", lambda path, case, ways: False)
        plain, plain_grads = logits_and_gradients(model, precision)
    torch.testing.assert_close(got, plain, rtol=0, atol=0)
    for name in plain_grads:
        torch.testing.assert_close(got_grads[name], plain_grads[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_linear_path_that_raises_is_off_and_the_model_computes_as_plain_torch(
    precision, monkeypatch
):
    force_policy_on(monkeypatch)

    def broken(*args, **kwargs):
        raise RuntimeError(
            "could not create a primitive descriptor for the inner product forward propagation primitive"
        )

    monkeypatch.setattr(fastpaths, "onednn_linear", broken)
    model = small_model(attention_impl="sdpa")
    assert_same_as_plain(model, precision, monkeypatch)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    assert fastpaths.ONEDNN_LINEAR.verdicts[(dtype, None)] is False
    assert (
        "could not create a primitive descriptor" in fastpaths.ONEDNN_LINEAR.reasons[(dtype, None)]
    )


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_linear_path_that_answers_wrongly_is_off(precision, monkeypatch):
    force_policy_on(monkeypatch)

    # A tenth too large: beyond float tolerance in fp32 and bf16 alike
    def wrong(x, weight, bias, gelu=None):
        y = F.linear(x, weight, bias)
        return (y if gelu is None else F.gelu(y, approximate=gelu)) * 1.1

    monkeypatch.setattr(fastpaths, "onednn_linear", wrong)
    model = small_model(attention_impl="sdpa")
    assert_same_as_plain(model, precision, monkeypatch)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    assert "differs from the plain computation" in fastpaths.ONEDNN_LINEAR.reasons[(dtype, None)]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_fused_attention_that_raises_is_off_and_the_explicit_softmax_runs(precision, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no kernel for this dtype")

    monkeypatch.setattr(F, "scaled_dot_product_attention", broken)
    model = small_model(attention_impl="sdpa")
    got, got_grads = logits_and_gradients(model, precision)
    explicit = small_model(attention_impl="math")
    want, want_grads = logits_and_gradients(explicit, precision)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=0, atol=0, msg=name)


def test_the_checks_draw_nothing_from_the_global_generator(monkeypatch):
    # A resumed run must see the dropout masks of the uninterrupted one, whichever call ran the checks first.
    force_policy_on(monkeypatch)
    torch.manual_seed(3)
    state = torch.get_rng_state()
    fastpaths.describe("cpu")
    assert torch.equal(torch.get_rng_state(), state)


def test_describe_names_the_instruction_set_and_each_path():
    line = fastpaths.describe("cpu")
    assert line.startswith("fast paths: ") and "\n" not in line
    assert f"CPU {fastpaths.cpu_name()} ({fastpaths.instruction_set()})" in line
    for part in ("native bf16", "attention fp32", "attention bf16", "huge pages"):
        assert part in line


def test_vitlab_fastpaths_off_turns_every_path_off(monkeypatch):
    force_policy_on(monkeypatch)
    monkeypatch.setenv("VITLAB_FASTPATHS", "off")
    assert not fastpaths.enabled() and not fastpaths.onednn_linear_usable(torch.float32)
    assert not fastpaths.use_explicit_attention(torch.zeros(2, 3, 5, 8).bfloat16(), "auto")
    layer = Linear(16, 8)
    assert type(layer(torch.randn(4, 16, requires_grad=True)).grad_fn).__name__ == "AddmmBackward0"


@pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64"), reason="an x86 CPU's instruction sets"
)
def test_an_imitated_avx2_cpu_has_no_native_bf16_and_no_bf16_onednn_layers_yet_runs_bf16():
    # What an AVX2 machine reports: bf16 is emulated there, so `auto` precision picks fp32; an explicit bf16 run still
    # works (oneDNN refuses bf16 primitives at AVX2: the check catches it and turns them off).
    code = (
        "import torch, vitlab\n"
        "from vitlab import fastpaths\n"
        "m = vitlab.create_model('Ti/16', img_size=16, patch_size=4, depth=1, num_classes=3)\n"
        "with torch.autocast('cpu', dtype=torch.bfloat16):\n"
        "    y = m(torch.rand(2, 3, 16, 16))\n"
        "print(fastpaths.instruction_set(), fastpaths.native_bf16(torch.device('cpu')), fastpaths.onednn_linear_usable(torch.bfloat16), y.dtype)\n"
    )
    env = {**os.environ, **AVX2_IMITATION}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert done.stdout.split() == ["AVX2", "False", "False", "torch.bfloat16"]


@pytest.mark.parametrize("preset, expected", [(None, "1"), ("0", "0")])
def test_importing_vitlab_turns_on_huge_pages_unless_the_user_chose(preset, expected):
    # Large batches and activations on 4 KiB pages are faulted in page by page (half the 224 px pipeline's
    # speed here); vitlab asks torch for huge pages before torch starts, and keeps a value the user set.
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if preset is not None:
        env["THP_MEM_ALLOC_ENABLE"] = preset
    code = (
        "import os, vitlab, torch; torch.ones(1 << 20); print(os.environ['THP_MEM_ALLOC_ENABLE'])"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == expected


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc only"
)
@pytest.mark.parametrize(
    "keep, env, expect_kept",
    [(False, {}, False), (True, {}, True), (True, {"MALLOC_TRIM_THRESHOLD_": "131072"}, False)],
)
def test_keep_freed_memory_reuses_freed_blocks_unless_the_user_set_malloc(keep, env, expect_kept):
    # A 64 MiB tensor made and freed, as glibc's malloc accounts for it (mallinfo2). By default glibc maps such a block
    # on its own (hblkhd) and unmaps it when freed, so the next one is mapped and faulted in anew; kept, it comes from
    # the heap and stays there once freed (fordblks), for the next block to reuse. Counted by malloc, not by page
    # faults: where in the heap the next block lands, and so how many new pages it touches, depends on what else the
    # process allocated in between (a CI machine saw every round touch 2 MiB of new pages).
    import subprocess

    code = (
        "import ctypes, sys, vitlab, torch\n"
        "class Info(ctypes.Structure):\n"
        "    _fields_ = [(n, ctypes.c_size_t) for n in ('arena ordblks smblks hblks hblkhd usmblks "
        "fsmblks uordblks fordblks keepcost').split()]\n"
        "libc = ctypes.CDLL(None)\n"
        "libc.mallinfo2.restype = Info\n"
        "kept = vitlab.keep_freed_memory() if sys.argv[1] == 'keep' else False\n"
        "block = torch.ones(64 << 20, dtype=torch.uint8)\n"
        "mapped = libc.mallinfo2().hblkhd\n"
        "del block\n"
        "print(kept, mapped, libc.mallinfo2().fordblks)\n"
    )
    clean = {
        k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"
    }
    env = {**clean, "THP_MEM_ALLOC_ENABLE": "1", **env}
    done = subprocess.run(
        [sys.executable, "-c", code, "keep" if keep else "default"],
        env=env,
        capture_output=True,
        text=True,
    )
    if "mallinfo2" in done.stderr:
        pytest.skip("glibc older than 2.33: no mallinfo2")
    assert done.returncode == 0, done.stderr
    kept, mapped, free_in_heap = done.stdout.split()
    assert kept == str(expect_kept)
    block = 64 << 20
    if expect_kept:
        assert int(mapped) < block and int(free_in_heap) >= block, done.stdout
    else:
        assert int(mapped) >= block and int(free_in_heap) < block, done.stdout

"""Faster ways to compute what `model.py` computes plainly, and the process settings that speed up
CPUs.

Each fast path whose benefit depends on the CPU is used only where it measured faster on this
machine, at the shapes in use (timings.py: timed once, the verdict cached), and only after it has
checked itself once per process, per dtype and variant, on a tiny input against the plain torch
computation: where the call raises or disagrees beyond float tolerance, the path is off for the
process and the plain computation runs. A fast path never crashes a run and never changes an answer
beyond float rounding. `describe()` says which are on; `VITLAB_FASTPATHS=off` turns them all off.

- oneDNN linear layers (x86 CPUs): the matmul with the bias, and at inference the GELU, applied to
  each output tile while it is in cache, and the fp32 input gradient by oneDNN too.
- the attention kernel: torch's fused `scaled_dot_product_attention`, or the explicit softmax where
  that measured faster (CPUs in bf16).
- dropout drawing only the dropped elements on CPUs (dropout.py).
- memory: torch's CPU allocator on transparent huge pages (set here, before torch starts), and
  glibc's malloc keeping freed memory (runtime.keep_freed_memory).
"""

from __future__ import annotations

import os
import platform

# torch's CPU allocator on transparent huge pages for tensors of 2 MiB and more: without them every
# large activation is mapped anew in 4 KiB pages and faulted in page by page, which halved the 224
# px input pipeline (benchmarks/data.py). torch reads the variable at its first allocation, so this
# must run before any: vitlab imports this module first. A value the user set is kept.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch  # noqa: E402  after the variable above
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from . import timings  # noqa: E402
from .runtime import freed_memory_kept, instruction_set, native_bf16  # noqa: E402
from .timings import cpu_name  # noqa: E402

# ---------------------------------------------------------------------------------------------
# The switch

_NAMES = {
    torch.float32: "fp32",
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.float64: "fp64",
}


def enabled() -> bool:
    """Whether the fast paths may run at all: VITLAB_FASTPATHS is not off."""
    return os.environ.get("VITLAB_FASTPATHS", "on").lower() not in ("0", "off", "false", "no")


# ---------------------------------------------------------------------------------------------
# Self-checks


class SelfChecked:
    """A fast path's verdicts, one per key (dtype and variant): computed once per process by
    `check(key)`, which returns the largest relative difference from the plain computation or
    raises."""

    def __init__(self, name: str, check, tolerance: dict[torch.dtype, float]):
        self.name, self.check, self.tolerance = name, check, tolerance
        self.verdicts: dict[tuple, bool] = {}
        self.reasons: dict[tuple, str] = {}

    def ok(self, *key) -> bool:
        if key not in self.verdicts:
            self.verdicts[key] = self._run(key)
        return self.verdicts[key]

    def _run(self, key: tuple) -> bool:
        # The check runs as plain eager autograd whatever the caller's context, and draws no random
        # numbers from torch's global generator (a resumed run must see the same dropout masks).
        try:
            with (
                torch.inference_mode(False),
                torch.enable_grad(),
                torch.autocast("cpu", enabled=False),
            ):
                difference = self.check(*key)
        except Exception as e:  # noqa: BLE001  any failure of the fast op turns it off; the plain path runs
            self.reasons[key] = (
                f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            )
            return False
        limit = self.tolerance[key[0]]
        if not difference <= limit:  # NaN fails too
            self.reasons[key] = (
                f"differs from the plain computation by {difference:.1e} (limit {limit:.0e})"
            )
            return False
        return True


def _relative_difference(fast: torch.Tensor, plain: torch.Tensor) -> float:
    return (
        (fast.float() - plain.float()).abs().max() / plain.float().abs().max().clamp(min=1e-6)
    ).item()


# ---------------------------------------------------------------------------------------------
# oneDNN linear layers

_ONEDNN_AVAILABLE = (
    platform.machine().lower() in ("x86_64", "amd64")
    and torch.backends.mkldnn.is_available()
    and hasattr(torch.ops.mkldnn, "_linear_pointwise")
)


def onednn_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gelu: str | None = None
) -> torch.Tensor:
    """x @ weight.T + bias, then GELU (F.gelu's `approximate`: "none" or "tanh") if asked, in one
    oneDNN matmul."""
    return torch.ops.mkldnn._linear_pointwise(
        x, weight, bias, "none" if gelu is None else "gelu", [], gelu or ""
    )


class _OneDnnLinear(torch.autograd.Function):
    """y = x @ weight.T + bias by oneDNN, bias fused; the backward is nn.Linear's (two matmuls and a
    sum), its fp32 input gradient by oneDNN too: 12-45% faster than torch's at the qkv and fc1
    shapes of ViT-B/16 and the patch-4 model on AVX-512, level at the others; in bf16 torch's was as
    fast or faster."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        # oneDNN's result is a view of its 2-D output; detached, autograd lets the next op (a fused
        # dropout, dropout.py) write into it
        return onednn_linear(x, weight, bias).detach()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad = grad.reshape(-1, grad.shape[-1])
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = (
                onednn_linear(grad, weight.t().contiguous(), None)
                if grad.dtype == torch.float32
                else grad @ weight
            )
            grad_x = grad_x.view(x.shape)
        grad_w = grad.t() @ x.reshape(-1, x.shape[-1]) if ctx.needs_input_grad[1] else None
        grad_b = grad.sum(0) if ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


def _check_onednn_linear(dtype: torch.dtype, gelu: str | None) -> float:
    """Largest relative difference of the oneDNN layer from F.linear (+ F.gelu), in `dtype`:
    inference output, training output and the three gradients."""
    g = torch.Generator().manual_seed(0)
    x, weight, bias = (
        torch.randn(shape, generator=g).to(dtype) for shape in ((2, 5, 32), (48, 32), (48,))
    )
    weight = weight / 4
    act = (lambda y: y) if gelu is None else (lambda y: F.gelu(y, approximate=gelu))
    plain_in = [t.clone().requires_grad_() for t in (x, weight, bias)]
    fast_in = [t.clone().requires_grad_() for t in (x, weight, bias)]
    plain = act(F.linear(*plain_in))
    with torch.no_grad():
        inferred = onednn_linear(x, weight, bias, gelu)
    trained = act(_OneDnnLinear.apply(*fast_in))
    upstream = torch.randn(plain.shape, generator=g).to(dtype)
    plain.backward(upstream)
    trained.backward(upstream)
    pairs = [(inferred, plain), (trained, plain)] + [
        (f.grad, p.grad) for f, p in zip(fast_in, plain_in, strict=False)
    ]
    return max(_relative_difference(fast, ref) for fast, ref in pairs)


# bf16 keeps 8 bits of mantissa: two ways of summing 32 products differ by a few of its units (2^-8
# = 0.4%).
ONEDNN_LINEAR = SelfChecked(
    "oneDNN linear", _check_onednn_linear, {torch.float32: 1e-5, torch.bfloat16: 2e-2}
)


def onednn_linear_works(dtype: torch.dtype, gelu: str | None = None) -> bool:
    """oneDNN's linear layer for `dtype` (and GELU form) runs here and passed its check, whether or
    not the fast paths are on."""
    return _ONEDNN_AVAILABLE and ONEDNN_LINEAR.ok(dtype, gelu)


def onednn_linear_usable(dtype: torch.dtype, gelu: str | None = None) -> bool:
    """oneDNN's linear layer for `dtype` (and GELU form) may run: the fast paths are on, and it is
    available and checked (whether it is faster is asked per shape: `onednn_linear_faster`)."""
    return enabled() and onednn_linear_works(dtype, gelu)


# Rows of the input a linear layer's verdict is timed on, at most: at 1024 the two libraries' speed
# ratio at B/16's layers in bf16 was within 0.07 of the whole batch's (3152 rows), at 256 within
# 0.16, the winner changed (one core of the Intel Xeon, issue 28); its fc1 trains 1024 fp32 rows
# there in 0.1 s.
ROWS_TIMED = 1024


def onednn_linear_faster(
    dtype: torch.dtype,
    training: bool,
    shape: tuple[int, int, int],
    gelu: str | None = None,
) -> bool:
    """Whether oneDNN's linear layer (with the GELU at inference) beats F.linear (+ F.gelu) here,
    at `shape` (rows, in_features, out_features) and `dtype`, in training (forward and backward)
    or inference: timed once on up to ROWS_TIMED rows, the verdict cached (timings.py)."""
    rows, in_features, out_features = min(shape[0], ROWS_TIMED), *shape[1:]
    mode = "train" if training else "infer" + (f" GELU {gelu}" if gelu else "")
    case = f"{_NAMES[dtype]} {mode} {rows}x{in_features}->{out_features}"

    def ways():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(rows, in_features, generator=g).to(dtype)
        weight = (torch.randn(out_features, in_features, generator=g) / in_features**0.5).to(dtype)
        bias = torch.zeros(out_features, dtype=dtype)
        act = (lambda y: y) if gelu is None else (lambda y: F.gelu(y, approximate=gelu))
        if not training:
            return (
                torch.no_grad()(lambda: onednn_linear(x, weight, bias, gelu)),
                torch.no_grad()(lambda: act(F.linear(x, weight, bias))),
            )
        inputs = [t.requires_grad_() for t in (x, weight, bias)]
        upstream = torch.randn(rows, out_features, generator=g).to(dtype)

        def step(linear):
            return lambda: torch.autograd.grad(act(linear(*inputs)), inputs, upstream)

        return step(_OneDnnLinear.apply), step(F.linear)

    return timings.faster("oneDNN linear", case, ways)


def _needs_grad(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return x.requires_grad or weight.requires_grad


class Linear(nn.Linear):
    """nn.Linear, optionally followed by a GELU; the same parameters, state dict and results to
    float rounding. On CPUs where the oneDNN path is on it computes the matmul, bias and (at
    inference) GELU in one oneDNN call:
    torch's CPU nn.Linear first writes the broadcast bias over the whole output and then accumulates
    the product into it, and GELU is one more pass. Anywhere else (CUDA, other CPUs, dtypes other
    than fp32 and bf16, tracing, export and torch.compile, which fuse on their own) it is
    F.linear."""

    def __init__(self, in_features: int, out_features: int, gelu: str | None = None, **kwargs):
        super().__init__(in_features, out_features, **kwargs)
        self.gelu = gelu  # None, or F.gelu's `approximate`: "none" (exact) or "tanh"

    @classmethod
    def adopt(cls, linear: nn.Linear, gelu: str | None = None) -> Linear:
        """`linear`'s own parameters (not copies) in a Linear, followed by `gelu` if given."""
        layer = cls(
            linear.in_features,
            linear.out_features,
            gelu,
            bias=linear.bias is not None,
            device="meta",
        )
        layer.weight, layer.bias = linear.weight, linear.bias
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self._onednn_dtype(x)
        if dtype is not None and not (torch.is_grad_enabled() and _needs_grad(x, self.weight)):
            weight, bias = self.weight.to(dtype), self.bias.to(dtype)
            return onednn_linear(x.to(dtype), weight, bias, self.gelu)  # inference: the GELU fused
        y = self.product(x)  # the backward needs the GELU's input: not fused
        return y if self.gelu is None else F.gelu(y, approximate=self.gelu)

    def product(
        self, x: torch.Tensor, weight_scale: float = 1.0, bias_scale: float = 1.0
    ) -> torch.Tensor:
        """x @ (weight * weight_scale).T + bias * bias_scale, without the GELU, differentiable, by
        oneDNN where it is on: the scales carry a dropout's 1/(1-p) into the weights (dropout.py)."""
        dtype, weight, bias = self._onednn_dtype(x), self.weight, self.bias
        if dtype is not None:  # oneDNN in `dtype`: autocast's casts, by hand
            x, weight, bias = x.to(dtype), weight.to(dtype), bias.to(dtype)
        if weight_scale != 1.0:
            weight = weight * weight_scale
        if bias is not None and bias_scale != 1.0:
            bias = bias * bias_scale
        return F.linear(x, weight, bias) if dtype is None else _OneDnnLinear.apply(x, weight, bias)

    def _onednn_dtype(self, x: torch.Tensor) -> torch.dtype | None:
        """The dtype to compute in by oneDNN (autocast's, else the input's), or None for
        F.linear."""
        if x.device.type != "cpu" or x.dim() not in (2, 3) or self.bias is None:
            return None
        if torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling():
            return None
        floats = (torch.float32, torch.bfloat16)
        if torch.is_autocast_enabled("cpu"):
            dtype = torch.get_autocast_dtype("cpu")
            usable = dtype in floats and x.dtype in floats and self.weight.dtype in floats
        else:
            dtype = x.dtype
            usable = dtype in floats and dtype == self.weight.dtype
        if not (usable and onednn_linear_usable(dtype, self.gelu)):
            return None
        training = torch.is_grad_enabled() and _needs_grad(x, self.weight)
        shape = (x.shape[:-1].numel(), self.in_features, self.out_features)
        return dtype if onednn_linear_faster(dtype, training, shape, self.gelu) else None

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", gelu={self.gelu}" if self.gelu else "")


def fuse_linear_layers(module: nn.Module) -> nn.Module:
    """Every nn.Linear inside `module` made a Linear (oneDNN where it is on, F.linear elsewhere),
    and a GELU that comes right after one, as `fc1` then `act` in a block's MLP, fused into it: the
    same parameters and state dict, the same results to float rounding. The model is written
    plainly; this is the one place that changes how it runs."""
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, Linear.adopt(child))
        fc1, act = getattr(parent, "fc1", None), getattr(parent, "act", None)
        if isinstance(fc1, Linear) and fc1.gelu is None and isinstance(act, nn.GELU):
            fc1.gelu, parent.act = act.approximate, nn.Identity()
    return module


# ---------------------------------------------------------------------------------------------
# Attention


def _check_sdpa(dtype: torch.dtype, device_type: str) -> float:
    g = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(2, 3, 7, 16, generator=g).to(device_type, dtype).requires_grad_()
        for _ in range(3)
    )
    fast = F.scaled_dot_product_attention(q, k, v)
    # The formula, as model.Attention has it
    plain = ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1) @ v
    upstream = torch.randn(fast.shape, generator=g).to(device_type, dtype)
    fast_grads = torch.autograd.grad(fast, (q, k, v), upstream)
    plain_grads = torch.autograd.grad(plain, (q, k, v), upstream)
    return max(
        _relative_difference(a, b)
        for a, b in zip((fast, *fast_grads), (plain, *plain_grads), strict=False)
    )


# Every floating dtype SDPA takes has a limit: a float64 model (a reference computation) is checked
# too.
SDPA = SelfChecked(
    "fused attention",
    _check_sdpa,
    {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3},
)


def use_explicit_attention(q: torch.Tensor, impl: str) -> bool:
    """Whether attention should take the explicit softmax rather than SDPA: asked for ("math"),
    SDPA failed its self-check for this dtype and device, or measured faster here ("auto", CPUs
    in any dtype but fp32: `explicit_attention_faster`)."""
    if impl == "math":
        return True
    if torch.jit.is_tracing() or torch.compiler.is_compiling():
        return False  # traced and compiled graphs take SDPA as it is
    if not SDPA.ok(q.dtype, q.device.type):
        return True
    if impl == "auto" and q.device.type == "cpu" and q.dtype != torch.float32 and enabled():
        return explicit_attention_faster(q.dtype, torch.is_grad_enabled(), q.shape)
    return False


# Images of a batch an attention verdict is timed on, at most: in bf16 training the explicit softmax
# beat SDPA 6.4x on 8 images and 7.3x on 256 at patch 4, 2.2x and 1.7x on 16 at B/16 (one core of
# the Intel Xeon, issue 28), where 8 images take 25 ms.
IMAGES_TIMED = 8


def explicit_attention_faster(dtype: torch.dtype, training: bool, shape: torch.Size) -> bool:
    """Whether the explicit softmax beats SDPA here, for queries of `shape` (batch, heads, tokens,
    head_dim) in `dtype`, in training (forward and backward) or inference: timed once on up to
    IMAGES_TIMED images, the verdict cached (timings.py). It won bf16 training on an AMD EPYC at
    patch 4 (100 against 71 images/s, issue 14)."""
    shape = (min(shape[0], IMAGES_TIMED), *shape[1:])
    case = f"{_NAMES[dtype]} {'train' if training else 'infer'} {'x'.join(map(str, shape))}"

    def ways():
        g = torch.Generator().manual_seed(0)
        q, k, v = (
            torch.randn(shape, generator=g).to(dtype).requires_grad_(training) for _ in "qkv"
        )
        upstream = torch.randn(shape, generator=g).to(dtype)

        def explicit():
            return ((q * shape[-1] ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1) @ v

        def way(attention):
            if training:
                return lambda: torch.autograd.grad(attention(), (q, k, v), upstream)
            return torch.no_grad()(attention)

        return way(explicit), way(lambda: F.scaled_dot_product_attention(q, k, v))

    return timings.faster("explicit softmax", case, ways)


# ---------------------------------------------------------------------------------------------
# What runs


def describe(device: torch.device | str = "cpu") -> str:
    """One line: the instruction set, native bf16, which fast paths may run for fp32 and bf16
    (their checks run now), and on a CPU the verdicts measured here so far (timings.py): which way
    won each shape and by how much."""
    device = torch.device(device)
    cpu = device.type == "cpu" and enabled()
    parts = [
        f"torch {torch.__version__}",
        f"CPU {cpu_name()} ({instruction_set()})",
        f"native bf16 {'yes' if native_bf16(device) else 'no'}",
    ]
    for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        if cpu:
            on = all(onednn_linear_usable(dtype, gelu) for gelu in (None, "none", "tanh"))
            reason = next((r for k, r in ONEDNN_LINEAR.reasons.items() if k[0] == dtype), "")
            parts.append(
                f"oneDNN linear {name} {'where faster' if on else 'off'}"
                + (f" ({reason})" if reason else "")
            )
        kernel = "SDPA" if SDPA.ok(dtype, device.type) else "explicit softmax"
        if cpu and dtype != torch.float32 and kernel == "SDPA":
            kernel = "SDPA or explicit softmax, whichever is faster"
        parts.append(f"attention {name} {kernel}")
    if device.type == "cpu":
        parts.append(f"dropout {'sparse' if cpu else 'torch'}")
        parts.append(
            f"huge pages {'on' if os.environ.get('THP_MEM_ALLOC_ENABLE') == '1' else 'off'}"
        )
        parts.append(f"freed memory kept {'yes' if freed_memory_kept() else 'no'}")
    if cpu:
        parts.append(f"measured here: {timings.summary()}")
    return "fast paths: " + ", ".join(parts)

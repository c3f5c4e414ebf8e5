"""Faster ways to compute what `model.py` computes plainly, and the process settings that speed up
CPUs.

Each fast path is used only where it measured faster (the `POLICY` table, by instruction set), and
only after it has checked itself once per process, per dtype and variant, on a tiny input against
the plain torch computation: where the call raises or disagrees beyond float tolerance, the path is
off for the process and the plain computation runs. A fast path never crashes a run and never
changes an answer beyond float rounding. `describe()` says which are on; `VITLAB_FASTPATHS=off`
turns them all off.

- oneDNN linear layers (x86 CPUs with AVX-512): the matmul with the bias, and at inference the GELU,
  applied to each output tile while it is in cache, and the fp32 input gradient by oneDNN too.
- the attention kernel: torch's fused `scaled_dot_product_attention`, or the explicit softmax where that
  measured faster (CPUs in bf16).
- native bf16: which devices run bf16 matmuls in hardware (precision `auto` picks bf16 only there).
- memory: torch's CPU allocator on transparent huge pages, and glibc's malloc keeping freed memory.
"""

from __future__ import annotations

import ctypes
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

# ---------------------------------------------------------------------------------------------
# The machine


def instruction_set() -> str:
    """torch's CPU kernel level: "AVX512", "AVX2", "DEFAULT" (or an ARM/POWER level).
    ATEN_CPU_CAPABILITY lowers it, and ONEDNN_MAX_CPU_ISA=AVX2 caps oneDNN too: both are honoured,
    so that setting them imitates an older CPU faithfully."""
    level = torch.backends.cpu.get_cpu_capability()
    onednn_cap = os.environ.get(
        "ONEDNN_MAX_CPU_ISA", os.environ.get("DNNL_MAX_CPU_ISA", "ALL")
    ).upper()
    if level.startswith("AVX512") and not (
        onednn_cap == "ALL" or onednn_cap.startswith(("AVX512", "AVX10", "AMX"))
    ):
        return "AVX2"
    return level


def cpu_name() -> str:
    """The CPU's model name (Linux), else what Python knows of the machine."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(
                line.split(":", 1)[1].strip() for line in f if line.startswith("model name")
            )
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def native_bf16(device: torch.device) -> bool:
    """Whether `device` runs bf16 matmuls in hardware: a GPU with bf16, or an x86 CPU with AVX-512
    BF16 or AMX. Elsewhere bf16 is emulated, about 100x slower than fp32 on an AVX2 CPU (0.7 against
    67 GFLOP/s)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu" or not instruction_set().startswith("AVX512"):
        return False
    # torch's probes are private; a torch without them is taken to have neither feature.
    probes = (
        getattr(torch.cpu, "_is_avx512_bf16_supported", None),
        getattr(torch.cpu, "_is_amx_tile_supported", None),
    )
    return any(probe() for probe in probes if probe is not None)


# Which fast path is on, by instruction set, from measurements (benchmarks/RESULTS.md, issue 14):
# - AVX-512 (AMD EPYC Zen 4, AVX-512 BF16): with oneDNN linear layers vitlab ran at 1.06-1.27x the best peer in
#   inference, 1.05-1.50x in training; the explicit softmax trained bf16 1.4x faster than SDPA at patch 4 (100 against 71 images/s).
# - AVX2 (AMD EPYC without AVX-512, issue 14): with the oneDNN linear layers vitlab trained at 0.69x timm's speed
#   (patch 4) and 0.87x (B/16), and inferred no faster than transformers' nn.Linear: off. Without them, held to AVX2:
#   0.97-1.01x, the same kernels as timm. bf16 is emulated there. Any other CPU: plain torch.
POLICY: dict[str, dict[str, bool]] = {
    "AVX512": {"onednn_linear": True, "explicit_softmax_bf16": True},
    "AVX2": {"onednn_linear": False, "explicit_softmax_bf16": False},
}


def enabled() -> bool:
    """Whether the fast paths may run at all: VITLAB_FASTPATHS is not off."""
    return os.environ.get("VITLAB_FASTPATHS", "on").lower() not in ("0", "off", "false", "no")


def wanted(path: str) -> bool:
    """Whether the policy turns `path` on for this CPU (before its self-check), and VITLAB_FASTPATHS
    is not off."""
    if not enabled():
        return False
    # Any other CPU: plain torch, as AVX2
    return POLICY.get(instruction_set(), POLICY["AVX2"])[path]


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
        return onednn_linear(x, weight, bias)

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
    """oneDNN's linear layer for `dtype` (and GELU form) runs here and passed its check, whatever
    the policy."""
    return _ONEDNN_AVAILABLE and ONEDNN_LINEAR.ok(dtype, gelu)


def onednn_linear_usable(dtype: torch.dtype, gelu: str | None = None) -> bool:
    """oneDNN's linear layer for `dtype` (and GELU form) is on: wanted on this CPU, available and
    checked."""
    return wanted("onednn_linear") and onednn_linear_works(dtype, gelu)


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
        if dtype is None:
            y = F.linear(x, self.weight, self.bias)
        else:
            # Autocast's casts, by hand
            x, weight, bias = (
                x.to(dtype),
                self.weight.to(dtype),
                self.bias.to(dtype),
            )
            if not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
                return onednn_linear(x, weight, bias, self.gelu)  # inference: the GELU fused too
            # The backward needs the GELU's input: not fused
            y = _OneDnnLinear.apply(x, weight, bias)
        return y if self.gelu is None else F.gelu(y, approximate=self.gelu)

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
        return dtype if usable and onednn_linear_usable(dtype, self.gelu) else None

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
    measured faster ("auto": bf16 on CPUs where the policy says so), or SDPA failed its self-check
    for this dtype and device."""
    if impl == "math":
        return True
    if (
        impl == "auto"
        and q.device.type == "cpu"
        and q.dtype != torch.float32
        and wanted("explicit_softmax_bf16")
    ):
        return True
    if torch.jit.is_tracing() or torch.compiler.is_compiling():
        return False  # traced and compiled graphs take SDPA as it is
    return not SDPA.ok(q.dtype, q.device.type)


# ---------------------------------------------------------------------------------------------
# Memory

_MALLOC_ENV = (
    "MALLOC_MMAP_MAX_",
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_TOP_PAD_",
)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # <malloc.h>
_freed_memory_kept = False


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory in the process for the next allocation rather than
    return it to the OS.

    torch's CPU tensors come from malloc, which serves large blocks with a fresh mmap and unmaps
    them when freed:
    every training step then maps its activations anew and the kernel zeroes each page on first
    touch. With mmap off and up to 2 GiB of free heap kept, a step reuses the last step's memory:
    the patch-4 ViT's fp32 training step went from 138,000 page faults and 6.0 s to 900 and 4.1 s.
    The cost: the process holds its peak memory until it exits, fine for a run of the `vitlab`
    command, which calls this; a library import does not. Returns whether it took effect: Linux with
    glibc only, and not where the user has set malloc's settings (MALLOC_*_ variables,
    GLIBC_TUNABLES glibc.malloc.*)."""
    global _freed_memory_kept
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if any(name in os.environ for name in _MALLOC_ENV) or "glibc.malloc." in os.environ.get(
        "GLIBC_TUNABLES", ""
    ):
        return False
    libc = ctypes.CDLL(None)  # this process's own malloc
    # Arenas stay as they are: capped at one, the threads of timm's bf16 SDPA training step queued
    # on its lock (-40%).
    _freed_memory_kept = bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(
        libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    )
    return _freed_memory_kept


# ---------------------------------------------------------------------------------------------


def describe(device: torch.device | str = "cpu") -> str:
    """One line: the instruction set, native bf16, and which fast paths are on for fp32 and bf16
    (their checks run now)."""
    device = torch.device(device)
    cpu = device.type == "cpu"
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
                f"oneDNN linear {name} {'on' if on else 'off'}" + (f" ({reason})" if reason else "")
            )
        probe = torch.empty(0, dtype=dtype, device=device)
        kernel = "explicit softmax" if use_explicit_attention(probe, "auto") else "SDPA"
        parts.append(f"attention {name} {kernel}")
    if cpu:
        parts.append(
            f"huge pages {'on' if os.environ.get('THP_MEM_ALLOC_ENABLE') == '1' else 'off'}"
        )
        parts.append(f"freed memory kept {'yes' if _freed_memory_kept else 'no'}")
    return "fast paths: " + ", ".join(parts)

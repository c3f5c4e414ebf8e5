"""Dropout on CPUs at a fraction of torch's cost, with nn.Dropout's semantics: in training each
element is zeroed with probability p and the others are scaled by 1 / (1 - p); in evaluation it
is the identity.

Why: torch's CPU dropout draws one uniform per element from its Mersenne Twister, one at a time in
one thread (`bernoulli_`, 5.5 ns an element), then multiplies by the mask in two more passes: at
dropout 0.1 it took the patch-4 ViT's training step from 60 to 35 images/s (issue 28). Here only
the dropped elements are drawn. The gaps between consecutive dropped elements of a Bernoulli(p)
sequence are independent and geometric, P(gap = k) = (1 - p)^(k-1) p; one float32 uniform v in
(0, 1] gives one gap, 1 + floor(log(v) / log(1 - p)), a cumulative sum gives the positions, and
index_fill_ zeroes them in the scaled copy: one uniform per dropped element (a tenth of them at
p = 0.1) and one pass over the tensor each way. The positions are kept for the backward, 8p bytes
an element (0.8 at p = 0.1; torch keeps its float mask, 4 in fp32).

How exact: v has 24 random bits, so each gap's probabilities, and the drop rate, are p's to within
2^-22 (tests/test_dropout.py enumerates all 2^24 uniforms through the same float32 arithmetic).

In a block the dropouts are fused with the layers around them (`use_sparse_dropout`): the 1/(1-p)
goes into the next linear layer's weights, the zeros into fresh outputs and gradients in place, the
MLP's GELU and its dropout are one op, so the hidden activations are not passed over again. With
both, a training step at dropout 0.1 took 1.06x (fp32) and 1.15x (bf16) the time of one without
for the patch-4 ViT (batch 256), 1.03x and 1.07x for B/16 (batch 16), where timm's took 1.73x,
1.69x, 1.21x and 1.54x (benchmarks/models.py, 2-core Intel Xeon with AMX, 2026-12-06).

The uniforms follow torch's global generator, as torch's dropout's do: each call draws one key from
it, so the masks follow the run's seed and step (train.py reseeds it every step), and gradient
checkpointing, which replays the generator's state, recomputes the same masks. The uniforms
themselves come from numpy's PCG64 seeded with the key: 1.5 ns a uniform where torch.rand's
Mersenne Twister takes 2.7 (a second thread drawing half of them lost more than it gained inside a
training step, whose own threads hold both cores).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from .fastpaths import Linear, enabled

# Above this rate more than half the elements are drawn and their positions take more memory than
# torch's mask of the same tensor in fp32 (8p against 4 bytes an element).
MAX_SPARSE_RATE = 0.5
# Uniforms drawn at once beyond the expected count of drops, in standard deviations of the count:
# they run short of the tensor's end once in about 10^15 calls, which then draws more.
_MARGIN_SIGMAS = 8


def gaps_of(u: torch.Tensor, p: float) -> torch.Tensor:
    """The geometric gaps (int64, >= 1) for drop probability `p` that float32 uniforms `u`, the
    multiples of 2^-24 in [0, 1), give, overwriting `u`: with v = u + 2^-24 (exact; uniform on the
    multiples in (0, 1]), trunc(log(v) / log(1 - p) + 1), so P(gap > k) = (1 - p)^k. The sum is
    >= 1, so the cast to int64 is the floor; log rather than log1p(-u), and the 1 added in
    float32, save two of six passes (tests/test_dropout.py enumerates every uniform through this
    arithmetic)."""
    return u.add_(2.0**-24).log_().mul_(1 / math.log1p(-p)).add_(1).to(torch.int64)


def uniforms(key: int, start: int, count: int) -> torch.Tensor:
    """Uniforms `start` to `start + count` of the stream `key`: float32 multiples of 2^-24 in
    [0, 1), numpy's (next 32 bits >> 8) * 2^-24 as torch.rand's, two to each 64-bit output of
    PCG64 seeded with `key` (`advance` skips whole outputs)."""
    bits = np.random.PCG64(key)
    bits.advance(start // 2)
    rng = np.random.Generator(bits)
    if start % 2:  # the first half of that output was drawn
        rng.random(1, np.float32)
    return torch.from_numpy(rng.random(count, np.float32))


def _enough(expected: float, p: float) -> int:
    """Uniforms enough for `expected` drops but once in about 10^15 calls."""
    return int(expected + _MARGIN_SIGMAS * math.sqrt(expected * (1 - p))) + 16


def dropped_positions(numel: int, p: float) -> torch.Tensor:
    """The sorted positions (int64) that dropout with probability `p` zeroes in a tensor of `numel`
    elements, flattened in row-major order: each position independently with probability `p`."""
    key, drawn, last, parts = int(torch.randint(2**62, ())), 0, -1, []
    while last < numel:  # the second round, once in 10^15 calls, goes on from the last position
        count = _enough((numel - 1 - last) * p, p)
        gaps = gaps_of(uniforms(key, drawn, count), p)
        gaps[0] += last  # position = last + cumulative gap
        parts.append(gaps.cumsum_(0))
        drawn, last = drawn + count, int(parts[-1][-1])
    positions = torch.cat(parts) if len(parts) > 1 else parts[0]
    return positions[: int(torch.searchsorted(positions, numel))]


class _SparseDropout(torch.autograd.Function):
    """x * 1/(1 - p) with the dropped positions zeroed; the gradient the same."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:
        positions = dropped_positions(x.numel(), p)
        ctx.scale = 1 / (1 - p)
        ctx.save_for_backward(positions)
        return _scaled_zeroed(x, ctx.scale, positions)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (positions,) = ctx.saved_tensors
        return _scaled_zeroed(grad, ctx.scale, positions), None


def _scaled_zeroed(x: torch.Tensor, scale: float, positions: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of x times `scale`, zero at `positions` of its row-major order."""
    y = x.reshape(-1).mul(scale)
    return y.index_fill_(0, positions, 0).view(x.shape)


def sparse_dropout_applies(x: torch.Tensor, p: float) -> bool:
    """Whether dropout of `x` at rate `p` in training takes the sparse path here."""
    if not (0 < p <= MAX_SPARSE_RATE and x.device.type == "cpu" and x.is_floating_point()):
        return False
    if torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling():
        return False  # traced and compiled graphs keep torch's op
    return enabled()


class Dropout(nn.Dropout):
    """nn.Dropout, on CPUs by the sparse draw above (the same distribution of masks, other masks);
    the same module elsewhere. Its state dict and repr are nn.Dropout's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and not self.inplace and sparse_dropout_applies(x, self.p):
            return _SparseDropout.apply(x, self.p)
        return F.dropout(x, self.p, self.training, self.inplace)


# ---------------------------------------------------------------------------------------------
# Fused with the layers around it: a block's dropouts, after its linear layers (fastpaths.Linear)


class _ZeroAt(torch.autograd.Function):
    """`y` (a fresh output no other op reads) zeroed at `positions`, in place; the gradient the
    same, in a copy (autograd may hand the same gradient to other branches)."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        ctx.mark_dirty(y)
        ctx.save_for_backward(positions)
        y.view(-1).index_fill_(0, positions, 0)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        (positions,) = ctx.saved_tensors
        return grad.reshape(-1).index_fill(0, positions, 0).view(grad.shape), None


class _GeluZeroAt(torch.autograd.Function):
    """GELU(h) zeroed at `positions`; its gradient zeroed in place in the GELU's own backward."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, positions: torch.Tensor, approximate: str) -> torch.Tensor:
        ctx.approximate = approximate
        ctx.save_for_backward(h, positions)
        a = F.gelu(h, approximate=approximate)
        return a.view(-1).index_fill_(0, positions, 0).view(h.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        h, positions = ctx.saved_tensors
        grad_h = torch.ops.aten.gelu_backward(grad, h, approximate=ctx.approximate).contiguous()
        return grad_h.view(-1).index_fill_(0, positions, 0).view(h.shape), None, None


def _zeroed(y: torch.Tensor, p: float, x: torch.Tensor) -> torch.Tensor:
    """`y`, a linear layer's product over `_rows(x)`, zeroed at the positions dropout `p` draws,
    in x's leading shape."""
    y = _ZeroAt.apply(y, dropped_positions(y.numel(), p))
    return y.view(*x.shape[:-1], y.shape[-1])


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as a matrix of rows: a linear layer's product of it is a tensor of its own, where that of
    (B, T, features) is a view, whose zeroing in place autograd would undo and redo through copies
    of the whole gradient in the backward (CopySlices, AsStridedBackward: 5% of the patch-4 ViT's
    bf16 training step)."""
    return x.reshape(-1, x.shape[-1])


class DroppedLinear(Linear):
    """A Linear followed by dropout p: on the sparse path the 1/(1-p) is in its weight and bias and
    the dropped positions are zeroed in its own output, saving two passes over it; elsewhere the
    Linear, then the dropout. The same parameters and state dict as the Linear. The rate lives in
    its `drop` module, as DroppedMlp's: whatever sets the rate of a model's nn.Dropout modules
    (timm's and the benchmarks' way) sets this one too."""

    def __init__(self, *args, p: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.drop = Dropout(p)

    @property
    def p(self) -> float:
        return self.drop.p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and sparse_dropout_applies(x, self.p)):
            return self.drop(super().forward(x))
        scale = 1 / (1 - self.p)
        return _zeroed(self.product(_rows(x), scale, scale), self.p, x)


class DroppedMlp(nn.Module):
    """A block's MLP, fc1 (its GELU fused) then fc2 with dropout p after each, as model.Mlp: on the
    sparse path the GELU and its dropout are one op, both 1/(1-p) are in fc2's weight, the outer
    one in its bias, and the positions are zeroed in fresh outputs: four passes over the hidden
    activations and one over the output saved. Elsewhere model.Mlp's computation. fc1 and fc2 are
    the Mlp's own: the same parameters and state dict."""

    def __init__(self, fc1: Linear, fc2: Linear, drop: nn.Dropout):
        super().__init__()
        self.fc1, self.fc2, self.drop = fc1, fc2, drop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.drop.p
        if not (self.training and sparse_dropout_applies(x, p)):
            return self.drop(self.fc2(self.drop(self.fc1(x))))
        h = self.fc1.product(_rows(x))  # (B * T, hidden), before the GELU
        a = _GeluZeroAt.apply(h.contiguous(), dropped_positions(h.numel(), p), self.fc1.gelu)
        scale = 1 / (1 - p)
        return _zeroed(self.fc2.product(a, scale * scale, scale), p, x)


def use_sparse_dropout(module: nn.Module) -> nn.Module:
    """Every nn.Dropout inside `module` made a Dropout (the same rate), and those of a block fused
    with its linear layers (after fastpaths.fuse_linear_layers): the MLP's, and the one after
    attention's output projection (model.Block's `drop`). The model is written plainly; this
    changes how its dropout is drawn on CPUs."""
    for parent in list(module.modules()):
        drop, mlp = getattr(parent, "drop", None), getattr(parent, "mlp", None)
        proj = getattr(getattr(parent, "attn", None), "proj", None)
        if type(drop) is nn.Dropout and drop.p > 0 and type(proj) is Linear and not proj.gelu:
            parent.attn.proj, parent.drop = DroppedLinear.adopt(proj), nn.Identity()
            parent.attn.proj.drop.p = drop.p
        fc1, act = getattr(mlp, "fc1", None), getattr(mlp, "act", None)
        if type(fc1) is Linear and fc1.gelu and isinstance(act, nn.Identity) and mlp.drop.p > 0:
            parent.mlp = DroppedMlp(fc1, mlp.fc2, Dropout(mlp.drop.p))
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Dropout:
                setattr(parent, name, Dropout(child.p, child.inplace))
    return module

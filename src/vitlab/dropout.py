"""Dropout on CPUs at a fraction of torch's cost, with nn.Dropout's semantics: in training each
element is zeroed with probability p and the others are scaled by 1 / (1 - p); in evaluation it
is the identity.

Why: torch's CPU dropout draws one uniform per element from its Mersenne Twister, one at a time in
one thread (`bernoulli_`, 5.5 ns an element), then multiplies by the mask in two more passes: at
dropout 0.1 it took the patch-4 ViT's training step from 60 to 35 images/s (issue 28). Here only
the dropped elements are drawn. The gaps between consecutive dropped elements of a Bernoulli(p)
sequence are independent and geometric, P(gap = k) = (1 - p)^(k-1) p; one float32 uniform u gives
one gap, 1 + floor(log(1 - u) / log(1 - p)), a cumulative sum gives the positions, and index_fill_
zeroes them in the scaled copy: one uniform per dropped element (a tenth of them at p = 0.1) and
one pass over the tensor each way. The positions are kept for the backward, 8p bytes an element
(0.8 at p = 0.1; torch keeps its float mask, 4 in fp32).

How exact: u has 24 random bits, so each gap's probabilities, and the drop rate, are p's to within
2^-22 (tests/test_dropout.py enumerates all 2^24 uniforms through the same float32 arithmetic).

The uniforms come from torch's global generator, as torch's dropout's do: the masks follow the
run's seed and step (train.py reseeds it every step), and gradient checkpointing, which replays
the generator's state, recomputes the same masks. Elsewhere (CUDA, whose Philox generator is fast;
tracing and torch.compile; p above one half, where the positions would outgrow a mask;
VITLAB_FASTPATHS=off) it is torch's own dropout.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .fastpaths import enabled

# Above this rate more than half the elements are drawn and their positions take more memory than
# torch's mask of the same tensor in fp32 (8p against 4 bytes an element).
MAX_SPARSE_RATE = 0.5
# Uniforms drawn at once beyond the expected count of drops, in standard deviations of the count:
# they run short of the tensor's end once in about 10^15 calls, which then draws more.
_MARGIN_SIGMAS = 8


def gaps_of(u: torch.Tensor, p: float) -> torch.Tensor:
    """The geometric gaps (int64, >= 1) for drop probability `p` that float32 uniforms `u` in [0, 1)
    give, overwriting `u`: floor(log(1 - u) / log(1 - p)) + 1, so u < p gives 1 and
    P(gap > k) = (1 - p)^k."""
    return u.neg_().log1p_().div_(math.log1p(-p)).floor_().to(torch.int64).add_(1)


def _gaps(expected: float, p: float) -> torch.Tensor:
    """Enough gaps for `expected` drops but once in about 10^15 calls, from as many uniforms of
    torch's global generator."""
    count = int(expected + _MARGIN_SIGMAS * math.sqrt(expected * (1 - p))) + 16
    return gaps_of(torch.rand(count, dtype=torch.float32), p)


def dropped_positions(numel: int, p: float) -> torch.Tensor:
    """The sorted positions (int64) that dropout with probability `p` zeroes in a tensor of `numel`
    elements, flattened in row-major order: each position independently with probability `p`."""
    parts = [_gaps(numel * p, p).cumsum_(0).sub_(1)]
    while parts[-1][-1] < numel:  # ran short: go on from the last position drawn
        last = parts[-1][-1]
        parts.append(_gaps((numel - 1 - int(last)) * p, p).cumsum_(0).add_(last))
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


def use_sparse_dropout(module: nn.Module) -> nn.Module:
    """Every nn.Dropout inside `module` made a Dropout (the same rate): the model is written
    plainly; this changes how its dropout is drawn on CPUs."""
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Dropout:
                setattr(parent, name, Dropout(child.p, child.inplace))
    return module

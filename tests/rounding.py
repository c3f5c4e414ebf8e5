"""How far two float computations of one quantity may lie apart from rounding alone: the bounds every test's
float comparison uses, derived from the arithmetic rather than picked on one CPU.

- One sum computed in two orders (another kernel, blocking, FMA, a batch split in parts): each result lies within
  gamma_n * sum|terms| of the exact sum of its n terms (Higham, Accuracy and Stability of Numerical Algorithms, 2nd
  ed., eq. 3.5 and section 4.2: gamma_n = n*u / (1 - n*u), u the unit roundoff of the accumulating type), so the two
  differ by at most 2 * gamma_n * sum|terms|: `sum_bound`. CPU kernels accumulate bf16 and fp16 products in float32,
  so u is float32's there too.
- A result then rounded to a narrower type may land one unit in its last place apart: 2u of its size: `ulps`.
- A whole network, where such worst-case bounds grow too loose to tell two functions apart: its float32 rounding is
  measured against a float64 copy of itself (`float32_rounding`); `assert_same_function` holds two implementations
  to that, and to float64's rounding when both run in float64.
"""

from __future__ import annotations

import copy

import torch

UNIT_ROUNDOFF = {
    torch.float64: 2.0**-53,
    torch.float32: 2.0**-24,
    torch.float16: 2.0**-11,
    torch.bfloat16: 2.0**-8,
}

# Vectorised tanh, erf and exp (SLEEF's, oneDNN's, the C library's) are each within a unit or two in the last place of
# the exact value: two implementations of one elementwise function lie within this many units of each other.
ELEMENTWISE_ULPS = 4

# The largest rounding error over a result's elements, one float32 implementation of a function against another's:
# within this factor. Measured: the official Flax logits of the golden Ti/16 lie 4.5e-7 from vitlab's float64 ones,
# vitlab's float32 4.2e-7 (1.1x); vitlab's against timm's and transformers' random ViTs, 0.7-2.1x (tests/test_interop,
# printed by -s). ONNX Runtime's fused kernels round more (tests/test_export holds them to export.TOLERANCE).
SPREAD = 4.0


def gamma(n: int, dtype: torch.dtype = torch.float32) -> float:
    """Higham's gamma_n: the relative bound on n successive roundings of the accumulating type."""
    nu = n * UNIT_ROUNDOFF[dtype]
    assert nu < 1, f"{n} terms are beyond any bound in {dtype}"
    return nu / (1 - nu)


def sum_bound(terms: int, magnitude, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """How far two computations of sums of `terms` terms, in other orders, may lie apart: 2 * gamma_n * sum|terms|.
    `magnitude` is sum|terms| for each element: a tensor (the same computation on the absolute values of its
    inputs) or a number that bounds it everywhere."""
    return 2 * gamma(terms, dtype) * torch.as_tensor(magnitude, dtype=torch.float64)


def ulps(value: torch.Tensor, dtype: torch.dtype, n: float = 1) -> torch.Tensor:
    """n units in the last place of `value` in `dtype`, at most 2u of its size each: how far two roundings of nearby
    values may land apart beyond their distance (n = 1), or two implementations of a function within n/2 units each."""
    return n * 2 * UNIT_ROUNDOFF[dtype] * value.detach().double().abs()


def assert_within(actual: torch.Tensor, expected: torch.Tensor, bound, msg: str = "") -> None:
    """|actual - expected| <= bound, elementwise (the difference computed in float64, so exactly)."""
    assert actual.shape == expected.shape, (msg, actual.shape, expected.shape)
    difference = (actual.detach().double() - expected.detach().double()).abs()
    bound = torch.as_tensor(bound, dtype=torch.float64).expand_as(difference)
    worst = int((difference - bound).flatten().argmax())
    assert bool((difference <= bound).all()), (
        f"{msg}: |difference| {difference.flatten()[worst]:.3e} over its rounding bound {bound.flatten()[worst]:.3e} "
        f"at flat index {worst} (largest difference {difference.max():.3e})"
    )


def float32_rounding(
    module, *inputs, output=None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`module` on `inputs` in float32 and, as a float64 copy, in float64 (`output` picks the tensor from what it
    returns): (float32 result, float64 result, their elementwise distance). float64's own rounding is 2^-29 of
    float32's, so the distance is the rounding that float32 carries here, to that share."""
    output = output or (lambda out: out)
    with torch.no_grad():
        single = output(module(*inputs))
        double = output(
            copy.deepcopy(module).double()(
                *(x.double() if x.is_floating_point() else x for x in inputs)
            )
        )
    return single, double, (single.double() - double).abs()


def assert_same_function(ours, reference, *inputs, output=None, msg: str = "") -> float:
    """`ours` and `reference` compute one function: run in float64, they agree to float64's rounding (their float32
    rounding measured here, scaled by 2^-29, SPREAD times); in float32, ours is as accurate as the reference (its
    rounding within SPREAD times the reference's). `output` picks the reference's tensor from what it returns.
    Returns their largest float32 difference."""
    got, got64, ours_rounding = float32_rounding(ours, *inputs)
    expected, expected64, reference_rounding = float32_rounding(reference, *inputs, output=output)
    scale = UNIT_ROUNDOFF[torch.float64] / UNIT_ROUNDOFF[torch.float32]
    float64_bound = SPREAD * scale * (ours_rounding.max() + reference_rounding.max())
    assert_within(got64, expected64, float64_bound, f"{msg} (float64)")
    assert ours_rounding.max() <= SPREAD * reference_rounding.max(), (
        f"{msg}: float32 rounding {ours_rounding.max():.2e} against the reference's {reference_rounding.max():.2e}"
    )
    print(
        f"{msg}: float32 rounding {ours_rounding.max():.1e} (reference {reference_rounding.max():.1e}), float64 "
        f"difference {(got64 - expected64).abs().max():.1e}, float32 difference {(got - expected).abs().max():.1e}"
    )
    return (got - expected).abs().max().item()


def assert_within_float32_rounding(
    got: torch.Tensor, got64: torch.Tensor, expected: torch.Tensor, msg: str = ""
) -> None:
    """`expected` is another implementation's float32 result of the function that `got` (float32) and `got64` (its
    float64 copy) compute, with no float64 of its own (a file of logits): it lies within float32's rounding of the
    exact value, taken as SPREAD times ours (|got - got64|), and so within (1 + SPREAD) times that of `got`."""
    rounding = (got.double() - got64).abs().max()
    assert_within(expected, got64, SPREAD * rounding, f"{msg} (from float64)")
    assert_within(got, expected, (1 + SPREAD) * rounding, msg)

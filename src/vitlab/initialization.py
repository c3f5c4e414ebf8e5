"""How a ViT's weights start when it is trained from scratch: flax's defaults as the official code
has them (LeCun normal kernels), the 2-D sine-cosine position table of Beyer et al. (2022), and
mimetic initialisation of the attention (Trockman & Kolter, 2023). The model (`model.py`) calls
them from `VisionTransformer.reset_parameters`."""

from __future__ import annotations

import math

import torch
from torch import nn


def lecun_normal_(weight: torch.Tensor) -> None:
    # flax's default kernel init: truncated normal with variance 1 / fan_in.
    fan_in = weight[0].numel()
    std = math.sqrt(1.0 / fan_in) / 0.87962566103423978  # std of a unit normal truncated at 2
    nn.init.trunc_normal_(weight, std=std, a=-2 * std, b=2 * std)


def _factor(product: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(left, right), each (rank, D), with left.T @ right the best rank-`rank` approximation of
    `product` (D, D)."""
    U, S, Vh = torch.linalg.svd(product)
    root = S[:rank].sqrt()[:, None]
    return root * U[:, :rank].T, root * Vh[:rank]


@torch.no_grad()
def mimetic_init_(
    attention: nn.Module,
    qk: tuple[float, float] = (0.7, 0.7),
    vo: tuple[float, float] = (0.4, 0.4),
) -> None:
    """Mimetic initialisation (Trockman & Kolter, 2023, "Mimetic Initialization of Self-Attention
    Layers"): each head's query-key product W_q^T W_k = a Z + b I and the value-projection product
    W_v^T W_o = a Z - b I, with Z ~ N(0, 1/D) and (a, b) = `qk`, `vo` (the paper's 0.7, 0.7 and 0.4,
    0.4). Attention then starts out favouring tokens like the query, which with 2-D position
    embeddings means nearby patches: the local mixing a convolution has by design and a ViT
    otherwise spends many epochs learning."""
    D, heads = attention.proj.weight.shape[0], attention.num_heads
    eye = torch.eye(D)
    # Each (D, D): x @ w.T; rows of one head are contiguous
    w_q, w_k, w_v = attention.qkv.weight.chunk(3)
    for h in range(heads):
        rows = slice(h * attention.head_dim, (h + 1) * attention.head_dim)
        left, right = _factor(
            qk[0] * torch.randn(D, D) / math.sqrt(D) + qk[1] * eye, attention.head_dim
        )
        w_q[rows], w_k[rows] = left, right
    left, right = _factor(vo[0] * torch.randn(D, D) / math.sqrt(D) - vo[1] * eye, D)
    w_v.copy_(left)
    # proj computes y @ proj.weight.T, so W_v^T proj.weight^T = left^T right
    attention.proj.weight.copy_(right.T)


def sincos_2d(grid: int, width: int, temperature: float = 10_000.0) -> torch.Tensor:
    """(grid*grid, width) position table of big_vision's `posemb_sincos_2d`: sin and cos of x, then
    of y, each at width/4 frequencies from 1 down to 1/temperature."""
    y, x = torch.meshgrid(
        torch.arange(grid, dtype=torch.float64),
        torch.arange(grid, dtype=torch.float64),
        indexing="ij",
    )
    omega = 1.0 / temperature ** (
        torch.arange(width // 4, dtype=torch.float64) / max(1, width // 4 - 1)
    )
    x, y = x.flatten()[:, None] * omega, y.flatten()[:, None] * omega  # (grid*grid, width/4)
    return torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=1).float()

"""Where the model looks: attention rollout (Abnar & Zuidema, 2020) and one layer's raw attention,
as a map over the patch grid, drawn beside and over the image.

Rollout follows the notebook of jeonsworld/ViT-pytorch (the tutorial): average the heads, add the
identity for the residual path, renormalise the rows, and multiply the layers through, first layer
rightmost. A model with a class token is explained by the class token's row; a model without one
(average or attention pooling) by the mean of all tokens' rows; registers are left out of the map.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..formats.files import atomic_write


def head_average(weights: torch.Tensor) -> torch.Tensor:
    """(B, heads, T, T) -> (B, T, T) in float32 (bf16 autocast returns low-precision weights)."""
    return weights.float().mean(dim=1)


def rollout(attentions: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-layer (B, heads, T, T) attention weights -> (B, T, T): how much each output token draws
    on each input token through all layers, residual connections counted."""
    joint = None
    for weights in attentions:
        a = head_average(weights)
        # The residual path carries each token to itself.
        a = a + torch.eye(a.shape[-1], device=a.device)
        a = a / a.sum(dim=-1, keepdim=True)
        joint = a if joint is None else a @ joint
    if joint is None:
        raise ValueError("rollout needs the attention of at least one layer")
    return joint


def patch_relevance(
    matrix: torch.Tensor, prefix_tokens: int, has_class_token: bool
) -> torch.Tensor:
    """(B, T, T) token-to-token weights -> (B, patches): the class token's row, or for a model
    without class token the mean of all rows, at the patches' columns (the first `prefix_tokens`
    columns are class, distillation and register tokens)."""
    rows = matrix[:, 0] if has_class_token else matrix.mean(dim=1)
    return rows[:, prefix_tokens:]


def attention_map(
    attentions: Sequence[torch.Tensor],
    prefix_tokens: int,
    has_class_token: bool,
    layer: int | None = None,
) -> torch.Tensor:
    """(B, grid, grid) relevance of each patch: the rollout through every layer, or with `layer`
    (0-based) that layer's own attention, heads averaged."""
    matrix = rollout(attentions) if layer is None else head_average(attentions[layer])
    relevance = patch_relevance(matrix, prefix_tokens, has_class_token)
    grid = math.isqrt(relevance.shape[-1])
    return relevance.reshape(-1, grid, grid)


def upsample(grid_map: torch.Tensor, height: int, width: int) -> np.ndarray:
    """(grid, grid) -> (height, width) in [0, 1], bilinear, scaled by its maximum as the notebook
    did."""
    smooth = F.interpolate(
        grid_map[None, None].float(), size=(height, width), mode="bilinear", align_corners=False
    )[0, 0]
    return (smooth / smooth.max().clamp(min=1e-12)).cpu().numpy()


def overlay(image: np.ndarray, grid_map: torch.Tensor, opacity: float = 0.45) -> np.ndarray:
    """uint8 (H, W, 3): the map, upsampled and coloured (jet), laid over the image at `opacity` (0:
    the image alone)."""
    from matplotlib import colormaps

    height, width = image.shape[:2]
    colours = colormaps["jet"](upsample(grid_map, height, width))[..., :3]  # (H, W, 3) in [0, 1]
    blended = (1 - opacity) * image.astype(np.float32) / 255 + opacity * colours
    return np.clip(np.round(blended * 255), 0, 255).astype(np.uint8)


def draw_attention(
    image: np.ndarray, grid_map: torch.Tensor, path: str | os.PathLike, *, title: str, what: str
) -> None:
    """A PNG of three panels: the image, the map over the patch grid (headed `what`), and the map
    laid over the image; `title` above them."""
    from matplotlib.figure import Figure

    height, width = image.shape[:2]
    fig = Figure(figsize=(12, 4.4), layout="constrained")
    axes = fig.subplots(1, 3)
    axes[0].imshow(image)
    axes[0].set_title("image")
    # The map at patch resolution, stretched over the image's pixel extent: each square is one
    # patch.
    pixels = (-0.5, width - 0.5, height - 0.5, -0.5)
    shown = axes[1].imshow(
        grid_map.float().cpu().numpy(), cmap="inferno", extent=pixels, interpolation="nearest"
    )
    axes[1].set_title(what)
    fig.colorbar(shown, ax=axes[1], shrink=0.8)
    axes[2].imshow(overlay(image, grid_map))
    axes[2].set_title("overlay")
    for ax in axes:
        ax.set_axis_off()
    fig.suptitle(title)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))

"""Shared fixtures: the shared data directory and a helper that randomises every parameter."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The project's shared data directory ($VITLAB_SHARED, else <repo>/../shared); skips when absent."""
    path = Path(os.environ.get("VITLAB_SHARED", REPO.parent / "shared"))
    if not path.is_dir():
        pytest.skip(f"shared directory {path} is not present")
    return path


def randomise_parameters(model: nn.Module, seed: int = 0, std: float = 0.02) -> nn.Module:
    """Give every parameter seeded random values, so that nothing is trivially zero or one:
    norm scales 1 + N(0, std), everything else N(0, std) (head, class token, position embedding included)."""
    generator = torch.Generator().manual_seed(seed)
    scales = {id(m.weight) for m in model.modules() if isinstance(m, (nn.LayerNorm, nn.GroupNorm)) and m.weight is not None}
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=generator, dtype=torch.float32) * std
            p.copy_(1.0 + noise if id(p) in scales else noise)
    return model


@pytest.fixture(scope="session")
def randomise():
    return randomise_parameters

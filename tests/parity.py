"""What the format tests share: random images, a model against another library's on them (the same function to
float64's rounding, float32 logits within PARITY_ATOL), weights compared bit for bit, and a random vitlab model written
as the file a test reads."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from vitlab.formats.weights import save_safetensors
from vitlab.model import create_model

from rounding import assert_same_function

REPO = Path(__file__).resolve().parents[1]
PARITY_ATOL = 1e-5  # float32 logits: the target the formats table states, above these models' rounding (printed by -s)


def images(size: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def LOGITS(out):  # noqa: N802  the logits of transformers' output object
    return out.logits


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def assert_parity(ours: nn.Module, reference: nn.Module, size: int, case: str, output=None) -> None:
    """The same function to float64's rounding, and float32 logits within PARITY_ATOL (tests/rounding.py)."""
    x = images(size)
    with torch.no_grad():
        expected = (output or (lambda out: out))(reference(x))
    assert expected.abs().max() > 0.1  # the logits are not trivially zero
    difference = assert_same_function(ours, reference, x, output=output, msg=f"parity {case}")
    assert difference <= PARITY_ATOL, case


class Pooled(nn.Module):
    """vitlab's model to the vector its head reads (`pooled`: what a file without a head computes), or to its tokens
    after the final norm."""

    def __init__(self, model: nn.Module, pooled: bool = True):
        super().__init__()
        self.model, self.pooled = model, pooled

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.model.forward_features(images)
        return self.model.forward_head(tokens, pre_logits=True) if self.pooled else tokens


def backbone_equal(backbone: nn.Module, model: nn.Module) -> None:
    """`backbone` (a file read without its head) holds `model`'s weights but the head's."""
    ours = {k: v for k, v in model.state_dict().items() if not k.startswith("head")}
    assert ours.keys() <= backbone.state_dict().keys()
    for key, value in ours.items():
        assert torch.equal(backbone.state_dict()[key], value), key


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def state_equal(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def vitlab_source(tmp_path, randomise, spec: dict, names: list[str]):
    """A random vitlab model of `spec` (a variant's name and overrides) with `names` as its classes, and the vitlab
    .safetensors file that holds it."""
    spec = dict(spec)
    model = randomise(
        create_model(spec.pop("name"), num_classes=len(names), dropout_rate=0.0, **spec),
        seed=5,
        std=0.05,
    ).eval()
    path = tmp_path / "source.safetensors"
    save_safetensors(model, path, names)
    return model, path


def timm_model(arch: str, size: int, randomise, seed: int = 0, **kwargs) -> nn.Module:
    """timm's `arch` at `size` px with 7 classes, every parameter random, in eval mode."""
    import timm

    return randomise(
        timm.create_model(arch, pretrained=False, num_classes=7, img_size=size, **kwargs), seed=seed
    ).eval()

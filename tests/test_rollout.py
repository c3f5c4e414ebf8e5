"""Attention rollout: hand-computed values, a model built to look at one known patch, and the
`attention` command's PNG and errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vitlab.app import rollout as rollout_module
from vitlab.app.cli import main
from vitlab.app.rollout import attention_map, draw_attention, overlay, patch_relevance, rollout
from vitlab.model import create_model


def test_rollout_by_hand():
    # One head, two tokens: token 0 looks half at itself and half at token 1; token 1 only at itself.
    a = torch.tensor([[[[0.5, 0.5], [0.0, 1.0]]]])  # (B=1, heads=1, T=2, T=2)
    # With the residual path: (a + I), rows renormalised: [[0.75, 0.25], [0, 1]]; two layers multiply.
    expected = torch.tensor([[[0.75**2, 0.75 * 0.25 + 0.25], [0.0, 1.0]]])
    torch.testing.assert_close(rollout([a, a]), expected)
    torch.testing.assert_close(rollout([a]), torch.tensor([[[0.75, 0.25], [0.0, 1.0]]]))


def test_rollout_averages_heads_and_multiplies_later_layers_on_the_left():
    generator = torch.Generator().manual_seed(0)
    layers = [torch.rand(2, 3, 5, 5, generator=generator).softmax(-1) for _ in range(3)]
    eye = torch.eye(5)
    joint = eye.expand(2, 5, 5)
    for weights in layers:
        a = (weights.mean(1) + eye) / 2  # rows of a softmax sum to 1, so (a + I) rows sum to 2
        joint = a @ joint
    torch.testing.assert_close(rollout(layers), joint)
    torch.testing.assert_close(rollout(layers).sum(-1), torch.ones(2, 5))  # rows stay distributions


def test_patch_relevance_class_token_row_or_mean_of_rows():
    matrix = torch.arange(9.0).reshape(1, 3, 3)
    torch.testing.assert_close(
        patch_relevance(matrix, 1, has_class_token=True), torch.tensor([[1.0, 2.0]])
    )
    torch.testing.assert_close(
        patch_relevance(matrix, 0, has_class_token=False), torch.tensor([[3.0, 4.0, 5.0]])
    )


def looking_at(patch: int, classifier: str):
    """A 16 px model of 4 x 4 patches whose every token, in every layer, attends to `patch`.

    Images are ignored (zero patch embedding), so a token is its position embedding: the chosen patch
    is [1, -1, 0, 0], every other token [0, 0, 1, -1]. Queries are a constant 10 * [1, -1, 0, 0] and
    keys the normalised token, so only the chosen patch scores (about 14 against 0). The attention
    output and the MLP write nothing back, so every layer sees the same tokens."""
    model = create_model(
        "testing",
        hidden_size=4,
        num_heads=1,
        mlp_dim=4,
        depth=3,
        patch_size=4,
        img_size=16,
        num_classes=3,
        classifier=classifier,
    ).eval()
    prefix = 1 if classifier == "token" else 0
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.pos_embed[0, :] = torch.tensor([0.0, 0.0, 1.0, -1.0])
        model.pos_embed[0, prefix + patch] = torch.tensor([1.0, -1.0, 0.0, 0.0])
        for block in model.blocks:
            block.norm1.weight.fill_(1.0)
            block.norm2.weight.fill_(1.0)
            block.attn.qkv.bias[:4] = 10 * torch.tensor([1.0, -1.0, 0.0, 0.0])
            block.attn.qkv.weight[4:8] = torch.eye(4)
    return model


@pytest.mark.parametrize("classifier", ["token", "gap"])
@pytest.mark.parametrize("patch", [0, 6, 13])
def test_map_peaks_on_the_patch_the_model_looks_at(patch, classifier):
    model = looking_at(patch, classifier)
    _, attentions = model(torch.zeros(1, 3, 16, 16), return_attention=True)
    # The construction works.
    assert attentions[0][0, 0, -1].argmax() == patch + (classifier == "token")
    for layer in (None, 0, 2):
        grid_map = attention_map(
            attentions, int(classifier == "token"), classifier == "token", layer
        )
        assert grid_map.shape == (1, 4, 4)
        assert int(grid_map.flatten().argmax()) == patch


def test_overlay_blends_the_coloured_map_over_the_image():
    image = np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    grid_map = torch.zeros(4, 4)
    grid_map[1, 2] = 1.0  # one patch: jet's dark red there, its dark blue (0, 0, 0.5) far from it
    assert np.array_equal(overlay(image, grid_map, 0.0), image)
    coloured = overlay(image, grid_map, 1.0)
    assert coloured.shape == image.shape and coloured.dtype == np.uint8
    assert (
        np.array_equal(coloured[29, 0], [0, 0, 128])
        and coloured[11, 25, 0] > 100
        and coloured[11, 25, 2] == 0
    )
    half = overlay(image, grid_map, 0.5).astype(int)
    assert np.abs(half - (image.astype(int) + coloured.astype(int)) / 2).max() <= 1


def test_draw_attention_writes_a_png(tmp_path):
    image = np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    draw_attention(
        image,
        torch.rand(4, 4),
        tmp_path / "a.png",
        title="predicted: cat (50.0%)",
        what="attention rollout",
    )
    with Image.open(tmp_path / "a.png") as png:
        assert png.format == "PNG" and png.size[0] > png.size[1] > 100
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]  # no temporary file left


# ---------------------------------------------------------------------------------------------
# vitlab attention


def test_attention_command_on_the_built_model_finds_its_patch(tmp_path, monkeypatch):
    model = looking_at(9, "token")
    checkpoint = tmp_path / "looking.pt"
    torch.save(
        {
            "model": model.state_dict(),
            "model_config": model.config.to_dict(),
            "class_names": ["a", "b", "c"],
        },
        checkpoint,
    )
    Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8)).save(tmp_path / "image.png")
    drawn = {}
    monkeypatch.setattr(
        rollout_module,
        "draw_attention",
        lambda image, grid_map, *rest, **labels: drawn.update(image=image, grid_map=grid_map),
    )
    assert (
        main(["attention", str(checkpoint), str(tmp_path / "image.png"), "--precision", "fp32"])
        == 0
    )
    # Drawn over the image as given, not the model's input.
    assert drawn["image"].shape == (64, 64, 3)
    assert int(drawn["grid_map"].flatten().argmax()) == 9


def test_attention_command_writes_pngs(tiny_run, tmp_path, capsys):
    image = tmp_path / "cat.png"
    image.write_bytes((tiny_run.data_dir / "cat" / "0.png").read_bytes())
    assert main(["attention", str(tiny_run.checkpoint), str(image)]) == 0
    assert "predicted: " in capsys.readouterr().out
    assert (
        main(
            [
                "attention",
                str(tiny_run.checkpoint),
                str(image),
                "--layer",
                "1",
                "--out",
                str(tmp_path / "out" / "l1.png"),
            ]
        )
        == 0
    )
    for path in (tmp_path / "cat_attention.png", tmp_path / "out" / "l1.png"):
        with Image.open(path) as png:
            png.verify()


def test_attention_command_errors_are_one_line(tiny_run, tmp_path, capsys):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 truncated")
    assert main(["attention", str(tiny_run.checkpoint), str(bad)]) == 1
    line = capsys.readouterr().err.strip().splitlines()
    assert len(line) == 1 and str(bad) in line[0]
    assert (
        main(
            [
                "attention",
                str(tiny_run.checkpoint),
                str(tiny_run.data_dir / "cat" / "0.png"),
                "--layer",
                "2",
            ]
        )
        == 2
    )
    line = capsys.readouterr().err.strip().splitlines()
    assert len(line) == 1 and "numbered 1 to 1" in line[0]
    assert not list(tmp_path.glob("*_attention*.png"))

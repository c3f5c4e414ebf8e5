"""Meta's DINOv2 files: random hub-layout state dicts (with and without registers, giant's SwiGLU) give in vitlab the
features of timm's model after timm's own conversion of the same file, with DINOv2's function and preprocessing; a
file fine-tuned at another size has its position table resampled by DINOv2's own rule (written out here from its
`interpolate_pos_encoding`); what vitlab cannot read is refused in one line."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vitlab.app.cli import main
from vitlab.config import get_config
from vitlab.errors import CheckpointError
from vitlab.formats.checkpoints import load_backbone, load_model, pretrained_model

from parity import Pooled, assert_parity, backbone_equal, one_error_line, timm_model

timm = pytest.importorskip("timm")

IMAGENET_MEAN = (0.485, 0.456, 0.406)


def meta_state(reference: nn.Module, seed: int = 1) -> dict[str, torch.Tensor]:
    """A timm DINOv2 model's weights as Meta's hub files hold them (timm's `_convert_dinov2` undone): no head, a mask
    token,
    and with registers `register_tokens` and a position row for the class token, which Meta adds before it inserts
    the registers; giant's SwiGLU as w12 and w3."""
    generator = torch.Generator().manual_seed(seed)
    state = {k: v for k, v in reference.state_dict().items() if not k.startswith("head.")}
    width = state["pos_embed"].shape[-1]
    state["mask_token"] = torch.randn(1, width, generator=generator) * 0.02
    if "reg_token" in state:
        class_row = torch.randn(1, 1, width, generator=generator) * 0.02
        state["register_tokens"] = state.pop("reg_token")
        state["cls_token"] = state["cls_token"] - class_row
        state["pos_embed"] = torch.cat([class_row, state["pos_embed"]], dim=1)
    swiglu = {".mlp.fc1.": ".mlp.w12.", ".mlp.fc2.": ".mlp.w3."}
    if reference.blocks[0].mlp.fc1.out_features == 2 * reference.blocks[0].mlp.fc2.in_features:
        state = {
            next((k.replace(a, b) for a, b in swiglu.items() if a in k), k): v
            for k, v in state.items()
        }
    return state


def timm_dinov2(arch: str, path, size: int, **kwargs) -> nn.Module:
    """timm's model at `size` px after timm's own conversion of Meta's file (checkpoint_filter_fn: _convert_dinov2)."""
    return timm.create_model(
        arch,
        pretrained=True,
        pretrained_cfg_overlay={"file": str(path)},
        num_classes=0,
        img_size=size,
        **kwargs,
    ).eval()


# (timm's architecture, its arguments, the vitlab variant and its shape's overrides, the ModelConfig fields expected)
DINOV2_CASES = {
    "DINOv2": (
        "vit_small_patch14_dinov2",
        {"depth": 2},
        ("dinov2-S/14", {}),
        dict(reg_tokens=0, pos_embed_prefix=True),
    ),
    "with registers": (
        "vit_small_patch14_reg4_dinov2",
        {"depth": 2},
        ("dinov2-reg-S/14", {}),
        dict(reg_tokens=4, pos_embed_prefix=False),
    ),
    "giant's SwiGLU": (
        "vit_giant_patch14_dinov2",
        {"depth": 1, "embed_dim": 384, "num_heads": 6},
        ("dinov2-g/14", dict(hidden_size=384, num_heads=6, mlp_dim=1024)),
        dict(mlp="swiglu", mlp_dim=1024),
    ),
}


@pytest.mark.parametrize("case", list(DINOV2_CASES))
def test_meta_dinov2_file_gives_timms_features(case, tmp_path, randomise, capsys):
    arch, kwargs, (variant, shape), expected = DINOV2_CASES[case]
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(meta_state(timm_model(arch, 28, randomise, **kwargs)), path)
    reference = timm_dinov2(arch, path, 28, **kwargs)
    # Fine-tuning's path: the file's model, the task's classes; pooled as Meta's backbone (its class token)
    wanted = get_config(
        variant, depth=kwargs["depth"], img_size=28, num_classes=7, classifier="token", **shape
    )
    ours = pretrained_model(path, wanted, verbose=False).eval()
    dinov2 = dict(
        gelu="exact",
        layer_norm_eps=1e-6,
        layer_scale=1e-5,
        image_mean=IMAGENET_MEAN,
        crop_pct=0.875,
    )
    assert {f: getattr(ours.config, f) for f in {**expected, **dinov2}} == {**expected, **dinov2}
    assert ours.config.num_heads == 6 and ours.config.img_size == 28
    assert_parity(Pooled(ours), reference, 28, f"Meta's DINOv2 {case}")
    backbone_equal(load_backbone(path), ours)  # the frozen-feature commands' reading
    # A hub file has no head: the commands that classify refuse it, naming fine-tuning
    assert main(["predict", str(path), "x.png"]) == 1
    assert "holds no classification head (a feature extractor)" in one_error_line(capsys)


def dinov2_positions(
    pos_embed: torch.Tensor, image: int, patch: int, offset: float, antialias: bool
):
    """DINOv2's `interpolate_pos_encoding` (facebookresearch/dinov2, dinov2/models/vision_transformer.py) for a
    square image of `image` px: the class row apart, the patch rows resampled bicubic in float32 to the scale factor
    (image // patch + offset) / side where the offset is non-zero (the hub models without registers: 0.1), else to
    the size (with registers, antialiased)."""
    side = math.isqrt(pos_embed.shape[1] - 1)
    new = image // patch
    grid = pos_embed[:, 1:].float().reshape(1, side, side, -1).permute(0, 3, 1, 2)
    if offset:
        factor = float(new + offset) / side
        grid = F.interpolate(
            grid, scale_factor=(factor, factor), mode="bicubic", antialias=antialias
        )
    else:
        grid = F.interpolate(grid, size=(new, new), mode="bicubic", antialias=antialias)
    assert grid.shape[-2:] == (new, new)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new * new, -1)
    return torch.cat([pos_embed[:, :1].float(), grid], dim=1).to(pos_embed.dtype)


# (timm's architecture, the variant, DINOv2's interpolate_offset and interpolate_antialias of its hub models)
RESIZE_CASES = {
    "DINOv2": ("vit_small_patch14_dinov2", "dinov2-S/14", 0.1, False),
    "with registers": ("vit_small_patch14_reg4_dinov2", "dinov2-reg-S/14", 0.0, True),
}


@pytest.mark.parametrize("case", list(RESIZE_CASES))
def test_fine_tuning_at_another_size_resamples_as_dinov2_does(case, tmp_path, randomise, capsys):
    arch, variant, offset, antialias = RESIZE_CASES[case]
    state = meta_state(timm_model(arch, 56, randomise, depth=2))
    torch.save(state, tmp_path / "dinov2.pth")
    wanted = get_config(variant, depth=2, img_size=42, num_classes=7, classifier="token")
    ours = pretrained_model(tmp_path / "dinov2.pth", wanted).eval()
    rule = "dinov2-reg" if offset == 0 else "dinov2"
    assert (
        f"position embeddings resized from 16 to 9 patches ({rule}'s rule)"
        in capsys.readouterr().out
    )
    # The reference: Meta's table resampled as Meta's model does at 42 px, then timm's conversion of that file
    resized = dinov2_positions(state["pos_embed"], 42, 14, offset, antialias)
    torch.save({**state, "pos_embed": resized}, tmp_path / "dinov2-42.pth")
    reference = timm_dinov2(arch, tmp_path / "dinov2-42.pth", 42, depth=2)
    assert_parity(Pooled(ours), reference, 42, f"Meta's DINOv2 {case} at 42 px")
    # which DINOv2's other rule (timm's, for the models without registers) would not have given
    other = dinov2_positions(state["pos_embed"], 42, 14, 0.1 - offset, not antialias)
    assert not torch.allclose(other, resized, rtol=0, atol=1e-4)


def test_meta_dinov2_file_and_model_type(tmp_path, randomise):
    path = tmp_path / "dinov2.pth"
    torch.save(
        meta_state(timm_model("vit_small_patch14_dinov2", 28, randomise, depth=1)),
        path,
    )
    with pytest.raises(
        CheckpointError, match="hidden_size 384, and --model_type dinov2-B/14 has 768"
    ):
        load_model(path, model_type="dinov2-B/14")
    # A width no DINOv2 variant has: its heads must be named
    wide = timm_model(
        "vit_small_patch14_dinov2",
        28,
        randomise,
        depth=1,
        embed_dim=128,
        num_heads=2,
    )
    torch.save(meta_state(wide), path)
    with pytest.raises(
        CheckpointError, match="DINOv2 model of width 128 .* pass the variant with --model_type"
    ):
        load_model(path)


def _chunked(state):
    # DINOv2's training builds its blocks in chunks (block_chunks): blocks.C.N.*, which its hub files do not have
    return {k.replace("blocks.0.", "blocks.0.0."): v for k, v in state.items()}


def _bad_registers(state):
    return {**state, "cls_token": state["cls_token"][..., :-1]}


DINOV2_REFUSALS = {
    "chunked blocks": ("vit_small_patch14_dinov2", _chunked, "unexpected keys blocks.0.0."),
    "a class token of another width": (
        "vit_small_patch14_reg4_dinov2",
        _bad_registers,
        "are not a class token and its position table",
    ),
}


@pytest.mark.parametrize("case", list(DINOV2_REFUSALS))
def test_dinov2_refusals(case, tmp_path, randomise, capsys):
    arch, change, expected = DINOV2_REFUSALS[case]
    path = tmp_path / "dinov2.pth"
    torch.save(change(meta_state(timm_model(arch, 28, randomise, depth=1))), path)
    assert main(["predict", str(path), "x.png"]) == 1
    line = one_error_line(capsys)
    assert str(path) in line and expected in line, line

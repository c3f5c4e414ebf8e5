"""big_vision's SigLIP files: random two-tower `.npz` files (the blocks one key each as released, or stacked as
scanned; attention pooling or the patches' mean; with or without a head of the image tower) give in vitlab the logits
of timm's model after timm's own `_load_weights` of the same file, with big_vision's function (the tanh GELU) and
SigLIP's preprocessing, reading the image tower alone; fine-tuning at another size resamples as big_vision's
`resample_posemb` does (scipy's zoom, called here); what vitlab cannot read is refused in one line."""

from __future__ import annotations

import numpy as np
import pytest
from torch import nn

from vitlab.app.cli import main
from vitlab.config import get_config
from vitlab.formats.checkpoints import load_backbone, load_model, pretrained_model

from parity import Pooled, assert_parity, backbone_equal, one_error_line, timm_model

timm = pytest.importorskip("timm")
scipy_ndimage = pytest.importorskip("scipy.ndimage")


def _attention(
    s: dict, fused: dict[str, tuple[str, ...]], out: str, heads: int
) -> dict[str, np.ndarray]:
    """timm's fused linear layers (`fused`: module -> the projections it stacks) and output layer as flax's
    MultiHeadDotProductAttention kernels: query, key and value (D, heads, head_dim), out (heads, head_dim, D)."""
    width = s[out + ".weight"].shape[0]
    arrays = {
        "out/kernel": s[out + ".weight"].T.reshape(heads, -1, width),
        "out/bias": s[out + ".bias"],
    }
    for module, names in fused.items():
        for i, name in enumerate(names):
            rows = slice(i * width, (i + 1) * width)
            arrays[f"{name}/kernel"] = s[module + ".weight"][rows].T.reshape(width, heads, -1)
            arrays[f"{name}/bias"] = s[module + ".bias"][rows].reshape(heads, -1)
    return arrays


def _layer(s: dict, prefix: str, **modules) -> dict[str, np.ndarray]:
    """flax's LayerNorm (scale, bias) or Dense (kernel (in, out), bias) of each of timm's `modules` (flax's name ->
    timm's), told apart by the weight's rank."""
    arrays = {}
    for name, module in modules.items():
        weight = s[module + ".weight"]
        kind = "scale" if weight.ndim == 1 else "kernel"
        arrays.update({f"{name}/{kind}": weight.T, f"{name}/bias": s[module + ".bias"]})
    return {prefix + k: v for k, v in arrays.items()}


def big_vision_arrays(
    reference: nn.Module, stacked: bool, head: bool = True, seed: int = 3
) -> dict[str, np.ndarray]:
    """A timm SigLIP model's weights as big_vision's two-tower files hold them (timm's `_load_weights` undone): the
    image tower under params/img/ (blocks numbered big_vision's way: attention 0, LayerNorm_1, MlpBlock_0), beside a
    text tower and the loss's temperature and bias."""
    s = {k: v.detach().numpy() for k, v in reference.state_dict().items()}
    heads = reference.blocks[0].attn.num_heads
    img = {
        "embedding/kernel": s["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
        "embedding/bias": s["patch_embed.proj.bias"],
        "pos_embedding": s["pos_embed"],
        **_layer(s, "Transformer/", encoder_norm="norm"),
    }
    if head:  # SigLIP's released image towers have none (big_vision's out_dim None)
        img.update(_layer(s, "", head="head"))
    blocks = []
    for i in range(len(reference.blocks)):
        b = f"blocks.{i}."
        block = _layer(s, "", LayerNorm_0=b + "norm1", LayerNorm_1=b + "norm2")
        block.update(_layer(s, "MlpBlock_0/", Dense_0=b + "mlp.fc1", Dense_1=b + "mlp.fc2"))
        attention = _attention(
            s, {b + "attn.qkv": ("query", "key", "value")}, b + "attn.proj", heads
        )
        block.update({"MultiHeadDotProductAttention_0/" + k: v for k, v in attention.items()})
        blocks.append(block)
    if stacked:
        img.update(
            {"Transformer/encoderblock/" + k: np.stack([b[k] for b in blocks]) for k in blocks[0]}
        )
    else:
        img.update(
            {
                f"Transformer/encoderblock_{i}/{k}": v
                for i, b in enumerate(blocks)
                for k, v in b.items()
            }
        )
    if "attn_pool.latent" in s:
        p = "attn_pool."
        fused = {p + "q": ("query",), p + "kv": ("key", "value")}
        attention = _attention(s, fused, p + "proj", heads)
        img.update(
            {"MAPHead_0/MultiHeadDotProductAttention_0/" + k: v for k, v in attention.items()}
        )
        img.update(
            {"MAPHead_0/probe": s[p + "latent"], **_layer(s, "MAPHead_0/", LayerNorm_0=p + "norm")}
        )
        img.update(_layer(s, "MAPHead_0/MlpBlock_0/", Dense_0=p + "mlp.fc1", Dense_1=p + "mlp.fc2"))
    rng = np.random.default_rng(seed)
    text = {
        "txt/Embed_0/embedding": (10, 32),
        "txt/Encoder_0/encoder_norm/scale": (32,),
        "t": (1,),
        "b": (1,),
    }
    return {
        **{"params/img/" + k: np.ascontiguousarray(v) for k, v in img.items()},
        **{
            "params/" + k: rng.standard_normal(shape).astype(np.float32)
            for k, shape in text.items()
        },
    }


def save_npz(arrays: dict, path) -> None:
    np.savez(path, **arrays)


def timm_siglip(arch: str, path, size: int, num_classes: int, **kwargs) -> nn.Module:
    """timm's model with big_vision's tanh GELU after timm's own `_load_weights` of the file (timm's SigLIP
    architectures compute the exact GELU; big_vision's MlpBlock, flax's nn.gelu, the tanh form)."""
    return timm.create_model(
        arch,
        pretrained=True,
        pretrained_cfg_overlay={"file": str(path), "custom_load": True, "num_classes": num_classes},
        num_classes=num_classes,
        img_size=size,
        act_layer="gelu_tanh",
        **kwargs,
    ).eval()


# (timm's architecture, blocks stacked, the image tower's head, the vitlab classifier)
SIGLIP_CASES = {
    "as released: blocks one key each, no head": (
        "vit_base_patch16_siglip_224",
        False,
        False,
        "map",
    ),
    "scanned: blocks stacked, a head": ("vit_base_patch16_siglip_224", True, True, "map"),
    "the patches' mean, a head": ("vit_base_patch16_siglip_gap_224", False, True, "gap"),
}


@pytest.mark.parametrize("case", list(SIGLIP_CASES))
def test_siglip_npz_gives_timms_logits(case, tmp_path, randomise, capsys):
    arch, stacked, head, classifier = SIGLIP_CASES[case]
    source = timm_model(arch, 32, randomise, depth=2, act_layer="gelu_tanh")
    arrays = big_vision_arrays(source, stacked, head)
    arrays["params/txt/Embed_0/embedding"][0, 0] = np.nan  # the text tower is not read
    path = tmp_path / "webli_en_b16_224_63724782.npz"
    save_npz(arrays, path)
    reference = timm_siglip(arch, path, 32, 7 if head else 0, depth=2)
    if head:
        ours, names = load_model(path)  # the file says its whole model
        assert names == [f"class {i}" for i in range(7)]
    else:
        assert main(["predict", str(path), "x.png"]) == 1
        assert "holds no classification head (a feature extractor)" in one_error_line(capsys)
        wanted = get_config("siglip-B/16", depth=2, img_size=32, num_classes=7)
        ours = Pooled(pretrained_model(path, wanted, verbose=False).eval())
        backbone_equal(load_backbone(path), ours.model)  # the frozen-feature commands' reading
    config = (ours.model if not head else ours).config
    siglip = dict(
        name="siglip-B/16",
        classifier=classifier,
        has_class_token=False,
        num_heads=12,
        gelu="tanh",
        layer_norm_eps=1e-6,
        image_mean=(0.5, 0.5, 0.5),
        resize="squash",
        interpolation="bilinear",  # big_vision's resize, where timm and transformers say bicubic
        img_size=32,
    )
    assert {f: getattr(config, f) for f in siglip} == siglip
    assert_parity(ours, reference, 32, f"SigLIP {case}")


def test_fine_tuning_at_another_size_resamples_as_big_vision_does(tmp_path, randomise, capsys):
    arch = "vit_base_patch16_siglip_224"
    arrays = big_vision_arrays(
        timm_model(arch, 32, randomise, depth=2, act_layer="gelu_tanh"), False
    )
    save_npz(arrays, tmp_path / "siglip.npz")
    wanted = get_config("siglip-B/16", depth=2, img_size=48, num_classes=7)
    ours = pretrained_model(tmp_path / "siglip.npz", wanted).eval()
    assert "resized from 4 to 9 patches (official's rule)" in capsys.readouterr().out
    # big_vision's resample_posemb: the (2, 2, D) grid zoomed to (3, 3, D) by scipy, linearly; then timm reads the
    # file at 48 px without resampling it again
    grid = arrays["params/img/pos_embedding"].reshape(2, 2, -1)
    zoomed = scipy_ndimage.zoom(grid, (3 / 2, 3 / 2, 1), order=1).reshape(1, 9, -1)
    save_npz({**arrays, "params/img/pos_embedding": zoomed}, tmp_path / "siglip-48.npz")
    reference = timm_siglip(arch, tmp_path / "siglip-48.npz", 48, 7, depth=2)
    ours.head.load_state_dict(
        reference.head.state_dict()
    )  # the file has no head: the same random one
    assert_parity(ours, reference, 48, "SigLIP at 48 px")


def _without(*keys):
    return lambda arrays: {
        k: v for k, v in arrays.items() if k.removeprefix("params/img/") not in keys
    }


# (the change to a random SigLIP file, --model_type, what the error line says)
SIGLIP_REFUSALS = {
    "a variant of another width": (
        lambda a: a,
        "siglip-L/16",
        "hidden_size 768 with 12 heads, and --model_type siglip-L/16 has 1024 with 16",
    ),
    "the MAP head's MLP missing": (
        _without("MAPHead_0/MlpBlock_0/Dense_1/kernel"),
        None,
        "missing key 'MAPHead_0/MlpBlock_0/Dense_1/kernel'",
    ),
    "a class token (big_vision's tok pooling)": (
        lambda a: {**a, "params/img/cls": np.zeros((1, 1, 768), np.float32)},
        None,
        "unexpected keys cls",
    ),
    "no blocks": (
        lambda a: {k: v for k, v in a.items() if "encoderblock" not in k},
        None,
        "no params/img/Transformer/encoderblock: not big_vision's ViT image tower",
    ),
    "rectangular patches": (
        lambda a: {**a, "params/img/embedding/kernel": a["params/img/embedding/kernel"][:, :8]},
        None,
        "vitlab computes square patches of RGB images on a square grid",
    ),
}


@pytest.mark.parametrize("case", list(SIGLIP_REFUSALS))
def test_siglip_refusals(case, tmp_path, randomise, capsys):
    change, model_type, expected = SIGLIP_REFUSALS[case]
    source = timm_model(
        "vit_base_patch16_siglip_224", 32, randomise, depth=1, act_layer="gelu_tanh"
    )
    path = tmp_path / "siglip.npz"
    save_npz(change(big_vision_arrays(source, False)), path)
    assert (
        main(["predict", str(path), "x.png", *(["--model_type", model_type] if model_type else [])])
        == 1
    )
    line = one_error_line(capsys)
    assert str(path) in line and expected in line, line

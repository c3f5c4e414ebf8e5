"""Google's official checkpoints: parity with timm as an independent reader of the `.npz` format, the position
embedding resize, round trips, the golden file, head handling, every kind of bad file, the named downloads."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
import scipy.ndimage
import torch
import torch.nn.functional as F
from torch import nn

from vitlab.errors import CheckpointError
from vitlab.formats import official, official_layout
from vitlab.formats.official import load_official, save_npz
from vitlab.formats.official_layout import resample_positions
from vitlab.model import create_model

from rounding import assert_same_function, assert_within, ulps

timm = pytest.importorskip("timm")
std_conv = pytest.importorskip("timm.layers.std_conv")
timm_vit_module = pytest.importorskip("timm.models.vision_transformer")

PARITY_ATOL = 2e-5  # float32 logits against timm's, above these models' rounding (tests/rounding.py; printed by -s)


def images(size: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def state_equal(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


# ---------------------------------------------------------------------------------------------
# timm as an independent reader of the official format


def zoom_resample_abs_pos_embed(posemb, new_size, old_size=None, num_prefix_tokens=1, **_):
    """The official resize (vit_jax/checkpoint.py), written here for timm: the class token kept apart,
    the square grid zoomed with scipy.ndimage.zoom(order=1)."""
    prefix, grid = (
        posemb[:, :num_prefix_tokens],
        posemb[0, num_prefix_tokens:].detach().cpu().numpy(),
    )
    old = round(float(np.sqrt(grid.shape[0])))
    assert old * old == grid.shape[0]
    grid = grid.reshape(old, old, -1)
    grid = scipy.ndimage.zoom(grid, (new_size[0] / old, new_size[1] / old, 1), order=1)
    assert grid.shape[:2] == tuple(new_size)
    grid = (
        torch.from_numpy(np.ascontiguousarray(grid)).reshape(1, -1, grid.shape[-1]).to(posemb.dtype)
    )
    return torch.cat([prefix, grid], dim=1)


def timm_vit(name: str, img_size: int, **kwargs) -> nn.Module:
    model = timm.create_model(
        name, pretrained=False, num_classes=10, img_size=img_size, act_layer="gelu_tanh", **kwargs
    )
    # The official conventions must be timm's too, or the comparison means nothing.
    assert model.norm.eps == 1e-6 and model.blocks[0].norm1.eps == 1e-6
    probe = torch.linspace(-3, 3, 61)
    torch.testing.assert_close(
        model.blocks[0].mlp.act(probe), F.gelu(probe, approximate="tanh"), rtol=0, atol=0
    )
    return model.eval()


TIMM_NAMES = {
    "Ti/16": "vit_tiny_patch16_224",
    "S/16": "vit_small_patch16_224",
    "B/16": "vit_base_patch16_224",
}


@pytest.fixture(scope="module")
def official_files(tmp_path_factory, randomise):
    """Per variant, lazily: a randomised 10-class 224 px model and the .npz that save_npz wrote for it."""
    directory = tmp_path_factory.mktemp("official")
    cache = {}

    def get(variant: str):
        if variant not in cache:
            model = create_model(variant, num_classes=10, img_size=224).eval()
            randomise(model, seed=sum(map(ord, variant)))
            path = directory / (variant.replace("/", "_") + ".npz")
            save_npz(model, path)
            cache[variant] = (model, path)
        return cache[variant]

    return get


@pytest.mark.parametrize("resolution", [224, 160])
@pytest.mark.parametrize("variant", list(TIMM_NAMES))
def test_parity_with_timm(variant, resolution, official_files, monkeypatch):
    source, path = official_files(variant)
    calls = []

    def resample(*args, **kwargs):
        calls.append(kwargs.get("new_size"))
        return zoom_resample_abs_pos_embed(*args, **kwargs)

    monkeypatch.setattr(timm_vit_module, "resample_abs_pos_embed", resample)
    reference = timm_vit(TIMM_NAMES[variant], resolution)
    timm_vit_module._load_weights(reference, str(path))

    if resolution == 224:
        ours = source  # the model that wrote the file
    else:  # a 160 px model reading the 224 px file: both sides resize the position embeddings
        ours = create_model(variant, num_classes=10, img_size=resolution).eval()
        load_official(ours, path, verbose=False)
    assert calls == ([] if resolution == 224 else [(resolution // 16, resolution // 16)])
    if resolution != 224:
        # Both resize as scipy does, each rounding the result to float32 once: within one unit of each other. Then the
        # networks are compared on the same table, as one function.
        assert_within(
            ours.pos_embed,
            reference.pos_embed,
            ulps(ours.pos_embed, torch.float32),
            "resized table",
        )
        with torch.no_grad():
            reference.pos_embed.copy_(ours.pos_embed)
    x = images(resolution)
    with torch.no_grad():
        expected, got = reference(x), ours(x)
    assert got.shape == (2, 10)
    assert expected.abs().max() > 0.1  # the logits are not trivially zero
    assert (
        assert_same_function(ours, reference, x, msg=f"timm {variant} at {resolution} px")
        <= PARITY_ATOL
    )


def test_parity_fails_when_key_and_value_are_swapped(official_files, tmp_path):
    source, path = official_files("Ti/16")
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    attention = "Transformer/encoderblock_3/MultiHeadDotProductAttention_1/"
    for part in ("kernel", "bias"):
        arrays[attention + "key/" + part], arrays[attention + "value/" + part] = (
            arrays[attention + "value/" + part],
            arrays[attention + "key/" + part],
        )
    swapped = tmp_path / "swapped.npz"
    np.savez(swapped, **arrays)
    reference = timm_vit("vit_tiny_patch16_224", 224)
    timm_vit_module._load_weights(reference, str(swapped))
    x = images(224)
    with torch.no_grad():
        assert max_diff(source(x), reference(x)) > 100 * PARITY_ATOL
        # ... and our reader of the swapped file agrees with timm's, not with the source model.
        ours = load_official(
            create_model("Ti/16", num_classes=10, img_size=224).eval(), swapped, verbose=False
        )
    assert assert_same_function(ours, reference, x, msg="swapped key and value") <= PARITY_ATOL


def test_parity_fails_with_timm_default_resampler(official_files):
    # timm's own resize (bilinear, align_corners=False) is not the official one: the monkeypatch matters.
    _, path = official_files("Ti/16")
    reference = timm_vit("vit_tiny_patch16_224", 160)
    timm_vit_module._load_weights(reference, str(path))
    ours = load_official(
        create_model("Ti/16", num_classes=10, img_size=160).eval(), path, verbose=False
    )
    with torch.no_grad():
        assert max_diff(ours(images(160)), reference(images(160))) > 10 * PARITY_ATOL


def _official_std_conv_forward(self, x):
    """BiT's weight standardisation as the official code has it: (w - mean) / (std + 1e-5), population std."""
    if self.same_pad:
        x = timm.layers.padding.pad_same(x, self.kernel_size, self.stride, self.dilation)
    w = self.weight
    w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (
        w.std(dim=(1, 2, 3), keepdim=True, unbiased=False) + 1e-5
    )
    return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


@pytest.mark.parametrize("resolution", [64, 72])
def test_hybrid_parity_with_timm(resolution, tmp_path, monkeypatch, randomise):
    # 72 px: 72 -> 36 -> 18 -> 9 -> 5, the odd side exercising 'SAME' rounding and padding.
    monkeypatch.setattr(std_conv.StdConv2dSame, "forward", _official_std_conv_forward)
    ours = create_model("R50+B/16", num_classes=10, img_size=resolution, depth=2).eval()
    randomise(ours, seed=11)
    path = tmp_path / "hybrid.npz"
    save_npz(ours, path)

    reference = timm.create_model(
        "vit_base_r50_s16_224",
        pretrained=False,
        num_classes=10,
        img_size=resolution,
        depth=2,
        act_layer="gelu_tanh",
    ).eval()
    group_norms = [m for m in reference.modules() if isinstance(m, nn.GroupNorm)]
    std_convs = [m for m in reference.modules() if isinstance(m, std_conv.StdConv2dSame)]
    # Root, 3 per unit, 3 projections
    assert len(group_norms) == len(std_convs) == 1 + 3 * (3 + 4 + 9) + 3
    for m in group_norms:
        m.eps = 1e-6
    timm_vit_module._load_weights(reference, str(path))
    assert reference.pos_embed.shape == ours.pos_embed.shape

    x = images(resolution)
    with torch.no_grad():
        expected = reference(x)
    assert expected.abs().max() > 0.1
    assert assert_same_function(ours, reference, x, msg=f"hybrid at {resolution} px") <= PARITY_ATOL


# ---------------------------------------------------------------------------------------------
# The position-embedding resize


@pytest.mark.parametrize("old,new", [(14, 10), (14, 24), (24, 14), (7, 7), (2, 5)])
@pytest.mark.parametrize("prefix", [1, 0])
def test_resample_positions_is_scipy_zoom(old, new, prefix):
    D = 8
    pos = torch.randn(
        1, prefix + old * old, D, generator=torch.Generator().manual_seed(old * 100 + new)
    )
    got = resample_positions(pos, prefix, new)
    assert got.shape == (1, prefix + new * new, D) and got.dtype == pos.dtype
    grid = pos[0, prefix:].numpy().astype(np.float64).reshape(old, old, D)
    zoomed = scipy.ndimage.zoom(grid, (new / old, new / old, 1), order=1)
    assert zoomed.shape == (new, new, D)
    # Interpolated in float64 as scipy does, then rounded once to float32: within that rounding of scipy's.
    zoomed = torch.from_numpy(zoomed.reshape(new * new, D))
    assert_within(got[0, prefix:], zoomed, ulps(zoomed, torch.float32), f"{old} -> {new}")
    # The class token is kept, not interpolated
    assert torch.equal(got[:, :prefix], pos[:, :prefix])
    if old == new:
        assert torch.equal(got, pos)


def test_resample_positions_rejects_a_non_square_grid():
    with pytest.raises(CheckpointError, match="square"):
        resample_positions(torch.zeros(1, 1 + 12, 4), 1, 3)


# ---------------------------------------------------------------------------------------------
# Round trips

ROUND_TRIP_VARIANTS = {
    "Ti16": ("Ti/16", {"img_size": 32, "depth": 2}),
    "Ti16-gap": ("Ti/16", {"img_size": 32, "depth": 2, "classifier": "gap"}),
    "Ti16-representation": ("Ti/16", {"img_size": 32, "depth": 2, "representation_size": 48}),
    "R50+B16-depth1": ("R50+B/16", {"img_size": 64, "depth": 1}),
}


@pytest.mark.parametrize("key", list(ROUND_TRIP_VARIANTS))
def test_npz_round_trip_is_bitwise(key, tmp_path, randomise):
    name, overrides = ROUND_TRIP_VARIANTS[key]
    source = randomise(create_model(name, num_classes=10, **overrides), seed=21)
    path = tmp_path / "model.npz"
    save_npz(source, path)
    target = randomise(create_model(name, num_classes=10, **overrides), seed=22)
    for p, q in zip(source.parameters(), target.parameters(), strict=False):
        assert not torch.equal(p, q)
    assert load_official(target, path, verbose=False) is target
    state_equal(source, target)


def test_npz_layout_is_the_official_one(tmp_path, randomise):
    model = randomise(
        create_model("Ti/16", num_classes=10, img_size=32, depth=1, representation_size=48), seed=23
    )
    path = tmp_path / "ti.npz"
    save_npz(model, path)
    with np.load(path, allow_pickle=False) as data:
        shapes = {k: data[k].shape for k in data.files}
        query = data["Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel"]
        embedding = data["embedding/kernel"]
    assert shapes["embedding/kernel"] == (16, 16, 3, 192)
    assert shapes["cls"] == (1, 1, 192)
    assert shapes["Transformer/posembed_input/pos_embedding"] == (1, 5, 192)
    assert shapes["Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel"] == (
        192,
        3,
        64,
    )
    assert shapes["Transformer/encoderblock_0/MultiHeadDotProductAttention_1/value/bias"] == (3, 64)
    assert shapes["Transformer/encoderblock_0/MultiHeadDotProductAttention_1/out/kernel"] == (
        3,
        64,
        192,
    )
    assert shapes["Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel"] == (192, 768)
    assert shapes["Transformer/encoderblock_0/LayerNorm_2/scale"] == (192,)
    assert shapes["pre_logits/kernel"] == (192, 48)
    assert shapes["head/kernel"] == (48, 10)
    # kernels are (in, out): query output unit (head 1, dim 5) reads the input through this column
    np.testing.assert_array_equal(
        query[:, 1, 5], model.blocks[0].attn.qkv.weight[64 + 5].detach().numpy()
    )
    np.testing.assert_array_equal(
        embedding[:, :, 2, 7], model.patch_embed.weight[7, 2].detach().numpy()
    )


def test_golden_file_round_trips_unchanged(shared_dir, tmp_path):
    ref = shared_dir / "reference" / "official-vit-ti16" / "ti16_224.npz"
    if not ref.is_file():
        pytest.skip(f"{ref} is not present")
    model = load_official(create_model("Ti/16", num_classes=10, img_size=224), ref, verbose=False)
    path = tmp_path / "again.npz"
    save_npz(model, path)
    with np.load(ref, allow_pickle=False) as a, np.load(path, allow_pickle=False) as b:
        assert sorted(a.files) == sorted(b.files)
        for key in a.files:
            assert a[key].shape == b[key].shape, key
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


# ---------------------------------------------------------------------------------------------
# Head handling


@pytest.fixture
def pretrained_21k(tmp_path, randomise):
    """A 21k-style file: more classes than the task, and a pre-logits layer."""
    model = randomise(
        create_model("Ti/16", num_classes=21, img_size=32, depth=2, representation_size=192),
        seed=51,
    )
    path = tmp_path / "i21k.npz"
    save_npz(model, path)
    return model, path


def test_21k_file_into_a_10_class_model(pretrained_21k, randomise, capsys):
    source, path = pretrained_21k
    target = randomise(create_model("Ti/16", num_classes=10, img_size=32, depth=2), seed=52)
    load_official(target, path, verbose=True)
    assert not isinstance(target.pre_logits, nn.Sequential)
    assert torch.equal(target.head.weight, torch.zeros(10, 192)) and torch.equal(
        target.head.bias, torch.zeros(10)
    )
    theirs = source.state_dict()
    for key, value in target.state_dict().items():
        if not key.startswith("head."):
            assert torch.equal(value, theirs[key]), key
    out = capsys.readouterr().out
    assert "pre-logits layer dropped" in out and "head of 21 classes replaced" in out


def test_same_class_count_keeps_the_head(pretrained_21k, randomise):
    source, path = pretrained_21k
    target = randomise(
        create_model("Ti/16", num_classes=21, img_size=32, depth=2, representation_size=192),
        seed=53,
    )
    load_official(target, path, verbose=False)
    state_equal(source, target)  # head and pre-logits kept

    plain = randomise(create_model("Ti/16", num_classes=10, img_size=32, depth=1), seed=54)
    save_npz(plain, path.with_name("plain.npz"))
    again = randomise(create_model("Ti/16", num_classes=10, img_size=32, depth=1), seed=55)
    load_official(again, path.with_name("plain.npz"), verbose=False)
    assert torch.equal(again.head.weight, plain.head.weight) and torch.equal(
        again.head.bias, plain.head.bias
    )


def test_model_with_representation_needs_pre_logits(tmp_path):
    path = tmp_path / "plain.npz"
    save_npz(create_model("Ti/16", num_classes=10, img_size=32, depth=1), path)
    with pytest.raises(CheckpointError, match="pre_logits/kernel"):
        load_official(
            create_model("Ti/16", num_classes=10, img_size=32, depth=1, representation_size=192),
            path,
            verbose=False,
        )


# ---------------------------------------------------------------------------------------------
# Bad checkpoints


@pytest.fixture
def small_file(tmp_path, randomise):
    model = randomise(create_model("Ti/16", num_classes=10, img_size=32, depth=2), seed=61)
    path = tmp_path / "small.npz"
    save_npz(model, path)
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    return path, arrays


def fresh_small():
    return create_model("Ti/16", num_classes=10, img_size=32, depth=2)


@pytest.mark.parametrize(
    "change",
    [
        {"gelu": "exact"},
        {"layer_norm_eps": 1e-12},
        {"classifier": "gap", "final_norm": "after_pool"},
    ],
)
def test_model_that_computes_otherwise_is_refused(change, tmp_path):
    # The .npz holds weights only; the official code computes them with flax's eps, the tanh GELU and the norm before pooling.
    shape = {k: v for k, v in change.items() if k == "classifier"}
    path = tmp_path / "official.npz"
    save_npz(create_model("testing", num_classes=3, img_size=32, **shape), path)
    field, value = list(change.items())[-1]
    with pytest.raises(CheckpointError, match=f"this model differs \\({field}\\); pass --{field} "):
        load_official(
            create_model("testing", num_classes=3, img_size=32, **change), path, verbose=False
        )


def test_missing_file(tmp_path):
    path = tmp_path / "absent.npz"
    with pytest.raises(CheckpointError, match="no such checkpoint file") as info:
        load_official(fresh_small(), path)
    assert str(path) in str(info.value)


def random_bytes_file(tmp_path) -> Path:
    path = tmp_path / "random.npz"
    path.write_bytes(b"\x00\x17" + np.random.default_rng(1).bytes(10_000))
    return path


def test_random_bytes_are_refused(tmp_path):
    path = random_bytes_file(tmp_path)
    with pytest.raises(CheckpointError) as info:
        load_official(fresh_small(), path)
    assert str(path) in str(info.value)


def test_random_bytes_message_says_not_an_npz(tmp_path):
    with pytest.raises(CheckpointError, match=r"not an \.npz|not a complete \.npz") as info:
        load_official(fresh_small(), random_bytes_file(tmp_path))
    assert "pickle" not in str(info.value)


def test_npy_file_is_a_checkpoint_error(tmp_path):
    path = tmp_path / "array.npz"
    with open(path, "wb") as f:
        np.save(f, np.zeros((3, 4), np.float32))
    with pytest.raises(CheckpointError, match="npz"):
        load_official(fresh_small(), path)


def test_truncated_npz(small_file, tmp_path):
    path, _ = small_file
    data = path.read_bytes()
    cut = tmp_path / "cut.npz"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as info:
        load_official(fresh_small(), cut)
    assert str(cut) in str(info.value)


def test_missing_key(small_file, tmp_path):
    _, arrays = small_file
    del arrays["Transformer/encoder_norm/scale"]
    path = tmp_path / "missing.npz"
    np.savez(path, **arrays)
    with pytest.raises(CheckpointError, match="missing key 'Transformer/encoder_norm/scale'"):
        load_official(fresh_small(), path)


def test_missing_attention_key(small_file, tmp_path):
    _, arrays = small_file
    del arrays["Transformer/encoderblock_1/MultiHeadDotProductAttention_1/value/bias"]
    path = tmp_path / "missing.npz"
    np.savez(path, **arrays)
    with pytest.raises(
        CheckpointError,
        match="missing key .*encoderblock_1/MultiHeadDotProductAttention_1/value/bias",
    ):
        load_official(fresh_small(), path)


def test_unexpected_key(small_file, tmp_path):
    _, arrays = small_file
    arrays["extra/kernel"] = np.zeros((2, 2), np.float32)
    path = tmp_path / "extra.npz"
    np.savez(path, **arrays)
    with pytest.raises(CheckpointError, match="unexpected keys extra/kernel"):
        load_official(fresh_small(), path)


def test_file_of_a_deeper_model(small_file):
    path, _ = small_file  # depth 2 into depth 1
    with pytest.raises(CheckpointError, match="unexpected keys Transformer/encoderblock_1/"):
        load_official(create_model("Ti/16", num_classes=10, img_size=32, depth=1), path)


def test_shape_of_another_variant(tmp_path):
    path = tmp_path / "s16.npz"
    save_npz(create_model("S/16", num_classes=10, img_size=32, depth=2), path)
    target = fresh_small()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(
        CheckpointError,
        match=r"embedding/kernel has shape \(384, 3, 16, 16\), Ti/16 needs \(192, 3, 16, 16\)",
    ):
        load_official(target, path)
    for key, value in target.state_dict().items():  # a refused file changes nothing
        assert torch.equal(value, before[key]), key


def test_attention_kernel_of_wrong_shape(small_file, tmp_path):
    _, arrays = small_file
    key = "Transformer/encoderblock_0/MultiHeadDotProductAttention_1/key/kernel"
    arrays[key] = arrays[key][:, :, :32]
    path = tmp_path / "narrow.npz"
    np.savez(path, **arrays)
    with pytest.raises(CheckpointError, match="key/kernel has shape"):
        load_official(fresh_small(), path)


def test_pickled_object_array_is_refused(small_file, tmp_path):
    _, arrays = small_file
    arrays["Transformer/encoder_norm/bias"] = np.array([{"payload": 1}, None], dtype=object)
    path = tmp_path / "pickled.npz"
    np.savez(path, **arrays)
    with pytest.raises(CheckpointError, match="pickled objects"):
        load_official(fresh_small(), path)


# ---------------------------------------------------------------------------------------------
# The downloader, against a local HTTP server


def test_fetch_official_downloads_once(server, tmp_path, monkeypatch):
    httpd, base = server
    monkeypatch.setenv("VITLAB_CHECKPOINT_BASE_URL", base + "/files/")
    monkeypatch.setenv("VITLAB_CACHE", str(tmp_path / "vitlab-cache"))
    entry = official.OFFICIAL_CHECKPOINTS["ViT-B_16"]
    first = official.fetch_official("ViT-B_16", progress=False)
    assert first == tmp_path / "vitlab-cache" / entry.filename
    assert first.read_bytes() == httpd.payload
    assert httpd.requests == ["/files/" + entry.path]
    second = official.fetch_official("ViT-B_16", progress=False)
    assert second == first and httpd.requests == ["/files/" + entry.path]  # served from the cache
    assert os.listdir(tmp_path / "vitlab-cache") == [entry.filename]


def test_big_vision_layout_loads_like_the_original(tmp_path, randomise):
    # big_vision files (as timm's loader reads them): "opt/target/" prefix, blocks stacked on a leading
    # axis, sub-modules numbered from 0, position embeddings at the top level.
    source = create_model("Ti/16", img_size=32, depth=2, num_classes=4)
    randomise(source, seed=11)
    arrays = official_layout.to_official_arrays(source)
    renamed = {"opt/target/pos_embedding": arrays.pop("Transformer/posembed_input/pos_embedding")}
    blocks = {}
    for key, value in arrays.items():
        match = re.match(r"Transformer/encoderblock_(\d+)/(.*)", key)
        if match is None:
            renamed["opt/target/" + key] = value
            continue
        name = match.group(2)
        for old, new in (
            ("MultiHeadDotProductAttention_1", "MultiHeadDotProductAttention_0"),
            ("LayerNorm_2", "LayerNorm_1"),
            ("MlpBlock_3", "MlpBlock_0"),
        ):
            name = name.replace(old, new)
        blocks.setdefault(name, {})[int(match.group(1))] = value
    for name, per_block in blocks.items():
        renamed["opt/target/Transformer/encoderblock/" + name] = np.stack(
            [per_block[i] for i in sorted(per_block)]
        )
    path = tmp_path / "big_vision.npz"
    np.savez(path, **renamed)
    loaded = load_official(create_model(source.config), path, verbose=False)
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_an_npz_of_another_head_count_or_gelu_is_refused(tmp_path, randomise):
    # Heads and the GELU form change what the weights compute, not their shapes: refused, as for vitlab's own files.
    # 3 heads, tanh GELU
    source = randomise(create_model("Ti/16", num_classes=10, img_size=32, depth=1), seed=61)
    path = tmp_path / "ti.npz"
    save_npz(source, path)
    with pytest.raises(
        CheckpointError,
        match=r"ti.npz: its model has 3 attention heads, this one 6; pass --num_heads 3$",
    ):
        load_official(
            create_model("Ti/16", num_classes=10, img_size=32, depth=1, num_heads=6),
            path,
            verbose=False,
        )
    with pytest.raises(
        CheckpointError,
        match=r"official weights compute with --gelu tanh; this model differs \(gelu\); pass --gelu tanh",
    ):
        load_official(
            create_model("Ti/16", num_classes=10, img_size=32, depth=1, gelu="exact"),
            path,
            verbose=False,
        )
    same = load_official(
        create_model("Ti/16", num_classes=10, img_size=32, depth=1), path, verbose=False
    )
    torch.testing.assert_close(same.state_dict(), source.state_dict(), rtol=0, atol=0)

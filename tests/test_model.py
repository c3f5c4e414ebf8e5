"""The model: the variant table, forward and backward on small variants, attention maps, input and
config errors, the golden reference of the official Flax code, and the hybrid's TF 'SAME' padding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vitlab.config import LEGACY_NAMES, VARIANTS, ModelConfig, all_names, canonical_name, get_config
from vitlab.fastpaths import Linear
from vitlab.formats import official
from vitlab.initialization import _factor, sincos_2d
from vitlab.model import count_parameters, create_model
from vitlab.resnet import pad_same

from rounding import (
    ELEMENTWISE_ULPS,
    assert_within,
    assert_within_float32_rounding,
    float32_rounding,
    sum_bound,
    ulps,
)

# Parameter counts at 10 classes and 224 px (the tutorial's table; both spellings give the same).
EXPECTED_PARAMETERS = {
    "ViT-B_16": 85_806_346,
    "ViT-B_32": 87_462_922,
    "ViT-L_16": 303_311_882,
    "ViT-L_32": 305_520_650,
    "ViT-H_14": 630_777_610,
    "R50-ViT-B_16": 97_897_802,
}
EXPECTED_BY_SHORT_NAME = {
    LEGACY_NAMES[legacy]: count for legacy, count in EXPECTED_PARAMETERS.items()
}


def plain_vit_parameters(config: ModelConfig) -> int:
    """Parameter count of a non-hybrid ViT, from the architecture alone (independent of the model code): the paper's,
    and each later family's parts (prefix tokens, layer scale, a norm before the blocks, SwiGLU, attention pooling, a
    second head)."""
    D, P, M, C = config.hidden_size, config.patch_size, config.mlp_dim, config.num_classes
    patch_embed = 3 * P * P * D + (D if config.patch_bias else 0)
    # Position embeddings, then the class, distillation and register tokens
    tokens = config.num_positions * D + config.num_prefix_tokens * D
    mlp = (D * 2 * M + 2 * M if config.mlp == "swiglu" else D * M + M) + (M * D + D)
    # 2 LN, qkv, out, MLP, layer scales
    block = (
        2 * 2 * D + (3 * D * D + 3 * D) + (D * D + D) + mlp + (2 * D if config.layer_scale else 0)
    )
    pre_norm = 2 * D if config.pre_norm else 0
    # latent query, q, kv, out, LN, MLP
    pool = (
        D + (D * D + D) + (2 * D * D + 2 * D) + (D * D + D) + 2 * D + mlp
        if config.classifier == "map"
        else 0
    )
    rep = config.representation_size
    pooled = 2 * D if config.classifier == "token_gap" else D
    pre_logits = pooled * rep + rep if rep else 0
    head = ((rep or pooled) * C + C) * (2 if config.distilled else 1)
    return patch_embed + tokens + pre_norm + config.depth * block + 2 * D + pool + pre_logits + head


def test_all_names_has_both_spellings_of_every_variant():
    names = all_names()
    assert len(names) == len(set(names))
    assert set(names) == set(VARIANTS) | set(LEGACY_NAMES)
    for legacy, short in LEGACY_NAMES.items():
        assert get_config(legacy) == get_config(short)


def test_expected_counts_agree_with_the_formula():
    # The formula is checked against the published numbers before it stands in for the other variants.
    for legacy, count in EXPECTED_PARAMETERS.items():
        config = get_config(legacy, num_classes=10, img_size=224)
        if not config.is_hybrid:
            assert plain_vit_parameters(config) == count, legacy


@pytest.mark.parametrize("name", all_names())
def test_parameter_count_on_meta_device(name):
    with torch.device("meta"):
        model = create_model(name, num_classes=10, img_size=224)
    assert all(p.device.type == "meta" for p in model.parameters())
    short = canonical_name(name)
    if short in EXPECTED_BY_SHORT_NAME:
        expected = EXPECTED_BY_SHORT_NAME[short]
    else:
        expected = plain_vit_parameters(model.config)
    assert count_parameters(model) == expected
    assert model.config.num_classes == 10 and model.config.img_size == 224
    assert model.head.out_features == 10


# ---------------------------------------------------------------------------------------------
# Forward and backward on small variants

SMALL_VARIANTS = {
    "testing-32px": ("testing", {"img_size": 32}),
    "Ti16-64px": ("Ti/16", {"img_size": 64}),
    "R50+B16-depth1-64px": ("R50+B/16", {"img_size": 64, "depth": 1}),
    "Ti16-gap": ("Ti/16", {"img_size": 32, "depth": 2, "classifier": "gap"}),
    "Ti16-representation": ("Ti/16", {"img_size": 32, "depth": 2, "representation_size": 48}),
    "Ti16-patch4-32px": ("Ti/16", {"img_size": 32, "patch_size": 4, "depth": 2}),
}


@pytest.mark.parametrize("key", list(SMALL_VARIANTS))
def test_forward_backward_small_variants(key, randomise):
    name, overrides = SMALL_VARIANTS[key]
    torch.manual_seed(0)
    model = create_model(name, num_classes=7, **overrides)
    randomise(model, seed=1)  # a zero head (the default) would leave the body without gradient
    model.train()
    size = overrides["img_size"]
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(2)) * 2 - 1
    logits = model(x)
    assert logits.shape == (2, 7)
    assert torch.isfinite(logits).all()
    loss = F.cross_entropy(logits, torch.tensor([1, 5]))
    loss.backward()
    # A width of 1 ("testing") normalises every token to its LayerNorm bias, so nothing before a
    # LayerNorm can get a non-zero gradient there; the others must reach every parameter.
    must_be_nonzero = model.config.hidden_size > 1
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{pname} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{pname} has a non-finite gradient"
        if must_be_nonzero:
            assert p.grad.abs().sum() > 0, f"{pname} has an all-zero gradient"


def test_token_count_follows_config():
    cases = [
        (get_config("Ti/16", img_size=32, patch_size=4), 8 * 8 + 1),
        (get_config("Ti/16", img_size=64, classifier="gap"), 4 * 4),
        (get_config("R50+B/16", img_size=64), 4 * 4 + 1),
        (
            get_config("R50+B/16", img_size=72),
            5 * 5 + 1,
        ),  # 72 -> 36 -> 18 -> 9 -> 5 with 'SAME' rounding up
        (get_config("B/16", img_size=384), 24 * 24 + 1),
    ]
    for config, tokens in cases:
        assert config.num_tokens == tokens, config
    with torch.device("meta"):
        model = create_model("R50+B/16", img_size=72, depth=1)
    assert model.pos_embed.shape == (1, 26, 768)


def _as_gelu(fc1: Linear, probe: torch.Tensor) -> torch.Tensor:
    """fc1 (Linear with its GELU) turned into the bare activation: input feature 0 copied to every output."""
    with torch.no_grad():
        fc1.weight.zero_()
        fc1.weight[:, 0] = 1
        fc1.bias.zero_()
    return fc1(F.pad(probe[:, None], (0, fc1.in_features - 1)))[:, 0]


def test_gelu_form_follows_config():
    probe = torch.linspace(-4, 4, 101)
    for form, expected in (("tanh", F.gelu(probe, approximate="tanh")), ("exact", F.gelu(probe))):
        fc1 = create_model("Ti/16", img_size=32, patch_size=8, depth=1, gelu=form).blocks[0].mlp.fc1
        # The matmul is exact here (one term); GELU = y/2 (1 + tanh or erf): two implementations of tanh or erf, each
        # within a few units of 1, lie within ELEMENTWISE_ULPS units of |y| apart.
        bound = ulps(probe, torch.float32, ELEMENTWISE_ULPS)
        with torch.no_grad():  # inference: GELU fused into the matmul on x86 CPUs
            assert_within(_as_gelu(fc1, probe), expected, bound, f"{form}, inference")
        assert_within(_as_gelu(fc1, probe.requires_grad_()), expected, bound, f"{form}, training")
    # The bound tells them apart
    assert (F.gelu(probe, approximate="tanh") - F.gelu(probe)).abs().max() > 100 * bound.max()
    assert get_config("B/16").gelu == "tanh"  # the official weights' form is the default
    # A config saved before the field
    old = {k: v for k, v in get_config("Ti/16").to_dict().items() if k != "gelu"}
    assert ModelConfig.from_dict(old).gelu == "tanh"


def test_layer_norm_eps_and_final_norm_follow_config(randomise):
    model = randomise(
        create_model("Ti/16", img_size=32, depth=1, classifier="gap", layer_norm_eps=1e-12)
    ).eval()
    assert {m.eps for m in model.modules() if isinstance(m, torch.nn.LayerNorm)} == {1e-12}
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    after = create_model(
        "Ti/16",
        img_size=32,
        depth=1,
        classifier="gap",
        layer_norm_eps=1e-12,
        final_norm="after_pool",
    ).eval()
    after.load_state_dict(model.state_dict())
    with torch.no_grad():
        tokens = model.blocks[0](model.embed(x))[0]
        # The official order, same kernels
        assert torch.equal(model(x), model.head(model.norm(tokens).mean(dim=1)))
        assert torch.equal(after(x), model.head(model.norm(tokens.mean(dim=1))))  # timm's fc_norm
        assert (after(x) - model(x)).abs().max() > 1e-3
    old = {
        k: v
        for k, v in get_config("Ti/16").to_dict().items()
        if k not in ("layer_norm_eps", "final_norm", "stem_norm")
    }
    # A config saved before the fields: the official function
    assert ModelConfig.from_dict(old) == get_config("Ti/16")
    default = get_config("Ti/16")
    assert (default.layer_norm_eps, default.final_norm, default.stem_norm) == (
        1e-6,
        "before_pool",
        "flax",
    )


def test_sincos_2d_table():
    # big_vision's posemb_sincos_2d, written out for a 3x3 grid and width 8: positions in row-major order,
    # [sin(x w), cos(x w), sin(y w), cos(y w)] with frequencies w = 1 / 10000 ** (i / (width/4 - 1)).
    omega = 1.0 / 10_000.0 ** np.array([0.0, 1.0])
    rows = []
    for y in range(3):
        for x in range(3):
            rows.append(
                np.concatenate(
                    [np.sin(x * omega), np.cos(x * omega), np.sin(y * omega), np.cos(y * omega)]
                )
            )
    np.testing.assert_allclose(sincos_2d(3, 8).numpy(), np.array(rows), atol=1e-7)


@pytest.mark.parametrize("classifier", ["token", "gap"])
def test_sincos2d_position_init(classifier):
    model = create_model(
        "Ti/16",
        img_size=32,
        patch_size=8,
        depth=1,
        classifier=classifier,
        pos_embed_init="sincos2d",
    )
    table = sincos_2d(4, 192)
    if classifier == "token":
        assert model.pos_embed[0, 0].abs().sum() == 0  # the class token has no position
    torch.testing.assert_close(model.pos_embed[0, -16:].detach(), table)
    assert model.pos_embed.requires_grad  # an initialisation: still learned


def test_factor_is_the_best_low_rank_split():
    torch.manual_seed(0)
    product = torch.randn(12, 12)
    U, S, Vh = torch.linalg.svd(product)
    # LAPACK's SVD is backward stable: U S Vh = product + E, |E| <= ||E||_2 <= n u ||product||_2 (Higham, ch. 20,
    # with n for its constant); the product of the factors then adds its own 12-term sums.
    left, right = _factor(product, 12)
    bound = ulps(S[0], torch.float32, 12) + sum_bound(12, left.abs().T @ right.abs())
    assert_within(left.T @ right, product, bound, "full rank")
    left, right = _factor(product, 4)
    assert left.shape == right.shape == (4, 12)
    best = U[:, :4] @ torch.diag(S[:4]) @ Vh[:4]  # the same factors, multiplied in another order
    assert_within(
        left.T @ right,
        best,
        sum_bound(4, left.abs().T @ right.abs()) + ulps(best, torch.float32, 2),
        "rank 4",
    )


def _attention_products(model, block: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Head 0's query-key product W_q^T W_k and the value-projection product, as they act on a token (D, D)."""
    attn = model.blocks[block].attn
    w_q, w_k, w_v = attn.qkv.weight.detach().chunk(3)
    head = slice(0, attn.head_dim)
    return w_q[head].T @ w_k[head], w_v.T @ attn.proj.weight.detach().T


def test_mimetic_attention_init():
    torch.manual_seed(0)
    D = 192
    config = dict(
        img_size=32, patch_size=4, depth=2, num_heads=6, classifier="gap", pos_embed_init="sincos2d"
    )
    model = create_model("Ti/16", attention_init="mimetic", **config)
    qk, vo = _attention_products(model)
    off = ~torch.eye(D, dtype=torch.bool)
    # value-projection: full rank, 0.4 Z - 0.4 I with Z ~ N(0, 1/D)
    assert abs(vo.diagonal().mean() + 0.4) < 0.02 and abs(vo[off].std() - 0.4 / D**0.5) < 0.003
    # query-key: a head's rank-32 share of 0.7 Z + 0.7 I, a positive diagonal
    assert torch.linalg.matrix_rank(qk) == D // 6 and qk.diagonal().mean() > 0.1
    qk_xavier, vo_xavier = _attention_products(create_model("Ti/16", **config))
    assert abs(qk_xavier.diagonal().mean()) < 0.02 and abs(vo_xavier.diagonal().mean()) < 0.02
    # every block gets its own draw, and tokens attend mostly to themselves and their neighbours at the start
    assert not torch.equal(_attention_products(model, 1)[1], vo)
    model.eval()
    _, attention = model(torch.randn(2, 3, 32, 32), return_attention=True)
    assert attention[0].diagonal(dim1=-2, dim2=-1).mean() > 0.3  # uniform attention would give 1/64


@pytest.mark.parametrize("classifier", ["token", "gap"])
def test_patch_dropout_keeps_a_random_share_of_patches_in_training_only(classifier):
    torch.manual_seed(0)
    model = create_model(
        "Ti/16",
        img_size=32,
        patch_size=4,
        depth=1,
        classifier=classifier,
        patch_drop_rate=0.75,
        num_classes=3,
        dropout_rate=0.0,
    )
    images = torch.randn(4, 3, 32, 32)
    full = model.eval().embed(images)  # every token, positions added
    prefix = 1 if classifier == "token" else 0
    assert full.shape[1] == prefix + 64
    kept = model.train().embed(images)
    assert kept.shape == (4, prefix + 16, 192)
    if prefix:
        torch.testing.assert_close(kept[:, 0], full[:, 0])  # the class token always comes first
    for b in range(4):
        # each kept token is one of the image's own patches, each patch at most once, and the choice differs per image
        match = (kept[b, prefix:, None] - full[b, None, prefix:]).abs().amax(-1) == 0  # (16, 64)
        assert match.sum(1).eq(1).all() and match.sum(0).le(1).all()
    assert not torch.equal(kept[0, prefix:], kept[1, prefix:])
    assert model(images).shape == (4, 3)  # trains on the kept tokens
    plain = create_model(model.config.replace(patch_drop_rate=0.0))
    plain.load_state_dict(model.state_dict())
    # Evaluation sees every patch
    torch.testing.assert_close(model.eval()(images), plain.eval()(images), rtol=0, atol=0)


@pytest.mark.parametrize("classifier", ["token", "gap"])
def test_bf16_autocast_keeps_a_bf16_residual_stream(classifier, randomise):
    # The stream between blocks stays bf16 under bf16 autocast (no casts around every matmul), fp32 otherwise,
    # and the bf16 logits stay those of fp32 to bf16's precision.
    model = randomise(
        create_model(
            "Ti/16", img_size=32, patch_size=4, depth=3, num_classes=10, classifier=classifier
        ),
        seed=4,
    ).eval()
    dtypes = []
    model.blocks[1].register_forward_hook(
        lambda module, inputs, output: dtypes.append(inputs[0].dtype)
    )
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(5)) * 2 - 1
    exact = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = model(x)
    assert dtypes == [torch.float32, torch.bfloat16]
    # Measured: 0.008
    torch.testing.assert_close(half.float(), exact, rtol=0, atol=0.02 * exact.abs().max().item())
    half.float().sum().backward()
    assert (
        model.pos_embed.grad.dtype == torch.float32 and torch.isfinite(model.pos_embed.grad).all()
    )


# ---------------------------------------------------------------------------------------------
# Attention maps


@pytest.mark.parametrize("classifier", ["token", "gap"])
@pytest.mark.parametrize("impl", ["sdpa", "math", "auto"])
def test_return_attention(classifier, impl, randomise):
    model = create_model(
        "Ti/16",
        img_size=32,
        patch_size=8,
        depth=2,
        num_classes=5,
        classifier=classifier,
        attention_impl=impl,
    )
    randomise(model, seed=3)
    model.eval()
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(4)) * 2 - 1
    with torch.no_grad():
        logits, attention = model(x, return_attention=True)  # always the explicit softmax
    plain, plain64, _ = float32_rounding(model, x)  # through the fused kernel with impl "sdpa"
    assert_within_float32_rounding(plain, plain64, logits, f"{impl} against the explicit softmax")
    tokens = 16 + (classifier == "token")
    assert isinstance(attention, list) and len(attention) == 2
    for weights in attention:
        assert weights.shape == (2, 3, tokens, tokens)
        assert (weights >= 0).all()
        # Each weight exp(s) / sum exp(s) within a few units of its own size, and the row's sum of `tokens` terms:
        ones = torch.ones(2, 3, tokens)
        assert_within(
            weights.sum(-1),
            ones,
            sum_bound(tokens, ones) + ulps(ones, torch.float32, ELEMENTWISE_ULPS),
            "rows",
        )

    # The first layer's maps are softmax(q k^T / sqrt(head_dim)) of the normalised embeddings.
    block = model.blocks[0]
    with torch.no_grad():
        h = block.norm1(model.embed(x))
        # (B, T, heads, head_dim) each
        q, k, _ = block.attn.qkv(h).view(2, tokens, 3, 3, 64).unbind(2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k).div(8.0)  # 1/sqrt(64), exact
        expected = scores.softmax(-1)
        # Scores of 64 terms summed in other orders; softmax moves each weight w by at most 2 w max|score change|.
        score_bound = sum_bound(
            64, torch.einsum("bqhd,bkhd->bhqk", q.abs(), k.abs()).div(8.0)
        ).amax(-1, keepdim=True)
        bound = 2 * expected.double() * score_bound + ulps(
            expected, torch.float32, ELEMENTWISE_ULPS
        )
    assert_within(attention[0], expected, bound, "the first layer's maps")
    # The maps of the two layers are not the same thing twice.
    assert (attention[0] - attention[1]).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------
# Errors


def test_unknown_variant_names_the_choices():
    with pytest.raises(ValueError) as info:
        create_model("ViT-Q_99")
    message = str(info.value)
    assert "ViT-Q_99" in message
    for choice in ("B/16", "ViT-B_16", "R50+B/16", "Ti/16", "testing"):
        assert choice in message


def test_wrong_input_size_is_a_clear_error():
    model = create_model("Ti/16", img_size=32, depth=1).eval()
    with pytest.raises(ValueError, match=r"32 px") as info:
        model(torch.zeros(1, 3, 48, 48))
    assert "(48, 48)" in str(info.value)
    with pytest.raises(ValueError, match=r"32 px"):
        model(torch.zeros(1, 3, 16, 16))
    model(torch.zeros(1, 3, 32, 32))  # the right size passes


@pytest.mark.parametrize("shape", [(16, 64), (40, 40)])
def test_input_with_the_right_token_count_but_wrong_size_is_an_error(shape):
    model = create_model("Ti/16", img_size=32, depth=1).eval()
    with pytest.raises(ValueError):
        model(torch.zeros(1, 3, *shape))


def test_config_validation():
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        ModelConfig(hidden_size=10, num_heads=3)
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        get_config("Ti/16", num_heads=5)
    with pytest.raises(ValueError, match="classifier"):
        get_config("Ti/16", classifier="mean")
    with pytest.raises(ValueError, match="smaller than one patch"):
        get_config("B/16", img_size=8)
    with pytest.raises(ValueError, match="depth"):
        get_config("Ti/16", depth=0)
    with pytest.raises(ValueError, match="multiple of the stem"):
        get_config("R50+B/16", patch_size=8)
    with pytest.raises(ValueError, match="gelu must be 'tanh', 'exact' or 'quick'"):
        get_config("Ti/16", gelu="erf")
    with pytest.raises(ValueError, match="pos_embed_init must be"):
        get_config("Ti/16", pos_embed_init="random")
    with pytest.raises(ValueError, match="attention_init must be 'xavier' or 'mimetic'"):
        get_config("Ti/16", attention_init="identity")
    with pytest.raises(ValueError, match=r"patch_drop_rate must be in \[0, 1\)"):
        get_config("Ti/16", patch_drop_rate=1.0)
    with pytest.raises(ValueError, match="divisible by 4"):
        get_config("Ti/16", hidden_size=198, num_heads=3, pos_embed_init="sincos2d")
    with pytest.raises(ValueError, match="unknown model config fields: colour"):
        ModelConfig.from_dict({**get_config("Ti/16").to_dict(), "colour": "red"})
    config = get_config("R50+B/16", img_size=96)
    assert ModelConfig.from_dict(config.to_dict()) == config  # resnet_layers comes back a tuple


# ---------------------------------------------------------------------------------------------
# The golden reference of the official Flax implementation


def test_golden_official_ti16(shared_dir):
    ref = shared_dir / "reference" / "official-vit-ti16"
    if not (ref / "ti16_224.npz").is_file():
        pytest.skip(f"{ref} is not present")
    model = create_model("Ti/16", num_classes=10, img_size=224)
    official.load_official(model, ref / "ti16_224.npz", verbose=False)
    model.eval()
    x = torch.from_numpy(np.load(ref / "ti16_224_input.npy"))
    assert x.shape == (2, 3, 224, 224) and x.dtype == torch.float32
    logits, logits64, _ = float32_rounding(model, x)
    expected = torch.from_numpy(np.load(ref / "ti16_224_logits.npy"))
    assert logits.shape == expected.shape == (2, 10)
    assert expected.abs().max() > 0.1  # the reference is not trivially zero
    # Measured: 5e-7, rounding 4e-7
    assert_within_float32_rounding(logits, logits64, expected, "the official logits")
    assert (logits - expected).abs().max() <= 1e-5  # the formats table's figure
    # The reference tells the GELU forms apart: the exact (erf) one is out of tolerance, and is Flax's own exact form.
    exact = torch.from_numpy(np.load(ref / "ti16_224_logits_exact_gelu.npy"))
    assert (logits - exact).abs().max() > 1e-5
    exact_model = create_model("Ti/16", num_classes=10, img_size=224, gelu="exact").eval()
    exact_model.load_state_dict(model.state_dict())
    assert_within_float32_rounding(
        *float32_rounding(exact_model, x)[:2], exact, "the official exact-GELU logits"
    )
    # transformers' google/vit-* configs compute these weights with the exact GELU and eps 1e-12 (measured: 2.4e-4 away)
    transformers_form = create_model(
        "Ti/16", num_classes=10, img_size=224, gelu="exact", layer_norm_eps=1e-12
    ).eval()
    transformers_form.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert (transformers_form(x) - expected).abs().max() > 1e-4


# ---------------------------------------------------------------------------------------------
# The hybrid's TF 'SAME' padding


def test_pad_same_pads_after_on_even_sizes():
    x = torch.arange(64, dtype=torch.float32).reshape(1, 1, 8, 8) - 100  # all negative
    padded = pad_same(x, 3, 2, value=float("-inf"))
    assert padded.shape == (1, 1, 9, 9)  # (0, 1) on each axis: nothing before, one after
    assert torch.equal(padded[..., :8, :8], x)
    assert torch.isneginf(padded[..., 8, :]).all() and torch.isneginf(padded[..., :, 8]).all()
    # Odd side: (1, 1). 7x7 stride 2 at 224: 5 in all, 2 before and 3 after. Stride 1, 1x1: none.
    odd = pad_same(torch.zeros(1, 1, 7, 7), 3, 2, value=1.0)
    assert odd.shape == (1, 1, 9, 9) and odd[..., 0, :].eq(1).all() and odd[..., -1, :].eq(1).all()
    assert odd[..., 1:8, 1:8].eq(0).all()
    root = pad_same(torch.zeros(1, 1, 224, 224), 7, 2, value=1.0)
    assert root.shape == (1, 1, 229, 229)
    assert (
        root[..., :2, :].eq(1).all()
        and root[..., 2, 2:226].eq(0).all()
        and root[..., 226:, :].eq(1).all()
    )
    assert pad_same(torch.zeros(1, 1, 5, 6), 1, 1).shape == (1, 1, 5, 6)
    # Non-square: each axis by its own side (height 8 -> (0, 1), width 7 -> (1, 1)).
    assert pad_same(torch.zeros(1, 1, 8, 7), 3, 2).shape == (1, 1, 9, 9)

    # Padding with -inf never wins the max: an all-negative input pools to its own values only,
    # where zero padding (the default value) would put zeros on the border.
    pooled = F.max_pool2d(padded, 3, 2)
    assert pooled.shape == (1, 1, 4, 4) and (pooled < 0).all()
    assert pooled[0, 0, -1, -1] == x.max()
    assert (F.max_pool2d(pad_same(x, 3, 2), 3, 2) == 0).any()


def test_hybrid_stem_max_pool_is_tf_same(randomise):
    model = create_model("R50+B/16", img_size=64, depth=1)
    randomise(model, seed=5)
    stem = model.stem
    stem.stages = torch.nn.Identity()  # stem(x) is then the pooled output of the root
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(6)) * 2 - 1
    with torch.no_grad():
        root = F.relu(stem.gn_root(stem.conv_root(x)))  # (1, 64, 32, 32)
        pooled = stem(x)
        # TensorFlow 'SAME' for an even side: windows start at 0, the one missing pixel padded after.
        tf_same = F.max_pool2d(F.pad(root, (0, 1, 0, 1), value=float("-inf")), 3, 2)
        symmetric = F.max_pool2d(root, 3, 2, padding=1)  # PyTorch ResNet's convention
    assert root.shape == (1, 64, 32, 32) and pooled.shape == (1, 64, 16, 16)
    assert torch.equal(pooled, tf_same)
    assert (pooled - symmetric).abs().max() > 1e-2  # the two conventions do differ here


# ---------------------------------------------------------------------------------------------
# Stochastic depth and gradient checkpointing


def test_drop_path_grows_with_depth_and_is_the_identity_at_evaluation(randomise):
    model = randomise(
        create_model(
            "Ti/16",
            img_size=16,
            patch_size=4,
            depth=4,
            num_classes=3,
            drop_path_rate=0.3,
            dropout_rate=0.0,
        ),
        seed=7,
    )
    assert [getattr(b.drop_path, "p", 0.0) for b in model.blocks] == pytest.approx(
        [0.0, 0.1, 0.2, 0.3]
    )
    plain = create_model(model.config.replace(drop_path_rate=0.0))
    plain.load_state_dict(model.state_dict())
    x = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(8)) * 2 - 1
    torch.testing.assert_close(model.eval()(x), plain.eval()(x), rtol=0, atol=0)
    # In training each sample's branch is dropped whole with the block's rate, and kept ones are scaled up to match.
    drop = model.blocks[3].drop_path.train()
    torch.manual_seed(0)
    out = drop(torch.ones(4000, 5, 6))
    per_sample = out.flatten(1)
    assert torch.all((per_sample == 0).all(1) | (per_sample == 1 / 0.7).all(1))
    assert (per_sample[:, 0] == 0).float().mean().item() == pytest.approx(0.3, abs=0.03)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(randomise):
    # Recomputing each block in the backward replays its dropout masks: the same function, less memory.
    model = randomise(
        create_model(
            "Ti/16",
            img_size=16,
            patch_size=4,
            depth=3,
            num_classes=3,
            dropout_rate=0.1,
            drop_path_rate=0.2,
        ),
        seed=9,
    )
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(10)) * 2 - 1
    results = []
    for checkpointing in (False, True):
        model.zero_grad()
        model.grad_checkpointing = checkpointing
        torch.manual_seed(1)
        loss = model.train()(x).square().sum()
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=0, atol=0)
    for name, grad in results[0][1].items():
        assert torch.equal(results[1][1][name], grad), name  # the same kernels on the same values

"""timm's layout: random timm models of every family vitlab computes (the paper's ViT, the hybrid, DINOv2 with and
without registers and its SwiGLU, CLIP's towers, SigLIP's attention pooling, DeiT and its distillation token, DeiT III,
MAE's average beside a class token), saved as timm's users save them, give timm's own logits in vitlab, with how their
images are fed read from config.json; vitlab -> timm -> vitlab is bit-exact in the weights; what vitlab cannot compute
is refused in one line naming the field."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from vitlab.app.cli import main
from vitlab.errors import CheckpointError
from vitlab.formats import timm_arch, timm_layout
from vitlab.formats.checkpoints import load_model, load_pretrained
from vitlab.model import create_model

from parity import assert_parity, one_error_line, state_equal, timm_model, vitlab_source

timm = pytest.importorskip("timm")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)

# ---------------------------------------------------------------------------------------------
# timm: a state dict as timm's users save it (safetensors save_file, torch.save), or a save_for_hf folder

TIMM_CASES = {
    "B/16-shaped, 2 layers": ("vit_base_patch16_224", 64, {"depth": 2}),
    "Ti/16": ("vit_tiny_patch16_224", 64, {}),
    "gap with fc_norm": (
        "vit_tiny_patch16_224",
        64,
        {"depth": 2, "class_token": False, "global_pool": "avg"},
    ),
    "gap, norm before pooling": (
        "vit_tiny_patch16_224",
        64,
        {"depth": 2, "class_token": False, "global_pool": "avg", "fc_norm": False},
    ),
    "hybrid R50+B/16, 1 layer": ("vit_base_r50_s16_224", 64, {"depth": 1}),
    "tanh GELU, no qkv bias": (
        "vit_small_patch16_224",
        32,
        {"depth": 2, "act_layer": "gelu_tanh", "qkv_bias": False},
    ),
}

# Each family through a save_for_hf folder, whose config.json says what the weights do not (the GELU form, the
# LayerNorm eps, the preprocessing): (architecture, image size, timm's arguments, the ModelConfig fields expected).
FAMILY_CASES = {
    "DINOv2, layer scale": (
        "vit_small_patch14_dinov2",
        28,
        {"depth": 2},
        dict(layer_scale=1e-5, patch_size=14, image_mean=IMAGENET_MEAN, interpolation="bicubic"),
    ),
    "DINOv2 with registers": (
        "vit_small_patch14_reg4_dinov2",
        28,
        {"depth": 2},
        dict(reg_tokens=4, pos_embed_prefix=False, layer_scale=1e-5),
    ),
    "DINOv2 giant's SwiGLU": (
        "vit_giant_patch14_dinov2",
        28,
        {"depth": 1, "embed_dim": 96, "num_heads": 4},
        dict(mlp="swiglu", mlp_dim=256),
    ),
    "CLIP, QuickGELU": (
        "vit_base_patch16_clip_quickgelu_224",
        32,
        {"depth": 2},
        dict(
            gelu="quick", pre_norm=True, patch_bias=False, layer_norm_eps=1e-5, image_mean=CLIP_MEAN
        ),
    ),
    "OpenCLIP, exact GELU": (
        "vit_base_patch16_clip_224",
        32,
        {"depth": 1},
        dict(gelu="exact", pre_norm=True, layer_norm_eps=1e-5, interpolation="bicubic"),
    ),
    "SigLIP, attention pooling": (
        "vit_base_patch16_siglip_224",
        32,
        {"depth": 2},
        dict(classifier="map", class_token=False, image_mean=(0.5, 0.5, 0.5), crop_pct=0.9),
    ),
    "SigLIP, average pooling": (
        "vit_base_patch16_siglip_gap_224",
        32,
        {"depth": 1},
        dict(classifier="gap", class_token=False, final_norm="before_pool"),
    ),
    "DeiT, distilled": (
        "deit_tiny_distilled_patch16_224",
        32,
        {"depth": 2},
        dict(distilled=True, image_mean=IMAGENET_MEAN, resize="shorter_side", crop_pct=0.9),
    ),
    "DeiT III": (
        "deit3_small_patch16_224",
        32,
        {"depth": 2},
        dict(pos_embed_prefix=False, crop_pct=0.9),
    ),
    "MAE, the patches' mean beside a class token": (
        "vit_base_patch16_224",
        32,
        {"depth": 2, "global_pool": "avg"},
        dict(classifier="gap", class_token=True, final_norm="after_pool"),
    ),
}


@pytest.mark.parametrize("case", list(TIMM_CASES))
def test_timm_state_dict_gives_timms_logits(case, tmp_path, randomise):
    arch, size, kwargs = TIMM_CASES[case]
    reference = timm_model(arch, size, randomise, **kwargs)
    # The weights do not say the GELU form: a save_for_hf folder's config.json does
    if "act_layer" in kwargs:
        timm.models.save_for_hf(
            reference,
            tmp_path / "folder",
            safe_serialization=True,
            model_config={"label_names": list("abcdefg")},
        )
        ours, names = load_model(tmp_path / "folder")
        assert names == list("abcdefg") and ours.config.gelu == "tanh"
    else:
        save_file(reference.state_dict(), tmp_path / "model.safetensors")
        ours, names = load_model(tmp_path / "model.safetensors")
        assert names == [f"class {i}" for i in range(7)]
    assert_parity(ours, reference, size, f"timm {case}")


@pytest.mark.parametrize("case", list(FAMILY_CASES))
def test_timm_families_give_timms_logits(case, tmp_path, randomise):
    arch, size, kwargs, expected = FAMILY_CASES[case]
    reference = timm_model(arch, size, randomise, **kwargs)
    timm.models.save_for_hf(reference, tmp_path / "folder", safe_serialization=True)
    ours, _ = load_model(tmp_path / "folder")
    assert {f: getattr(ours.config, f) for f in expected} == expected, case
    assert_parity(ours, reference, size, f"timm {case}")


# Each family's variants and timm's architectures of them (timm's are the independent definition of their shapes)
TIMM_ARCHITECTURES = {
    "dinov2-S/14": "vit_small_patch14_dinov2",
    "dinov2-g/14": "vit_giant_patch14_dinov2",
    "dinov2-reg-L/14": "vit_large_patch14_reg4_dinov2",
    "clip-B/32": "vit_base_patch32_clip_quickgelu_224",
    "openclip-L/14": "vit_large_patch14_clip_224",
    "siglip-B/16": "vit_base_patch16_siglip_224",
    "siglip-L/16": "vit_large_patch16_siglip_256",
    "siglip-so400m/14": "vit_so400m_patch14_siglip_224",
    "deit-distilled-S/16": "deit_small_distilled_patch16_224",
    "deit3-L/16": "deit3_large_patch16_224",
    "mae-H/14": "vit_huge_patch14_224",  # with timm's global_pool "avg", as MAE's fine-tuned models
}


@pytest.mark.parametrize("name", list(TIMM_ARCHITECTURES))
def test_family_variants_have_timms_shapes(name):
    from vitlab.config import get_config

    # One block of each: every kind of tensor, at the variant's width, heads, MLP and image size. timm has no
    # token_gap (DINOv2's classification head): its class token pooling has the same tensors but the head's.
    config = get_config(name, num_classes=10, depth=1)
    if config.classifier == "token_gap":
        config = config.replace(classifier="token")
    pool = {"gap": {"global_pool": "avg"}}.get(config.classifier, {})
    ours = create_model(config)
    theirs = timm.create_model(
        TIMM_ARCHITECTURES[name],
        pretrained=False,
        num_classes=10,
        img_size=config.img_size,
        depth=1,
        **pool,
    )
    assert {k: v.shape for k, v in timm_layout.to_timm(ours).items()} == {
        k: v.shape for k, v in theirs.state_dict().items()
    }


def test_timm_bare_state_dict_of_a_family_takes_the_named_variants_preprocessing(
    tmp_path, randomise
):
    reference = timm_model("vit_base_patch16_clip_224", 32, randomise, depth=1)
    save_file(reference.state_dict(), tmp_path / "clip.safetensors")
    # timm's CLIP architecture: LayerNorm eps 1e-5, the exact GELU; the variant gives how images are fed
    ours, _ = load_model(tmp_path / "clip.safetensors", model_type="openclip-B/16")
    assert ours.config.layer_norm_eps == 1e-5 and ours.config.image_mean == CLIP_MEAN
    assert ours.config.name == "openclip-B/16"
    assert_parity(ours, reference, 32, "timm CLIP state dict with --model_type")


def test_timm_torch_file_and_model_type(tmp_path, randomise):
    reference = timm_model("vit_small_patch16_224", 32, randomise, depth=2)
    torch.save(reference.state_dict(), tmp_path / "pytorch_model.bin")
    torch.save(
        {"state_dict": {"module." + k: v for k, v in reference.state_dict().items()}, "epoch": 3},
        tmp_path / "train.pth.tar",
    )
    for path in (tmp_path / "pytorch_model.bin", tmp_path / "train.pth.tar"):
        ours, _ = load_model(path, model_type="S/16")
        assert ours.config.num_heads == 6 and ours.config.depth == 2 and ours.config.img_size == 32
        assert_parity(ours, reference, 32, f"timm torch.save {path.name}")
    with pytest.raises(CheckpointError, match="hidden_size 384, and --model_type B/16 has 768"):
        load_model(tmp_path / "pytorch_model.bin", model_type="B/16")


def test_timm_width_of_no_variant_needs_its_heads(tmp_path, randomise):
    reference = timm_model(
        "vit_tiny_patch16_224", 32, randomise, depth=1, embed_dim=96, num_heads=4
    )
    save_file(reference.state_dict(), tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="width of 96 is no vitlab variant's.*--model_type"):
        load_model(tmp_path / "model.safetensors")
    # fine-tuning takes the heads from the model it loads into
    model = load_pretrained(
        create_model(
            "Ti/16",
            num_classes=7,
            img_size=32,
            depth=1,
            hidden_size=96,
            num_heads=4,
            mlp_dim=384,
            gelu="exact",
            dropout_rate=0.0,
        ),
        tmp_path / "model.safetensors",
        verbose=False,
    )
    assert_parity(model.eval(), reference, 32, "timm width 96, heads from the model")


def test_timm_file_fine_tunes_with_a_new_head(tmp_path, randomise, capsys):
    reference = timm_model("vit_tiny_patch16_224", 32, randomise, depth=1)
    save_file(reference.state_dict(), tmp_path / "model.safetensors")
    # timm computes the exact GELU; vitlab's default is tanh
    with pytest.raises(CheckpointError, match="trained with --gelu exact"):
        load_pretrained(
            create_model("Ti/16", num_classes=3, img_size=32, depth=1),
            tmp_path / "model.safetensors",
        )
    model = load_pretrained(
        create_model("Ti/16", num_classes=3, img_size=32, depth=1, gelu="exact"),
        tmp_path / "model.safetensors",
    )
    assert "head replaced by a zero-initialised head of 3 classes" in capsys.readouterr().out
    assert model.head.weight.abs().sum() == 0
    torch.testing.assert_close(
        model.blocks[0].attn.qkv.weight, reference.blocks[0].attn.qkv.weight, rtol=0, atol=0
    )


ROUND_TRIP_MODELS = {
    "tanh, class token": dict(name="Ti/16", img_size=32, depth=2),
    "exact GELU, gap after pooling, eps 1e-12": dict(
        name="S/16",
        img_size=32,
        depth=1,
        classifier="gap",
        final_norm="after_pool",
        gelu="exact",
        layer_norm_eps=1e-12,
    ),
    "gap before pooling, patch 8, width 96": dict(
        name="Ti/16",
        img_size=32,
        depth=1,
        patch_size=8,
        hidden_size=96,
        num_heads=4,
        mlp_dim=200,
        classifier="gap",
    ),
    "hybrid, timm's stem": dict(name="R50+B/16", img_size=64, depth=1, stem_norm="timm"),
    "DINOv2 with registers": dict(name="dinov2-reg-S/14", img_size=28, depth=2, classifier="token"),
    "DINOv2 giant's SwiGLU": dict(
        name="dinov2-g/14",
        img_size=28,
        depth=1,
        hidden_size=96,
        num_heads=4,
        mlp_dim=128,
        classifier="token",
    ),
    "CLIP, QuickGELU": dict(
        name="clip-B/16", img_size=32, depth=2, hidden_size=96, num_heads=4, mlp_dim=384
    ),
    "SigLIP, attention pooling": dict(name="siglip-B/16", img_size=32, depth=1),
    "DeiT, distilled": dict(name="deit-distilled-Ti/16", img_size=32, depth=2),
    "DeiT III, another patch": dict(name="deit3-S/16", img_size=32, depth=1, patch_size=8),
    "MAE": dict(name="mae-B/16", img_size=32, depth=1),
}


@pytest.mark.parametrize("case", list(ROUND_TRIP_MODELS))
def test_vitlab_timm_vitlab_is_bit_exact(case, tmp_path, randomise, capsys):
    names = ["cat", "dög", "fish 🐟"]
    model, source = vitlab_source(tmp_path, randomise, ROUND_TRIP_MODELS[case], names)
    out = tmp_path / "timm.safetensors"
    assert main(["export", str(source), "--format", "timm", "--out", str(out)]) == 0
    line = capsys.readouterr().out.splitlines()[0]
    assert (
        line.startswith(f"timm {timm.__version__}: timm.create_model(")
        and "max |difference|" in line
    )
    print(f"export timm {case}: {line.rsplit(': ', 1)[-1]}")
    back, back_names = load_model(out)
    assert back_names == names and back.config == model.config
    state_equal(back, model)
    # the file is timm's own layout: the keys of timm's model, whose loader (the call printed) gives the same logits
    name, kwargs = timm_arch.timm_args(model.config)
    assert (
        f"timm.create_model({name!r}, pretrained=True, " in line
        and timm_arch.format_args(kwargs) in line
    )
    reference = timm.create_model(
        name,
        pretrained=True,
        pretrained_cfg_overlay={"file": str(out), "num_classes": len(names)},
        **kwargs,
    )
    assert set(load_file(out)) == set(reference.state_dict())
    assert_parity(model, reference.eval(), model.config.img_size, f"vitlab -> timm {case}")


def timm_file(tmp_path, randomise, arch="vit_tiny_patch16_224", size=32, config=None, **kwargs):
    model = timm_model(arch, size, randomise, **{"depth": 1, **kwargs})
    if config is not None:
        timm.models.save_for_hf(model, tmp_path / "timm", safe_serialization=True)
        values = json.loads((tmp_path / "timm" / "config.json").read_text())
        (tmp_path / "timm" / "config.json").write_text(json.dumps(config(values)))
        return tmp_path / "timm"
    save_file(model.state_dict(), tmp_path / "timm.safetensors")
    return tmp_path / "timm.safetensors"


def _with(section: str, **values):
    def change(config):
        config.setdefault(section, {}).update(values)
        return config

    return change


TIMM_REFUSALS = {
    "qk_norm": ({"qk_norm": True}, "qk_norm"),
    "RMSNorm": ({"norm_layer": "rmsnorm"}, "norm other than LayerNorm"),
    "rectangular grid": ({"size": (32, 48)}, "not a square grid"),
    "another activation": ({"config": _with("model_args", act_layer="silu")}, "act_layer 'silu'"),
    "map pooling claimed without its parameters": (
        {"config": lambda c: {**c, "global_pool": "map"}},
        "global_pool 'map'",
    ),
    "token pooling without a class token": (
        {
            "class_token": False,
            "global_pool": "avg",
            "config": lambda c: {**c, "global_pool": "token"},
        },
        "global_pool 'token' in a model without a class token",
    ),
    "another crop": (
        {"config": _with("pretrained_cfg", crop_mode="border")},
        "crop_mode 'border'",
    ),
}


@pytest.mark.parametrize("case", list(TIMM_REFUSALS))
def test_timm_refusals(case, tmp_path, randomise, capsys):
    kwargs, expected = TIMM_REFUSALS[case]
    path = timm_file(tmp_path, randomise, **kwargs)
    assert main(["predict", str(path), "x.png"]) == 1
    line = one_error_line(capsys)
    assert str(path) in line and expected in line, line


def test_timm_head_of_another_shape_is_refused(tmp_path, randomise, capsys):
    path = timm_file(tmp_path, randomise)
    state = load_file(path)
    # An MLP head's names
    state.update({"head.fc." + k[5:]: state.pop(k) for k in ("head.weight", "head.bias")})
    save_file(state, path)
    assert main(["predict", str(path), "x.png"]) == 1
    line = one_error_line(capsys)
    assert (
        str(path) in line
        and "unexpected keys head.fc.bias, head.fc.weight: vitlab's ViT has no such parameters"
        in line
    )


# ---------------------------------------------------------------------------------------------
# Fine-tuning from a timm file at another resolution: the position table resampled by timm's own rule


@pytest.mark.parametrize(
    "arch,variant",
    [
        ("vit_small_patch14_dinov2", "dinov2-S/14"),
        ("vit_small_patch14_reg4_dinov2", "dinov2-reg-S/14"),
        ("vit_base_patch16_siglip_224", "siglip-B/16"),
    ],
)
def test_fine_tuning_at_another_size_resamples_as_timm_does(
    arch, variant, tmp_path, randomise, capsys
):
    from vitlab.config import get_config
    from vitlab.formats.checkpoints import pretrained_model

    patch = 14 if "14" in arch else 16
    reference = timm_model(arch, 4 * patch, randomise, depth=2)
    timm.models.save_for_hf(reference, tmp_path / "folder", safe_serialization=True)
    wanted = get_config(variant, depth=2, img_size=3 * patch, num_classes=7, dropout_rate=0.0)
    ours = pretrained_model(tmp_path / "folder", wanted).eval()
    assert (
        "position embeddings resized from 16 to 9 patches (timm's rule)" in capsys.readouterr().out
    )
    # timm's own model at the new size, from the same file
    resized = timm.create_model(
        arch,
        pretrained=True,
        pretrained_cfg_overlay={
            "file": str(tmp_path / "folder" / "model.safetensors"),
            "num_classes": 7,
        },
        num_classes=7,
        img_size=3 * patch,
        depth=2,
    ).eval()
    assert ours.config.classifier == resized.global_pool.replace(
        "avg", "gap"
    ) or variant.startswith("dinov2")
    assert_parity(ours, resized, 3 * patch, f"{arch} at {3 * patch} px")

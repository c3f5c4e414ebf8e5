"""transformers' layout: random models of every vision family transformers has (ViT, DeiT with and without its teacher's
classifier, DINOv2 with and without registers and with giant's SwiGLU, CLIP's and SigLIP's vision towers and their whole
models), saved as `save_pretrained` saves them, give transformers' own outputs in vitlab, with how their images are fed
read from preprocessor_config.json; vitlab -> hf -> vitlab is bit-exact in the weights and config, and transformers'
class of the export gives the model's logits; fine-tuning a folder at another size resamples its positions as
transformers does; what vitlab cannot compute is refused in one line naming the field, nothing written."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from vitlab.app.cli import main
from vitlab.errors import CheckpointError
from vitlab.formats.checkpoints import RESAMPLERS, load_model, load_pretrained, pretrained_model
from vitlab.formats.weights import read_weights, save_safetensors
from vitlab.model import VisionTransformer, create_model

from parity import (
    LOGITS,
    PARITY_ATOL,
    Pooled,
    assert_parity,
    images,
    one_error_line,
    state_equal,
    vitlab_source,
)
from rounding import assert_within, assert_within_float32_rounding, float32_rounding, ulps

transformers = pytest.importorskip("transformers")

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
LABELS = {i: f"label {i}" for i in range(7)}


@pytest.fixture(scope="module", autouse=True)
def no_progress_bars():
    """save_pretrained's progress bar on stderr would hide the one-line errors these tests look for."""
    transformers.utils.logging.disable_progress_bar()
    yield
    transformers.utils.logging.enable_progress_bar()


# The whole models' configs hold the vision tower's beside a text tower's
COMPOSITE = ("CLIPModel", "SiglipModel", "SiglipForImageClassification")
TEXT = dict(
    hidden_size=48, num_hidden_layers=1, num_attention_heads=3, intermediate_size=96, vocab_size=64
)


def hf_model(cls: str, seed: int = 0, **tower) -> nn.Module:
    """transformers' class `cls` (a name in transformers) of a small model, every parameter random (layer scales 1 +
    N(0, 0.05) like norm scales, so that every block counts), in eval mode with 7 labels."""
    klass = getattr(transformers, cls, None)
    if klass is None:
        pytest.skip(f"transformers {transformers.__version__} has no {cls}")
    tower = {"hidden_size": 48, "num_hidden_layers": 2, "num_attention_heads": 3, **tower}
    if cls in COMPOSITE:
        config = klass.config_class(vision_config=tower, text_config=TEXT, id2label=LABELS)
    else:
        config = klass.config_class(**tower, id2label=LABELS)
    model = klass(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator) * 0.05
            scale = name.endswith("lambda1") or ("norm" in name and name.endswith("weight"))
            p.copy_(1 + noise if scale else noise)
            # vitlab adds a registers model's class position row to its class token in float32 (the
            # sum transformers' forward computes); on a grid of 2^-12 the two sum exactly, so that
            # float64 runs compare the same function
            if "Registers" in cls and name.endswith(("cls_token", "position_embeddings")):
                p.copy_(torch.round(p * 4096) / 4096)
    return model.eval()


class ImageFeatures(nn.Module):
    """A whole CLIP or SigLIP model to its image features."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images):
        out = self.model.get_image_features(pixel_values=images)
        return getattr(out, "pooler_output", out)  # transformers 5: an output, the features pooled


def headless(folder) -> VisionTransformer:
    """The model of a folder without a classifier, with a zero head of its own."""
    weights = read_weights(folder)
    assert not weights.has_head
    model = VisionTransformer(weights.config)
    model.load_state_dict({**model.state_dict(), **weights.state})
    return model.eval()


# ---------------------------------------------------------------------------------------------
# Reading: transformers' logits, from each class


# case: (class, image size, its config fields, the ModelConfig fields expected)
CLASSIFIERS = {
    "ViT, B/16-shaped": (
        "ViTForImageClassification",
        32,
        dict(hidden_size=768, num_attention_heads=12, intermediate_size=3072, image_size=32),
        dict(gelu="exact", layer_norm_eps=1e-12, classifier="token"),
    ),
    "ViT, Ti/16-shaped, 12 layers": (
        "ViTForImageClassification",
        32,
        dict(hidden_size=192, num_hidden_layers=12, intermediate_size=768, image_size=32),
        dict(depth=12, mlp_dim=768),
    ),
    "ViT, tanh GELU, no qkv bias, eps 1e-6": (
        "ViTForImageClassification",
        32,
        dict(
            hidden_act="gelu_pytorch_tanh",
            qkv_bias=False,
            layer_norm_eps=1e-6,
            image_size=32,
            intermediate_size=96,
        ),
        dict(gelu="tanh", layer_norm_eps=1e-6),
    ),
    "DeiT, the class token classified": (
        "DeiTForImageClassification",
        32,
        dict(image_size=32, intermediate_size=96),
        dict(reg_tokens=1, distilled=False, pos_embed_prefix=True, name="deit-Ti/16"),
    ),
    "DeiT, with its teacher's classifier": (
        "DeiTForImageClassificationWithTeacher",
        32,
        dict(image_size=32, intermediate_size=96),
        dict(distilled=True, reg_tokens=0, name="deit-distilled-Ti/16"),
    ),
    "DINOv2, layer scale, the class token beside the patches' mean": (
        "Dinov2ForImageClassification",
        28,
        dict(image_size=28, layerscale_value=1e-5, mlp_ratio=2),
        dict(
            classifier="token_gap",
            layer_scale=1e-5,
            mlp="gelu",
            mlp_dim=96,
            layer_norm_eps=1e-6,
            patch_size=14,
        ),
    ),
    "DINOv2 giant's SwiGLU, tanh GELU elsewhere, no qkv bias": (
        "Dinov2ForImageClassification",
        28,
        dict(image_size=28, use_swiglu_ffn=True, qkv_bias=False, hidden_act="gelu_new"),
        dict(mlp="swiglu", mlp_dim=128, gelu="tanh"),
    ),
    "DINOv2 with registers": (
        "Dinov2WithRegistersForImageClassification",
        28,
        dict(image_size=28, patch_size=14, num_register_tokens=2),
        dict(reg_tokens=2, pos_embed_prefix=False, classifier="token_gap", name="dinov2-reg-S/14"),
    ),
    "CLIP, QuickGELU, the projection as the head": (
        "CLIPVisionModelWithProjection",
        32,
        dict(image_size=32, patch_size=16, intermediate_size=96, projection_dim=7),
        dict(gelu="quick", pre_norm=True, patch_bias=False, layer_norm_eps=1e-5, num_classes=7),
    ),
    "OpenCLIP, exact GELU": (
        "CLIPVisionModelWithProjection",
        32,
        dict(
            image_size=32, patch_size=16, intermediate_size=96, projection_dim=5, hidden_act="gelu"
        ),
        dict(gelu="exact", num_classes=5),
    ),
    "SigLIP, every token's mean classified": (
        "SiglipForImageClassification",
        32,
        dict(image_size=32, intermediate_size=96),
        dict(
            classifier="gap",
            has_class_token=False,
            gelu="tanh",
            final_norm="before_pool",
            name="siglip-B/16",
        ),
    ),
}


@pytest.mark.parametrize("case", list(CLASSIFIERS))
def test_transformers_classifiers_give_their_logits(case, tmp_path):
    cls, size, fields, expected = CLASSIFIERS[case]
    reference = hf_model(cls, **fields)
    reference.save_pretrained(tmp_path / "folder")
    ours, names = load_model(tmp_path / "folder")
    got = {f: getattr(ours.config, f) for f in expected}
    assert got == expected, case
    # CLIP's projection has no labels of its own: its config's id2label need not have one a row
    labelled = ours.config.num_classes == len(LABELS)
    assert names == (list(LABELS.values()) if labelled else [f"class {i}" for i in range(5)])
    output = (lambda out: out.image_embeds) if "CLIP" in cls else LOGITS
    assert_parity(ours, reference, size, f"transformers {case}", output=output)


# case: (class, image size, config fields, what is compared: "pooled" (vitlab's pre-logits against pooler_output) or
# "tokens" (vitlab's tokens after the final norm against last_hidden_state), ModelConfig fields expected)
FEATURE_MODELS = {
    "ViTModel, its pooler as the pre-logits layer": (
        "ViTModel",
        32,
        dict(image_size=32, intermediate_size=96),
        "pooled",
        dict(representation_size=48, classifier="token"),
    ),
    "DeiTModel": (
        "DeiTModel",
        32,
        dict(image_size=32, intermediate_size=96),
        "pooled",
        dict(reg_tokens=1),
    ),
    "Dinov2Model, the mask token dropped": (
        "Dinov2Model",
        28,
        dict(image_size=28),
        "tokens",
        dict(classifier="token_gap", representation_size=None),
    ),
    "Dinov2WithRegistersModel": (
        "Dinov2WithRegistersModel",
        28,
        dict(image_size=28, patch_size=14),
        "tokens",
        dict(reg_tokens=4),
    ),
    "CLIPVisionModel, post_layernorm on the class token": (
        "CLIPVisionModel",
        32,
        dict(image_size=32, patch_size=16, intermediate_size=96),
        "pooled",
        dict(pre_norm=True, classifier="token"),
    ),
    "SiglipVisionModel, the MAP head": (
        "SiglipVisionModel",
        32,
        dict(image_size=32, intermediate_size=96),
        "pooled",
        dict(classifier="map"),
    ),
    "SiglipVisionModel without its head": (
        "SiglipVisionModel",
        32,
        dict(image_size=32, intermediate_size=96, vision_use_head=False),
        "tokens",
        dict(classifier="gap"),
    ),
}


@pytest.mark.parametrize("case", list(FEATURE_MODELS))
def test_transformers_feature_models_give_their_features(case, tmp_path, capsys):
    cls, size, fields, compared, expected = FEATURE_MODELS[case]
    if (
        "vision_use_head" in fields
        and "vision_use_head" not in transformers.SiglipVisionConfig().to_dict()
    ):
        pytest.skip(f"transformers {transformers.__version__}'s SigLIP always has its head")
    reference = hf_model(cls, **fields)
    reference.save_pretrained(tmp_path / "folder")
    assert main(["predict", str(tmp_path / "folder"), "x.png"]) == 1
    assert "holds no classification head" in one_error_line(capsys)
    ours = headless(tmp_path / "folder")
    assert {f: getattr(ours.config, f) for f in expected} == expected, case
    output = (
        (lambda out: out.pooler_output)
        if compared == "pooled"
        else (lambda out: out.last_hidden_state)
    )
    assert_parity(
        Pooled(ours, compared == "pooled"), reference, size, f"transformers {case}", output=output
    )


@pytest.mark.parametrize("cls", ["CLIPModel", "SiglipModel"])
def test_whole_clip_and_siglip_models_give_their_image_features(cls, tmp_path):
    fields = dict(image_size=32, patch_size=16, intermediate_size=96)
    reference = hf_model(cls, **fields)
    reference.save_pretrained(tmp_path / "folder")
    if cls == "CLIPModel":  # the image projection is the head
        ours, _ = load_model(tmp_path / "folder")
    else:
        ours = Pooled(headless(tmp_path / "folder"), pooled=True)
    assert_parity(ours, ImageFeatures(reference), 32, f"transformers {cls}'s image features")


def test_weights_file_pytorch_model_bin_and_older_key_layouts(tmp_path):
    reference = hf_model("ViTForImageClassification", image_size=32, intermediate_size=96)
    reference.save_pretrained(tmp_path / "folder")
    # The file, its config.json beside it
    ours, _ = load_model(tmp_path / "folder" / "model.safetensors")
    assert_parity(ours, reference, 32, "transformers model.safetensors", output=LOGITS)
    # older Hub repositories hold pytorch_model.bin, the same keys pickled (transformers 4's safe_serialization=False)
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "config.json").write_text((tmp_path / "folder" / "config.json").read_text())
    torch.save(load_file(tmp_path / "folder" / "model.safetensors"), legacy / "pytorch_model.bin")
    ours, _ = load_model(legacy)
    assert_parity(ours, reference, 32, "transformers pytorch_model.bin", output=LOGITS)
    # transformers 4's CLIPVisionModel holds its tower under vision_model., and before 4.31 its position_ids buffer
    clip = hf_model("CLIPVisionModel", image_size=32, patch_size=16, intermediate_size=96)
    clip.save_pretrained(tmp_path / "clip")
    state = load_file(tmp_path / "clip" / "model.safetensors")
    state = {
        ("" if k.startswith("vision_model.") else "vision_model.") + k: v for k, v in state.items()
    }
    state["vision_model.embeddings.position_ids"] = torch.arange(5)[None]
    save_file(state, tmp_path / "clip" / "model.safetensors")
    assert_parity(
        Pooled(headless(tmp_path / "clip"), True),
        clip,
        32,
        "CLIPVisionModel, 4.x keys",
        output=lambda o: o.pooler_output,
    )


def test_vitmodel_pooler_fine_tunes_or_is_dropped(tmp_path, capsys):
    reference = hf_model("ViTModel", image_size=32, intermediate_size=96)
    reference.save_pretrained(tmp_path / "folder")
    spec = dict(
        num_classes=4, img_size=32, depth=2, hidden_size=48, num_heads=3, mlp_dim=96, gelu="exact"
    )
    model = create_model("Ti/16", layer_norm_eps=1e-12, representation_size=48, **spec)
    load_pretrained(model, tmp_path / "folder", verbose=False).eval()
    model.head = nn.Identity()  # the model's output is then the pre-logits layer's
    assert_parity(
        model, reference, 32, "ViTModel pooler (pre-logits)", output=lambda out: out.pooler_output
    )
    plain = create_model("Ti/16", layer_norm_eps=1e-12, **spec)
    load_pretrained(plain, tmp_path / "folder")
    assert "pre-logits layer dropped" in capsys.readouterr().out
    assert not isinstance(plain.pre_logits, nn.Sequential)


# ---------------------------------------------------------------------------------------------
# How images are fed: preprocessor_config.json


def processor(kind: str, **values):
    return getattr(transformers, kind)(**values)


# case: (the processor, or preprocessor_config.json's fields, the ModelConfig fields expected)
PROCESSORS = {
    "ViT's: squashed, bilinear": (
        lambda: processor("ViTImageProcessor", size={"height": 32, "width": 32}),
        dict(
            resize="squash",
            crop_pct=1.0,
            interpolation="bilinear",
            image_mean=(0.5,) * 3,
            image_std=(0.5,) * 3,
        ),
    ),
    "DINOv2's (BiT's): the shorter side, the centre": (
        lambda: processor(
            "BitImageProcessor",
            size={"shortest_edge": 256},
            crop_size={"height": 224, "width": 224},
            image_mean=list(IMAGENET[0]),
            image_std=list(IMAGENET[1]),
        ),
        dict(
            resize="shorter_side",
            crop_pct=0.875,
            interpolation="bicubic",
            image_mean=IMAGENET[0],
            image_std=IMAGENET[1],
        ),
    ),
    "CLIP's": (
        lambda: processor("CLIPImageProcessor"),
        dict(resize="shorter_side", crop_pct=1.0, interpolation="bicubic", image_mean=CLIP_MEAN),
    ),
    "SigLIP's": (
        lambda: processor("SiglipImageProcessor"),
        dict(resize="squash", crop_pct=1.0, interpolation="bicubic"),
    ),
    "DeiT's: squashed larger, the centre": (
        lambda: processor("DeiTImageProcessor"),
        dict(resize="squash", crop_pct=0.875, interpolation="bicubic"),
    ),
    "an older CLIP file's integer sizes": (
        dict(
            feature_extractor_type="CLIPFeatureExtractor",
            size=224,
            crop_size=224,
            do_center_crop=True,
            resample=3,
        ),
        dict(resize="shorter_side", crop_pct=1.0, interpolation="bicubic"),
    ),
    "an older ViT file's integer size": (
        dict(feature_extractor_type="ViTFeatureExtractor", size=224, resample=2),
        dict(resize="squash", crop_pct=1.0, interpolation="bilinear"),
    ),
    "pixels in 0..255, not rescaled": (
        dict(
            size={"height": 32, "width": 32},
            do_rescale=False,
            image_mean=[127.5] * 3,
            image_std=[63.75] * 3,
        ),
        dict(image_mean=(0.5,) * 3, image_std=(0.25,) * 3),
    ),
    "not normalised": (
        dict(size={"height": 32, "width": 32}, do_normalize=False),
        dict(image_mean=(0.0,) * 3, image_std=(1.0,) * 3),
    ),
}


def vit_folder(tmp_path, seed: int = 0):
    hf_model(
        "ViTForImageClassification", seed, image_size=32, intermediate_size=96
    ).save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


@pytest.mark.parametrize("case", list(PROCESSORS))
def test_preprocessor_config_says_how_images_are_fed(case, tmp_path):
    made, expected = PROCESSORS[case]
    folder = vit_folder(tmp_path)
    if isinstance(made, dict):
        (folder / "preprocessor_config.json").write_text(json.dumps(made))
    else:
        made().save_pretrained(folder)
    config = read_weights(folder).config
    assert {f: getattr(config, f) for f in expected} == expected, case


def test_normalisation_of_unrescaled_pixels_is_transformers(tmp_path):
    """Where transformers does not rescale, or does not normalise, vitlab's mean and std of images in [0, 1] give the
    numbers transformers' processor gives."""
    image = torch.randint(
        0, 256, (32, 32, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8
    )
    unit = image.permute(2, 0, 1).double() / 255
    for i, case in enumerate(("pixels in 0..255, not rescaled", "not normalised")):
        folder = vit_folder(tmp_path / str(i))
        values = {**PROCESSORS[case][0], "image_processor_type": "ViTImageProcessor"}
        (folder / "preprocessor_config.json").write_text(json.dumps(values))
        config = read_weights(folder).config
        processed = transformers.AutoImageProcessor.from_pretrained(folder)(
            Image.fromarray(image.numpy()), return_tensors="pt"
        )["pixel_values"][0]
        mean, std = (
            torch.tensor(v, dtype=torch.float64)[:, None, None]
            for v in (config.image_mean, config.image_std)
        )
        # transformers rescales, subtracts and divides in float32: each rounds once, to magnitudes below these
        bound = ulps((unit.abs() + mean.abs()) / std, torch.float32, n=4)
        assert_within(processed, (unit - mean) / std, bound, case)


# ---------------------------------------------------------------------------------------------
# Refusals in reading: one line naming the field


# case: (config.json's change, what the line says)
CONFIG_REFUSALS = {
    "another model": ({"model_type": "swin"}, "model_type 'swin'"),
    "ReLU": ({"hidden_act": "relu"}, "hidden_act 'relu'"),
    "rectangular image": ({"image_size": [32, 48]}, "image_size [32, 48]"),
    "grey images": ({"num_channels": 1}, "num_channels 1"),
    "odd head_dim": ({"head_dim": 32}, "head_dim 32"),
}


@pytest.mark.parametrize("case", list(CONFIG_REFUSALS))
def test_config_refusals(case, tmp_path, capsys):
    folder = vit_folder(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    change, expected = CONFIG_REFUSALS[case]
    (folder / "config.json").write_text(json.dumps({**config, **change}))
    assert main(["eval", str(folder)]) == 1
    line = one_error_line(capsys)
    assert str(folder) in line and "config.json" in line and expected in line, line


# case: (preprocessor_config.json, what the line says)
PROCESSOR_REFUSALS = {
    "nearest": ({"size": {"height": 32, "width": 32}, "resample": 0}, "resample 0"),
    "longest edge": ({"size": {"longest_edge": 32}}, "size {'longest_edge': 32}"),
    "shortest edge, no crop": (
        {"size": {"shortest_edge": 32}, "do_center_crop": False},
        "size {'shortest_edge': 32}",
    ),
    "not resized": ({"do_resize": False}, "do_resize False"),
    "rectangular crop": (
        {"size": {"shortest_edge": 40}, "crop_size": {"height": 32, "width": 24}},
        "crop_size {'height': 32, 'width': 24}",
    ),
    "crop beyond the image": ({"size": {"shortest_edge": 24}, "crop_size": 32}, "crop_size 32"),
    "one mean for all channels": ({"size": 32, "image_mean": 0.5}, "image_mean 0.5"),
    "a mean beyond the pixels' range": (
        {"size": 32, "image_mean": [0.5, 0.5, 1.5]},
        "image_mean must be",
    ),
}


@pytest.mark.parametrize("case", list(PROCESSOR_REFUSALS))
def test_preprocessor_refusals(case, tmp_path, capsys):
    folder = vit_folder(tmp_path)
    values, expected = PROCESSOR_REFUSALS[case]
    (folder / "preprocessor_config.json").write_text(json.dumps(values))
    assert main(["predict", str(folder), "x.png"]) == 1
    line = one_error_line(capsys)
    assert str(folder) in line and expected in line, line


def test_file_refusals(tmp_path, capsys):
    hf_model("ViTModel", image_size=32, intermediate_size=96, pooler_act="relu").save_pretrained(
        tmp_path / "relu"
    )
    with pytest.raises(CheckpointError, match="pooler_act 'relu'"):
        load_pretrained(
            create_model("Ti/16", img_size=32, depth=2, representation_size=48), tmp_path / "relu"
        )
    folder = vit_folder(tmp_path)
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    for path, expected in (
        (alone / "model.safetensors", "need the config.json"),
        (alone, "a folder without config.json"),
    ):
        assert main(["predict", str(path), "x.png"]) == 1
        assert expected in one_error_line(capsys)
    (alone / "config.json").write_text("{}")
    (alone / "model.safetensors").unlink()
    assert main(["predict", str(alone), "x.png"]) == 1
    assert "no model.safetensors or pytorch_model.bin" in one_error_line(capsys)
    # A JSON file is no checkpoint
    assert main(["predict", str(folder / "config.json"), "x.png"]) == 1
    assert "not a readable checkpoint" in one_error_line(capsys)
    # A file of another family than its config.json's
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "clip_vision_model"}))
    assert main(["predict", str(folder), "x.png"]) == 1
    line = one_error_line(capsys)
    assert "no embeddings.patch_embedding.weight: not the weights of the transformers" in line


# ---------------------------------------------------------------------------------------------
# Writing: vitlab -> hf -> vitlab, and transformers' own class of the export


# case: (the model, the class it is written as). Image sizes where img_size / crop_pct is a whole number of pixels, so
# that the crop share read back from the written sizes is the model's.
ROUND_TRIPS = {
    "ViT, tanh GELU": (dict(name="Ti/16", img_size=32, depth=2), "ViTForImageClassification"),
    "ViT, exact GELU, eps 1e-12": (
        dict(name="B/16", img_size=32, depth=1, gelu="exact", layer_norm_eps=1e-12),
        "ViTForImageClassification",
    ),
    "DINOv2": (dict(name="dinov2-S/14", img_size=28, depth=2), "Dinov2ForImageClassification"),
    "DINOv2 giant's SwiGLU": (
        dict(name="dinov2-g/14", img_size=28, depth=1, hidden_size=96, num_heads=4, mlp_dim=128),
        "Dinov2ForImageClassification",
    ),
    "DINOv2 with registers": (
        dict(name="dinov2-reg-S/14", img_size=28, depth=2),
        "Dinov2WithRegistersForImageClassification",
    ),
    "CLIP, QuickGELU": (
        dict(name="clip-B/16", img_size=32, depth=2, hidden_size=96, num_heads=4, mlp_dim=384),
        "CLIPVisionModelWithProjection",
    ),
    "OpenCLIP, exact GELU": (
        dict(name="openclip-B/32", img_size=64, depth=1, hidden_size=96, num_heads=4, mlp_dim=384),
        "CLIPVisionModelWithProjection",
    ),
    "SigLIP, average pooling": (
        dict(name="siglip-B/16", img_size=32, depth=1, classifier="gap"),
        "SiglipForImageClassification",
    ),
    "DeiT, distilled": (
        dict(name="deit-distilled-Ti/16", img_size=56, patch_size=8, depth=2),
        "DeiTForImageClassificationWithTeacher",
    ),
    "DeiT, the distillation token unread": (
        dict(name="deit-Ti/16", img_size=56, patch_size=8, depth=1, reg_tokens=1),
        "DeiTForImageClassification",
    ),
    "DeiT III's positions, token_gap": (
        dict(name="deit3-S/16", img_size=56, patch_size=8, depth=1, classifier="token_gap"),
        "Dinov2WithRegistersForImageClassification",
    ),
}


@pytest.mark.parametrize("case", list(ROUND_TRIPS))
def test_vitlab_hf_vitlab_is_bit_exact(case, tmp_path, randomise, capsys):
    spec, architecture = ROUND_TRIPS[case]
    names = ["cat", "dög", "fish 🐟"]
    model, source = vitlab_source(tmp_path, randomise, spec, names)
    if model.config.pre_norm:  # CLIP's projection has no bias
        with torch.no_grad():
            model.head.bias.zero_()
        save_safetensors(model, source, names)
    out = tmp_path / "hf"
    assert main(["export", str(source), "--format", "hf", "--out", str(out)]) == 0
    line = capsys.readouterr().out.splitlines()[0]
    assert line.startswith(
        f"transformers {transformers.__version__}: {architecture}.from_pretrained("
    ), line
    print(f"export hf {case}: {line.rsplit(': ', 1)[-1]}")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "hf",
        "source.safetensors",
    ]  # no temporary folder left
    back, back_names = load_model(out)
    assert back_names == names
    assert back.config.replace(name=model.config.name) == model.config
    state_equal(back, model)
    reference = getattr(transformers, architecture).from_pretrained(out).eval()
    assert reference.config.id2label == dict(enumerate(names))
    output = (lambda o: o.image_embeds) if model.config.pre_norm else LOGITS
    assert_parity(model, reference, model.config.img_size, f"vitlab -> hf {case}", output=output)
    # transformers reads how the images are fed as vitlab wrote it
    fed = transformers.AutoImageProcessor.from_pretrained(out)
    side = round(model.config.img_size / model.config.crop_pct)
    size = (
        {"shortest_edge": side}
        if model.config.resize == "shorter_side"
        else {"height": side, "width": side}
    )
    assert {k: v for k, v in dict(fed.size).items() if v is not None} == size
    assert list(fed.image_mean) == list(model.config.image_mean) and fed.resample == (
        3 if model.config.interpolation == "bicubic" else 2
    )


def test_a_multi_label_model_exports_as_transformers_multi_label_classification(
    tmp_path, randomise, capsys
):
    spec = dict(name="Ti/16", img_size=32, depth=1, multi_label=True)
    model, source = vitlab_source(tmp_path, randomise, spec, ["cat", "dog", "fish"])
    out = tmp_path / "hf"
    assert main(["export", str(source), "--format", "hf", "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["problem_type"] == (
        "multi_label_classification"
    )
    assert transformers.AutoConfig.from_pretrained(out).problem_type == "multi_label_classification"
    back, _ = load_model(out)
    assert back.config.multi_label
    # A single-label model's says nothing of it (transformers' default: inferred from the labels)
    single, source = vitlab_source(tmp_path, randomise, dict(spec, multi_label=False), ["a", "b"])
    assert main(["export", str(source), "--format", "hf", "--out", str(tmp_path / "one")]) == 0
    assert "problem_type" not in json.loads((tmp_path / "one" / "config.json").read_text())
    assert not load_model(tmp_path / "one")[0].config.multi_label


def test_export_over_its_own_folder_needs_overwrite(tmp_path, randomise, capsys):
    _, source = vitlab_source(
        tmp_path, randomise, dict(name="Ti/16", img_size=32, depth=1), ["a", "b"]
    )
    out = tmp_path / "hf"
    assert main(["export", str(source), "--format", "hf", "--out", str(out)]) == 0
    assert main(["export", str(source), "--format", "hf", "--out", str(out)]) == 2
    assert "already exists; --overwrite replaces it" in capsys.readouterr().err
    assert main(["export", str(source), "--format", "hf", "--out", str(out), "--overwrite"]) == 0


# case: (the model's fields, what the line says)
EXPORT_REFUSALS = {
    "attention pooling": (dict(name="siglip-B/16"), "classifier map"),
    "MAE's mean beside a class token": (dict(name="mae-B/16"), "cannot compute classifier 'gap'"),
    "DeiT III's class token alone": (dict(name="deit3-S/16"), "cannot compute classifier 'token'"),
    "registers with position rows": (
        dict(name="dinov2-S/14", img_size=28, reg_tokens=2),
        "Dinov2WithRegistersForImageClassification cannot compute pos_embed_prefix True",
    ),
    "a norm before the blocks beside a patch bias": (
        dict(name="Ti/16", pre_norm=True),
        "patch_bias True",
    ),
    "DINOv2 of no integer mlp_ratio": (
        dict(name="dinov2-S/14", img_size=28, mlp_dim=100),
        "mlp_dim 100",
    ),
    "pre-logits": (
        dict(name="Ti/16", representation_size=24),
        "no pre-logits layer (representation_size)",
    ),
    "hybrid": (
        dict(name="R50+B/16", img_size=64, hidden_size=768, num_heads=12),
        "no ViT with a ResNet stem",
    ),
}


@pytest.mark.parametrize("case", list(EXPORT_REFUSALS))
def test_export_refusals_write_nothing(case, tmp_path, capsys):
    changes, expected = EXPORT_REFUSALS[case]
    spec = {"img_size": 32, "depth": 1, "hidden_size": 48, "num_heads": 3, "mlp_dim": 96, **changes}
    model = create_model(spec.pop("name"), num_classes=3, **spec)
    save_safetensors(model, tmp_path / "source.safetensors", ["a", "b", "c"])
    assert (
        main(
            [
                "export",
                str(tmp_path / "source.safetensors"),
                "--format",
                "hf",
                "--out",
                str(tmp_path / "hf"),
            ]
        )
        == 1
    )
    assert expected in one_error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["source.safetensors"]


def test_clip_head_with_a_bias_is_refused(tmp_path, randomise, capsys):
    spec = dict(name="clip-B/16", img_size=32, depth=1, hidden_size=48, num_heads=3, mlp_dim=96)
    _, source = vitlab_source(tmp_path, randomise, spec, ["a", "b"])
    assert main(["export", str(source), "--format", "hf", "--out", str(tmp_path / "hf")]) == 1
    assert (
        "CLIPVisionModelWithProjection's projection has no bias, and this model's head.bias"
        in one_error_line(capsys)
    )
    assert not (tmp_path / "hf").exists()


def test_hf_export_will_not_replace_a_foreign_folder(tiny_run, tmp_path, capsys):
    (tmp_path / "mine.txt").write_text("keep")
    export = ["export", str(tiny_run.checkpoint), "--format", "hf", "--out", str(tmp_path)]
    assert main(export) == 2
    assert "already exists" in one_error_line(capsys)
    assert main([*export, "--overwrite"]) == 1  # even so
    assert "not a folder this export wrote" in one_error_line(capsys)
    assert [p.name for p in tmp_path.iterdir()] == ["mine.txt"]


def test_hf_export_that_differs_is_refused(tiny_run, tmp_path, capsys, monkeypatch):
    original = transformers.ViTForImageClassification.forward

    def off(self, *args, **kwargs):  # a library whose logits are 1e-3 off
        out = original(self, *args, **kwargs)
        out.logits = out.logits + 1e-3
        return out

    monkeypatch.setattr(transformers.ViTForImageClassification, "forward", off)
    assert (
        main(["export", str(tiny_run.checkpoint), "--format", "hf", "--out", str(tmp_path / "hf")])
        == 1
    )
    line = one_error_line(capsys)
    assert "1.00e-03" in line and "not written" in line
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# Fine-tuning a folder at another size: the position table resampled by transformers' own rule


# case: (class, patch, its config fields, the rule's name, whether its forward resamples only when asked)
RESAMPLED = {
    "ViT": ("ViTForImageClassification", 16, dict(intermediate_size=96), "transformers", True),
    "DeiT, distilled": (
        "DeiTForImageClassificationWithTeacher",
        16,
        dict(intermediate_size=96),
        "transformers",
        True,
    ),
    "DINOv2": ("Dinov2ForImageClassification", 14, {}, "transformers Dinov2", False),
    "DINOv2 with registers": (
        "Dinov2WithRegistersForImageClassification",
        14,
        {},
        "transformers Dinov2WithRegisters",
        False,
    ),
    "CLIP": (
        "CLIPVisionModelWithProjection",
        16,
        dict(intermediate_size=96, projection_dim=7),
        "transformers",
        True,
    ),
    "SigLIP": (
        "SiglipForImageClassification",
        16,
        dict(intermediate_size=96),
        "transformers",
        True,
    ),
}


@pytest.mark.parametrize("case", list(RESAMPLED))
def test_fine_tuning_at_another_size_resamples_as_transformers_does(case, tmp_path, capsys):
    cls, patch, fields, rule, asked = RESAMPLED[case]
    reference = hf_model(cls, image_size=4 * patch, patch_size=patch, **fields)
    reference.save_pretrained(tmp_path / "folder")
    wanted = read_weights(tmp_path / "folder").config.replace(img_size=3 * patch)
    ours = pretrained_model(tmp_path / "folder", wanted).eval()
    assert f"resized from 16 to 9 patches ({rule}'s rule)" in capsys.readouterr().out
    # The table is the one transformers' forward interpolates, bit for bit
    tower = getattr(reference.base_model, "vision_model", reference.base_model)
    tokens = torch.zeros(1, ours.config.num_tokens - ours.config.reg_tokens, wanted.hidden_size)
    with torch.no_grad():
        table = tower.embeddings.interpolate_pos_encoding(tokens, 3 * patch, 3 * patch)
    # with registers, the class token's row is in the class token
    assert torch.equal(ours.pos_embed, table if ours.config.pos_embed_prefix else table[:, 1:])

    def at_this_size(images):  # transformers' model on images of another size than its table's
        out = reference(
            pixel_values=images, **({"interpolate_pos_encoding": True} if asked else {})
        )
        return out.image_embeds if "CLIP" in cls else out.logits

    # transformers interpolates at every forward in the model's dtype, vitlab once in the file's:
    # the same function in float32, where float64 runs differ by the float32 table's rounding
    x = images(3 * patch)
    got, got64, _ = float32_rounding(ours, x)
    with torch.no_grad():
        expected = at_this_size(x)
    assert_within_float32_rounding(got, got64, expected, f"transformers {case} at {3 * patch} px")
    assert (got - expected).abs().max() <= PARITY_ATOL
    # A bfloat16 table too: ViT's, DeiT's, CLIP's and SigLIP's rule resamples in the table's dtype,
    # DINOv2's in float32
    table = read_weights(tmp_path / "folder").state["pos_embed"].bfloat16()
    prefix = ours.config.num_positions - ours.config.grid_size**2
    with torch.no_grad():
        theirs = tower.embeddings.to(torch.bfloat16).interpolate_pos_encoding(
            tokens.bfloat16(), 3 * patch, 3 * patch
        )
    ours_bf16 = RESAMPLERS[rule](table, prefix, 3)
    assert torch.equal(ours_bf16, theirs if ours.config.pos_embed_prefix else theirs[:, 1:])

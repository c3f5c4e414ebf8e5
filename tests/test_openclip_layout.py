"""CLIP's state dicts as OpenAI and OpenCLIP release them: random image towers beside a text tower (QuickGELU and
the exact GELU, float16 and float32, a bare state dict, a safetensors file and a training checkpoint) give in vitlab
the logits of timm's model after timm's own conversion of the same file, with the GELU of the variant named and
CLIP's preprocessing; fine-tuning at another size resamples as OpenCLIP does; what the file cannot say, or vitlab
cannot compute, is refused in one line."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from vitlab.app.cli import main
from vitlab.config import get_config
from vitlab.errors import CheckpointError
from vitlab.formats.checkpoints import load_model, load_pretrained, pretrained_model
from vitlab.model import create_model

from parity import assert_parity, one_error_line, timm_model

timm = pytest.importorskip("timm")

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)

# timm's names -> OpenAI's, in this order (timm's `_convert_openai_clip` undone)
OPENAI_NAMES = (
    ("patch_embed.proj.", "conv1."),
    ("norm_pre.", "ln_pre."),
    ("blocks.", "transformer.resblocks."),
    (".norm1.", ".ln_1."),
    (".norm2.", ".ln_2."),
    (".attn.qkv.", ".attn.in_proj_"),
    (".attn.proj.", ".attn.out_proj."),
    (".mlp.fc1.", ".mlp.c_fc."),
    (".mlp.fc2.", ".mlp.c_proj."),
    ("norm.", "ln_post."),
)


def openai_state(reference: nn.Module, seed: int = 2) -> dict[str, torch.Tensor]:
    """A timm CLIP model's weights as OpenAI's and OpenCLIP's state dicts hold them: the image tower under
    `visual.` (the class token a vector, the position table 2-D, the head as the projection `proj` (D, E), without
    a bias), beside a small random text tower and the logit scale."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in reference.state_dict().items():
        if key == "head.bias":
            continue
        if key == "head.weight":
            key, value = "proj", value.T.contiguous()
        elif key == "cls_token":
            key, value = "class_embedding", value.reshape(-1)
        elif key == "pos_embed":
            key, value = "positional_embedding", value[0]
        for theirs, ours in OPENAI_NAMES:
            key = key.replace(theirs, ours)
        state["visual." + key] = value
    text = {
        "token_embedding.weight": (10, 32),
        "positional_embedding": (5, 32),
        "transformer.resblocks.0.attn.in_proj_weight": (96, 32),
        "ln_final.weight": (32,),
        "text_projection": (32, 7),
        "logit_scale": (),
    }
    state.update({k: torch.randn(shape, generator=generator) for k, shape in text.items()})
    return state


def save_openai(state, path):
    torch.save(
        {k: v.half() for k, v in state.items()}, path
    )  # OpenAI's released weights are float16


def save_training_checkpoint(state, path):
    # OpenCLIP's training writes its DistributedDataParallel state dict with the epoch
    torch.save(
        {"epoch": 3, "name": "run", "state_dict": {"module." + k: v for k, v in state.items()}},
        path,
    )


# (timm's architecture, image size, file name, how it is written, --model_type, the GELU expected)
CLIP_CASES = {
    "OpenAI's QuickGELU, float16": (
        "vit_base_patch16_clip_quickgelu_224",
        32,
        "ViT-B-16.state_dict.pt",
        save_openai,
        "clip-B/16",
        "quick",
    ),
    "OpenCLIP's exact GELU, safetensors": (
        "vit_base_patch16_clip_224",
        32,
        "open_clip_model.safetensors",
        save_file,
        "openclip-B/16",
        "exact",
    ),
    "OpenCLIP's training checkpoint, B/32": (
        "vit_base_patch32_clip_224",
        64,
        "epoch_3.pt",
        save_training_checkpoint,
        "openclip-B/32",
        "exact",
    ),
}


def timm_clip(arch: str, path, size: int, **kwargs) -> nn.Module:
    """timm's model after timm's own conversion of the file (checkpoint_filter_fn: _convert_openai_clip)."""
    return timm.create_model(
        arch,
        pretrained=True,
        pretrained_cfg_overlay={"file": str(path), "num_classes": 7},
        num_classes=7,
        img_size=size,
        depth=2,
        **kwargs,
    ).eval()


@pytest.mark.parametrize("case", list(CLIP_CASES))
def test_clip_state_dict_gives_timms_logits(case, tmp_path, randomise):
    arch, size, filename, save, model_type, gelu = CLIP_CASES[case]
    path = tmp_path / filename
    save(openai_state(timm_model(arch, size, randomise, depth=2)), path)
    reference = timm_clip(arch, path, size)
    ours, names = load_model(path, model_type=model_type)
    clip = dict(
        gelu=gelu,
        layer_norm_eps=1e-5,
        pre_norm=True,
        patch_bias=False,
        image_mean=CLIP_MEAN,
        resize="shorter_side",
        crop_pct=1.0,
        interpolation="bicubic",
        name=model_type,
    )
    assert {f: getattr(ours.config, f) for f in clip} == clip
    assert names == [f"class {i}" for i in range(7)] and ours.config.img_size == size
    assert_parity(ours, reference, size, f"CLIP {case}")


def test_fine_tuning_at_another_size_resamples_as_openclip_does(tmp_path, randomise, capsys):
    arch = "vit_base_patch16_clip_224"
    path = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(openai_state(timm_model(arch, 32, randomise, depth=2)), path)
    wanted = get_config("openclip-B/16", depth=2, img_size=48, num_classes=7)
    ours = pretrained_model(path, wanted).eval()
    assert "resized from 4 to 9 patches (openclip's rule)" in capsys.readouterr().out
    # timm resamples as OpenCLIP's resize_pos_embed does (bicubic, antialiased) a float32 table; the head is kept
    assert_parity(ours, timm_clip(arch, path, 48), 48, "OpenCLIP at 48 px")


def test_clip_state_dict_loads_into_a_clip_model(tmp_path, randomise):
    arch = "vit_base_patch16_clip_quickgelu_224"
    path = tmp_path / "clip.bin"
    torch.save(openai_state(timm_model(arch, 32, randomise, depth=2)), path)
    # The Python API's fine-tuning: the model says the GELU, its own head of the file's 7 classes is kept
    model = create_model("clip-B/16", depth=2, img_size=32, num_classes=7, dropout_rate=0.0)
    load_pretrained(model, path, verbose=False)
    assert_parity(model.eval(), timm_clip(arch, path, 32), 32, "CLIP into a clip-B/16 model")
    plain = create_model("B/16", depth=2, img_size=32, num_classes=7)
    with pytest.raises(CheckpointError, match="does not say its GELU: .*; B/16 is not one"):
        load_pretrained(plain, path)


def _with(**keys):
    return lambda state: {**state, **{k: torch.zeros(shape) for k, shape in keys.items()}}


# (the change to a random CLIP state dict, --model_type, what the error line says)
CLIP_REFUSALS = {
    "no GELU named": (lambda s: s, None, "does not say its GELU: pass --model_type clip-B/16"),
    "a variant of another family": (
        lambda s: s,
        "B/16",
        "openclip-*: OpenCLIP's exact GELU); B/16 is not one",
    ),
    "a variant of another width": (
        lambda s: s,
        "clip-L/14",
        "hidden_size 768, and --model_type clip-L/14 has 1024",
    ),
    "CoCa's attention pooling": (
        _with(**{"visual.attn_pool.attn.in_proj_weight": (2304, 768)}),
        "openclip-B/16",
        "unexpected keys attn_pool.attn.in_proj_weight: vitlab's ViT has no such parameters",
    ),
    "a class embedding of the wrong rank": (
        _with(**{"visual.class_embedding": (1, 768)}),
        "openclip-B/16",
        "visual.class_embedding has shape (1, 768), not the 1-D tensor of a CLIP image tower",
    ),
}


@pytest.mark.parametrize("case", list(CLIP_REFUSALS))
def test_clip_refusals(case, tmp_path, randomise, capsys):
    change, model_type, expected = CLIP_REFUSALS[case]
    path = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(
        change(openai_state(timm_model("vit_base_patch16_clip_224", 32, randomise, depth=1))), path
    )
    assert (
        main(["predict", str(path), "x.png", *(["--model_type", model_type] if model_type else [])])
        == 1
    )
    line = one_error_line(capsys)
    assert str(path) in line and expected in line, line


@pytest.mark.filterwarnings("ignore:`torch.jit.(script|save)` is deprecated:FutureWarning")
def test_openais_torchscript_file_is_refused_naming_its_state_dict(tmp_path, capsys):
    # OpenAI's released ViT-B-16.pt is a TorchScript archive: code, which vitlab does not run
    torch.jit.save(torch.jit.script(nn.Linear(2, 2)), tmp_path / "ViT-B-16.pt")
    assert (
        main(["predict", str(tmp_path / "ViT-B-16.pt"), "x.png", "--model_type", "clip-B/16"]) == 1
    )
    line = one_error_line(capsys)
    assert (
        "ViT-B-16.pt: a TorchScript archive" in line and "torch.jit.load(path).state_dict()" in line
    )

"""Where each family variant's weights come from: its timm repository on the Hugging Face Hub, which
`vitlab download NAME` and `vitlab train --pretrained_dir auto` fetch (timm's config.json says how
the images are fed), and the transformers repository of the same weights where one exists.

The ids are timm 1.0's (`timm.models.get_pretrained_cfg(name).hf_hub_id`), written here so that
nothing imports timm at run time; tests/test_families.py checks them against the installed timm.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import family
from .files import HUB_PREFIX


@dataclass(frozen=True)
class Source:
    """A family variant's pretrained weights: timm's name of them (architecture.tag, whose
    hf_hub_id is `timm/<name>`) and transformers' repository, if any."""

    timm: str
    transformers: str | None = None

    @property
    def hub(self) -> str:
        return f"{HUB_PREFIX}timm/{self.timm}"


# What each family's weights are, for the listing.
FAMILIES = {
    "dinov2": "DINOv2 (Oquab et al. 2023): self-supervised on LVD-142M, features for frozen use",
    "dinov2-reg": "DINOv2 with 4 registers (Darcet et al. 2024)",
    "clip": "CLIP (Radford et al. 2021): OpenAI's image towers, QuickGELU",
    "openclip": "OpenCLIP's CLIP towers on LAION-2B (Cherti et al. 2023), exact GELU",
    "siglip": "SigLIP (Zhai et al. 2023): sigmoid-loss image towers on WebLI",
    "deit": "DeiT (Touvron et al. 2021): ImageNet-1k classifiers",
    "deit-distilled": "DeiT distilled from a RegNetY-16GF teacher: ImageNet-1k classifiers",
    "deit3": "DeiT III (Touvron et al. 2022): ImageNet-21k, fine-tuned on ImageNet-1k",
    "mae": "MAE (He et al. 2022): masked-autoencoder pretrained encoders, made to be fine-tuned",
}


def _sizes(timm_names: str, hf_names: str | None, variants: str) -> dict[str, Source]:
    """`variants`' sources from format strings over their size names (`{}`)."""
    sizes = {"S": "small", "B": "base", "L": "large", "g": "giant", "Ti": "tiny", "H": "huge"}
    out = {}
    for variant in variants.split():
        size = sizes[variant.split("-")[-1].split("/")[0]]
        out[variant] = Source(timm_names.format(size), hf_names and hf_names.format(size))
    return out


SOURCES: dict[str, Source] = {
    **_sizes(
        "vit_{}_patch14_dinov2.lvd142m",
        "facebook/dinov2-{}",
        "dinov2-S/14 dinov2-B/14 dinov2-L/14 dinov2-g/14",
    ),
    **_sizes(
        "vit_{}_patch14_reg4_dinov2.lvd142m",
        "facebook/dinov2-with-registers-{}",
        "dinov2-reg-S/14 dinov2-reg-B/14 dinov2-reg-L/14 dinov2-reg-g/14",
    ),
    # OpenAI's weights from timm's repositories, whose config.json names timm's exact-GELU
    # architecture: timm loads the same repositories as its `*_clip_quickgelu_224.openai` models
    # too, and the weights were trained with QuickGELU, which the clip-* variant says and
    # timm_layout reads it with. timm's rather than openai/clip-vit-*: its folder holds the image
    # tower alone (model.safetensors) and its pretrained_cfg how the images are fed.
    "clip-B/32": Source("vit_base_patch32_clip_224.openai", "openai/clip-vit-base-patch32"),
    "clip-B/16": Source("vit_base_patch16_clip_224.openai", "openai/clip-vit-base-patch16"),
    "clip-L/14": Source("vit_large_patch14_clip_224.openai", "openai/clip-vit-large-patch14"),
    "openclip-B/32": Source(
        "vit_base_patch32_clip_224.laion2b", "laion/CLIP-ViT-B-32-laion2B-s34B-b79K"
    ),
    "openclip-B/16": Source("vit_base_patch16_clip_224.laion2b"),
    "openclip-L/14": Source(
        "vit_large_patch14_clip_224.laion2b", "laion/CLIP-ViT-L-14-laion2B-s32B-b82K"
    ),
    "siglip-B/16": Source("vit_base_patch16_siglip_224.webli", "google/siglip-base-patch16-224"),
    "siglip-L/16": Source("vit_large_patch16_siglip_256.webli", "google/siglip-large-patch16-256"),
    "siglip-so400m/14": Source(
        "vit_so400m_patch14_siglip_224.webli", "google/siglip-so400m-patch14-224"
    ),
    **_sizes(
        "deit_{}_patch16_224.fb_in1k",
        "facebook/deit-{}-patch16-224",
        "deit-Ti/16 deit-S/16 deit-B/16",
    ),
    **_sizes(
        "deit_{}_distilled_patch16_224.fb_in1k",
        "facebook/deit-{}-distilled-patch16-224",
        "deit-distilled-Ti/16 deit-distilled-S/16 deit-distilled-B/16",
    ),
    **_sizes("deit3_{}_patch16_224.fb_in22k_ft_in1k", None, "deit3-S/16 deit3-B/16 deit3-L/16"),
    # MAE's pretrained encoders (fine-tuning's start); transformers' hold the decoder too
    "mae-B/16": Source("vit_base_patch16_224.mae", "facebook/vit-mae-base"),
    "mae-L/16": Source("vit_large_patch16_224.mae", "facebook/vit-mae-large"),
    "mae-H/14": Source("vit_huge_patch14_224.mae", "facebook/vit-mae-huge"),
}


def default_source(variant: str) -> str | None:
    """`hf-hub:timm/...` for a family variant (its short name), None for the paper's ViTs (whose
    default is the official ImageNet-21k file)."""
    source = SOURCES.get(variant)
    return source.hub if source else None


def listing() -> str:
    """The family variants' sources, grouped by family, for `vitlab download --list`."""
    lines = [
        "family variants (`vitlab download NAME` and --pretrained_dir auto fetch timm's repository; "
        "transformers' holds the same weights):"
    ]
    width = max(len(variant) for variant in SOURCES)
    for name, what in FAMILIES.items():
        lines.append(f"  {what}")
        for variant, source in SOURCES.items():
            if family(variant) == name:
                also = f"  {HUB_PREFIX}{source.transformers}" if source.transformers else ""
                lines.append(f"    {variant:<{width}}  {source.hub}{also}")
    return "\n".join(lines)

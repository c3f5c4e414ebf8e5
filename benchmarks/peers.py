"""The implementations benchmarks/models.py times, each built at a shape with random weights and 10 classes, and
one of each at work: its model, SGD optimizer and a fixed random batch (`Runner`).

vitlab, vitlab-tanh (vitlab with the tanh GELU of Google's weights), timm, torchvision and transformers at the
paper's ViT shapes; vitlab's `dinov2-B/14` variant against timm's `vit_base_patch14_dinov2` at the DINOv2 shape
(layer scale, exact GELU; vitlab reads its class token beside the patches' mean, timm the class token only: 7,680
head weights apart). Each library keeps its own details (LayerNorm eps, attention kernel); the shapes, the parameter
counts (printed) and the GELU (exact, every peer's) are the same.

Dropout, in the "train+drop" cells only (every other cell runs at rate 0): each model is built with its dropout
layers, their rate set per cell (`set_dropout`); attention-weight dropout stays off everywhere. Where each drops, at
depth 12:
  vitlab        after the embeddings, after attention's output projection, after the MLP's GELU and after its
                second layer (model.py: pos_drop, Block.drop, Mlp.drop twice): 37 calls
  timm          the same places (pos_drop_rate: pos_drop; proj_drop_rate: attn.proj_drop, mlp.drop1, mlp.drop2):
                37; its drop_rate is a dropout before the head, which the others lack: left at 0
  torchvision   the same places (dropout: Encoder.dropout, EncoderBlock.dropout, the two in MLPBlock): 37
  transformers  after the embeddings and after attention's and the MLP's output (hidden_dropout_prob:
                embeddings.dropout, ViTLayer.dropout twice), none after the MLP's GELU: 25
"""

from __future__ import annotations

import importlib.util
import os
import time
from dataclasses import dataclass
from unittest.mock import patch

import torch
import torch.nn.functional as F
from torch import nn

from vitlab.runtime import autocast

NUM_CLASSES = 10
LEARNING_RATE = 1e-3  # any small value: the weights move, the work per step does not depend on it
MOMENTUM = 0.9
PEERS = ("timm", "torchvision", "transformers")
# vitlab-tanh: vitlab with the tanh GELU, for shapes with official weights
IMPLEMENTATIONS = ("vitlab", "vitlab-tanh", *PEERS)
# Dropout layers that are not the hidden dropout every implementation has: attention weights', timm's before the head
NOT_HIDDEN_DROPOUT = ("attn_drop", "head_drop")


@dataclass(frozen=True)
class Shape:
    vitlab_variant: str  # the vitlab variant the shape starts from (the rest overridden below)
    img_size: int
    patch_size: int
    width: int
    depth: int
    heads: int
    mlp_dim: int
    batch: int
    about: str
    official_weights: bool  # Google released weights of this shape: also time vitlab-tanh
    family: str = "vit"  # "dinov2": vitlab's DINOv2 variant against timm's

    @property
    def patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2


SHAPES = {
    "B/16": Shape(
        "B/16", 224, 16, 768, 12, 12, 3072, 16, "ViT-B/16, the tutorial's fine-tuning shape", True
    ),
    "Ti/4-32": Shape(
        "Ti/16", 32, 4, 192, 12, 3, 768, 256, "ViT-Ti at patch 4, training from scratch", False
    ),
    "DINOv2-B/14": Shape(
        "dinov2-B/14", 224, 14, 768, 12, 12, 3072, 16, "DINOv2 ViT-B/14 at 224 px", False, "dinov2"
    ),
}
# --smoke: the same code on tiny models, for a check of the plumbing
SMOKE_CHANGES = {"depth": 1, "batch": 2}


def forward_flops(s: Shape) -> float:
    """FLOPs (2 per multiply-add) of one image's forward pass; norms, softmax, GELU and residual adds left out."""
    tokens = s.patches + 1  # and the class token
    D = s.width
    embed = s.patches * (3 * s.patch_size**2) * D
    block = (
        tokens * D * 3 * D  # qkv
        + tokens * tokens * D  # attention scores, all heads
        + tokens * tokens * D  # weighted sum of the values
        + tokens * D * D  # output projection
        + 2 * tokens * D * s.mlp_dim  # MLP, two layers
    )
    head = D * NUM_CLASSES
    return 2.0 * (embed + s.depth * block + head)


def available(impl: str) -> bool:
    # Each implementation is the package of its name
    return importlib.util.find_spec(impl.split("-")[0]) is not None


def timed_on(shape: Shape, impls: list[str]) -> list[str]:
    """The implementations timed on a shape: vitlab-tanh only where official weights of the shape exist, DINOv2 by
    vitlab and timm."""
    if shape.family == "dinov2":
        return [i for i in impls if i in ("vitlab", "timm")]
    return [i for i in impls if i != "vitlab-tanh" or shape.official_weights]


# ---------------------------------------------------------------------------------------------
# The implementations, each returning (module, forward: images -> logits, how it computes attention)


def build(impl: str, s: Shape, dropout: float):
    """`impl` at shape `s`, its hidden dropout layers built at rate `dropout`."""
    if impl in ("vitlab", "vitlab-tanh"):
        return _vitlab(s, "tanh" if impl == "vitlab-tanh" else "exact", dropout)
    builders = {"timm": _timm, "torchvision": _torchvision, "transformers": _transformers}
    if impl not in builders:
        raise ValueError(f"unknown implementation {impl!r}")
    return builders[impl](s, dropout)


def _vitlab(s: Shape, gelu: str, dropout: float):
    from vitlab import create_model

    sizes = dict(hidden_size=s.width, depth=s.depth, num_heads=s.heads, mlp_dim=s.mlp_dim)
    if s.family == "vit":  # the variant's patch and sizes replaced by the shape's
        sizes.update(patch_size=s.patch_size, gelu=gelu)
    model = create_model(
        s.vitlab_variant,
        img_size=s.img_size,
        num_classes=NUM_CLASSES,
        dropout_rate=dropout,
        **sizes,
    )
    attention = (
        f"attention_impl={model.config.attention_impl} (the fast paths line says which kernel)"
    )
    return model, model, f"{model.config.gelu} GELU, {attention}"


def _timm(s: Shape, dropout: float):
    import timm
    from timm.models.vision_transformer import VisionTransformer

    drops = dict(pos_drop_rate=dropout, proj_drop_rate=dropout)
    if s.family == "dinov2":  # timm's own DINOv2 definition, at the shape's size and depth
        model = timm.create_model(
            "vit_base_patch14_dinov2",
            img_size=s.img_size,
            num_classes=NUM_CLASSES,
            depth=s.depth,
            **drops,
        )
    else:
        model = VisionTransformer(
            img_size=s.img_size,
            patch_size=s.patch_size,
            num_classes=NUM_CLASSES,
            embed_dim=s.width,
            depth=s.depth,
            num_heads=s.heads,
            mlp_ratio=s.mlp_dim / s.width,
            **drops,
        )
    fused = model.blocks[0].attn.fused_attn
    return model, model, "F.scaled_dot_product_attention" if fused else "explicit softmax"


def _torchvision(s: Shape, dropout: float):
    from torchvision.models.vision_transformer import VisionTransformer

    model = VisionTransformer(
        s.img_size,
        s.patch_size,
        s.depth,
        s.heads,
        s.width,
        s.mlp_dim,
        dropout=dropout,
        num_classes=NUM_CLASSES,
    )
    return model, model, "nn.MultiheadAttention"


def _transformers(s: Shape, dropout: float):
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        hidden_size=s.width,
        num_hidden_layers=s.depth,
        num_attention_heads=s.heads,
        intermediate_size=s.mlp_dim,
        image_size=s.img_size,
        patch_size=s.patch_size,
        num_labels=NUM_CLASSES,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=0.0,
    )
    model = ViTForImageClassification(config)
    attention = f"attn_implementation={model.config._attn_implementation}"
    return model, lambda images: model(pixel_values=images).logits, attention


def hidden_dropout_layers(model: nn.Module) -> list[nn.Dropout]:
    return [
        m
        for name, m in model.named_modules()
        if isinstance(m, nn.Dropout) and not name.endswith(NOT_HIDDEN_DROPOUT)
    ]


def set_dropout(model: nn.Module, rate: float) -> None:
    for layer in hidden_dropout_layers(model):
        layer.p = rate


def dropout_calls(model: nn.Module, forward, images: torch.Tensor) -> int:
    """How many times a training forward pass of one image applies hidden dropout (a layer may be called twice)."""
    calls = []
    hooks = [
        m.register_forward_hook(lambda *_: calls.append(1)) for m in hidden_dropout_layers(model)
    ]
    # vitlab's fused dropout draws inside the layer it follows, its module not called: counted on
    # the plain path, which calls each
    try:
        with patch.dict(os.environ, VITLAB_FASTPATHS="off"), torch.no_grad():
            forward(images[:1])
    finally:
        for hook in hooks:
            hook.remove()
    return len(calls)


# ---------------------------------------------------------------------------------------------
# One implementation at work


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Runner:
    """One implementation at one shape: its model, SGD optimizer and a fixed random batch on the device."""

    def __init__(
        self, impl: str, shape: Shape, device: torch.device, dropout: float, seed: int = 0
    ):
        torch.manual_seed(seed)
        self.model, self.forward, self.attention = build(impl, shape, dropout)
        self.model.to(device)
        self.device, self.dropout = device, dropout
        g = torch.Generator().manual_seed(seed)
        size = (shape.batch, 3, shape.img_size, shape.img_size)
        self.images = (torch.rand(size, generator=g) * 2 - 1).to(device)  # in [-1, 1]
        self.dropout_calls = dropout_calls(self.model.train(), self.forward, self.images)
        self.labels = torch.randint(0, NUM_CLASSES, (shape.batch,), generator=g).to(device)
        self.optimizer = torch.optim.SGD(
            self.model.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM
        )
        self.params = sum(p.numel() for p in self.model.parameters())

    def infer(self, precision: str) -> None:
        with torch.inference_mode(), autocast(self.device, precision):
            self.forward(self.images)

    def train_step(self, precision: str) -> None:
        with autocast(self.device, precision):
            logits = self.forward(self.images)
            loss = F.cross_entropy(logits.float(), self.labels)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def seconds(self, cell: str, iterations: int) -> float:
        """Wall time of `iterations` repetitions of a cell ("infer", "train" or "train+drop", then the
        precision), the device synchronised at both ends."""
        mode, precision = cell.split()
        self.model.train(mode != "infer")
        set_dropout(self.model, self.dropout if mode == "train+drop" else 0.0)
        run = self.infer if mode == "infer" else self.train_step
        synchronize(self.device)
        start = time.perf_counter()
        for _ in range(iterations):
            run(precision)
        synchronize(self.device)
        return time.perf_counter() - start

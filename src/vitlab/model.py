"""The Vision Transformer (Dosovitskiy et al., 2020) and its hybrid BiT ResNetV2 stem.

Written to match google-research/vision_transformer (`vit_jax/models_vit.py`,
`models_resnet.py`) exactly, so that its released `.npz` weights give its logits: pre-norm
blocks, LayerNorm eps 1e-6, tanh-approximated GELU, and for the hybrid weight-standardised
convolutions, GroupNorm eps 1e-6 and TensorFlow's 'SAME' padding. The few choices in which timm's
and transformers' ViTs compute otherwise (exact GELU, another LayerNorm eps, timm's fc_norm and its
hybrid's normalisation) are ModelConfig fields, so that their weights give their logits too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import ModelConfig, get_config
from .errors import DataError
from .fastpaths import fuse_linear_layers, use_explicit_attention


def _lecun_normal_(weight: torch.Tensor) -> None:
    # flax's default kernel init: truncated normal with variance 1 / fan_in.
    fan_in = weight[0].numel()
    std = math.sqrt(1.0 / fan_in) / 0.87962566103423978  # std of a unit normal truncated at 2
    nn.init.trunc_normal_(weight, std=std, a=-2 * std, b=2 * std)


def _factor(product: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(left, right), each (rank, D), with left.T @ right the best rank-`rank` approximation of
    `product` (D, D)."""
    U, S, Vh = torch.linalg.svd(product)
    root = S[:rank].sqrt()[:, None]
    return root * U[:, :rank].T, root * Vh[:rank]


@torch.no_grad()
def mimetic_init_(
    attention: Attention,
    qk: tuple[float, float] = (0.7, 0.7),
    vo: tuple[float, float] = (0.4, 0.4),
) -> None:
    """Mimetic initialisation (Trockman & Kolter, 2023, "Mimetic Initialization of Self-Attention
    Layers"): each head's query-key product W_q^T W_k = a Z + b I and the value-projection product
    W_v^T W_o = a Z - b I, with Z ~ N(0, 1/D) and (a, b) = `qk`, `vo` (the paper's 0.7, 0.7 and 0.4,
    0.4). Attention then starts out favouring tokens like the query, which with 2-D position
    embeddings means nearby patches: the local mixing a convolution has by design and a ViT
    otherwise spends many epochs learning."""
    D, heads = attention.proj.weight.shape[0], attention.num_heads
    eye = torch.eye(D)
    # Each (D, D): x @ w.T; rows of one head are contiguous
    w_q, w_k, w_v = attention.qkv.weight.chunk(3)
    for h in range(heads):
        rows = slice(h * attention.head_dim, (h + 1) * attention.head_dim)
        left, right = _factor(
            qk[0] * torch.randn(D, D) / math.sqrt(D) + qk[1] * eye, attention.head_dim
        )
        w_q[rows], w_k[rows] = left, right
    left, right = _factor(vo[0] * torch.randn(D, D) / math.sqrt(D) - vo[1] * eye, D)
    w_v.copy_(left)
    # proj computes y @ proj.weight.T, so W_v^T proj.weight^T = left^T right
    attention.proj.weight.copy_(right.T)


def sincos_2d(grid: int, width: int, temperature: float = 10_000.0) -> torch.Tensor:
    """(grid*grid, width) position table of big_vision's `posemb_sincos_2d`: sin and cos of x, then
    of y, each at width/4 frequencies from 1 down to 1/temperature."""
    y, x = torch.meshgrid(
        torch.arange(grid, dtype=torch.float64),
        torch.arange(grid, dtype=torch.float64),
        indexing="ij",
    )
    omega = 1.0 / temperature ** (
        torch.arange(width // 4, dtype=torch.float64) / max(1, width // 4 - 1)
    )
    x, y = x.flatten()[:, None] * omega, y.flatten()[:, None] * omega  # (grid*grid, width/4)
    return torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=1).float()


def _pad_same(x: torch.Tensor, kernel: int, stride: int, value: float = 0.0) -> torch.Tensor:
    """TensorFlow 'SAME' padding: output side ceil(side / stride), the odd pixel padded after."""
    pads = []
    for side in (x.shape[-1], x.shape[-2]):
        total = max((-(-side // stride) - 1) * stride + kernel - side, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads, value=value)


class StdConv2d(nn.Conv2d):
    """BiT's weight-standardised convolution, per output channel: (w - mean) / (std + 1e-5) in the
    official code (`norm="flax"`), (w - mean) / sqrt(var + 1e-8) in timm's hybrids
    (`norm="timm"`)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        norm: str = "flax",
    ):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding=0, bias=False)
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if self.norm == "timm":  # timm's own computation, for its rounding too
            w = F.batch_norm(
                w.reshape(1, w.shape[0], -1), None, None, training=True, momentum=0.0, eps=1e-8
            ).reshape_as(w)
        else:
            mean = w.mean(dim=(1, 2, 3), keepdim=True)
            std = w.std(dim=(1, 2, 3), keepdim=True, unbiased=False)
            w = (w - mean) / (std + 1e-5)
        x = _pad_same(x, self.kernel_size[0], self.stride[0])
        return F.conv2d(x, w, None, self.stride)


def _group_norm(channels: int, norm: str) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-5 if norm == "timm" else 1e-6)


class ResidualUnit(nn.Module):
    """Bottleneck unit of BiT's ResNetV2 as the ViT hybrid uses it (post-activation, GroupNorm)."""

    def __init__(self, in_channels: int, features: int, stride: int, norm: str = "flax"):
        super().__init__()
        out_channels = features * 4
        self.needs_projection = in_channels != out_channels or stride != 1
        if self.needs_projection:
            self.conv_proj = StdConv2d(in_channels, out_channels, 1, stride, norm)
            self.gn_proj = _group_norm(out_channels, norm)
        self.conv1 = StdConv2d(in_channels, features, 1, norm=norm)
        self.gn1 = _group_norm(features, norm)
        self.conv2 = StdConv2d(features, features, 3, stride, norm)
        self.gn2 = _group_norm(features, norm)
        self.conv3 = StdConv2d(features, out_channels, 1, norm=norm)
        self.gn3 = _group_norm(out_channels, norm)
        nn.init.zeros_(self.gn3.weight)  # each unit starts as the identity, as in the official init

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.gn_proj(self.conv_proj(x)) if self.needs_projection else x
        y = F.relu(self.gn1(self.conv1(x)))
        y = F.relu(self.gn2(self.conv2(y)))
        y = self.gn3(self.conv3(y))
        return F.relu(residual + y)


class ResNetStem(nn.Module):
    """Root (7x7 conv stride 2, GroupNorm, ReLU, 3x3 max-pool stride 2) and the ResNet stages."""

    def __init__(self, layers: tuple[int, ...], width_factor: int, norm: str = "flax"):
        super().__init__()
        width = 64 * width_factor
        self.conv_root = StdConv2d(3, width, 7, 2, norm)
        self.gn_root = _group_norm(width, norm)
        stages, in_channels = [], width
        for i, units in enumerate(layers):
            features = width * 2**i
            stage = nn.Sequential(
                *(
                    ResidualUnit(
                        in_channels if u == 0 else features * 4,
                        features,
                        2 if (u == 0 and i > 0) else 1,
                        norm,
                    )
                    for u in range(units)
                )
            )
            stages.append(stage)
            in_channels = features * 4
        self.stages = nn.Sequential(*stages)
        self.out_channels = in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.gn_root(self.conv_root(x)))
        # 'SAME': padding never wins the max
        x = F.max_pool2d(_pad_same(x, 3, 2, value=float("-inf")), 3, 2)
        return self.stages(x)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.hidden_size // config.num_heads
        # Query, key, value fused: one matmul
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.attention_dropout_rate = config.attention_dropout_rate
        self.attn_drop = nn.Dropout(config.attention_dropout_rate)
        self.impl = config.attention_impl

    def forward(
        self, x: torch.Tensor, need_weights: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, T, C = x.shape
        # (3, B, heads, T, head_dim)
        qkv = self.qkv(x).view(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        weights = None
        # The formula itself, where asked or faster here
        if need_weights or use_explicit_attention(q, self.impl):
            # (B, heads, T, T)
            weights = ((q * self.head_dim**-0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
            out = self.attn_drop(weights) @ v
        else:  # the same by torch's fused kernel
            dropout_p = self.attention_dropout_rate if self.training else 0.0
            # (B, heads, T, head_dim)
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
        return self.proj(out.transpose(1, 2).reshape(B, T, C)), weights if need_weights else None


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): OpenAI CLIP's approximation of the GELU, which its weights were trained
    with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def _gelu(form: str) -> nn.Module:
    if form == "quick":
        return QuickGELU()
    # tanh: flax's, the released weights'
    return nn.GELU(approximate="tanh" if form == "tanh" else "none")


class Mlp(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.mlp_dim)
        self.act = _gelu(config.gelu)
        self.fc2 = nn.Linear(config.mlp_dim, config.hidden_size)
        self.drop = nn.Dropout(config.dropout_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class SwiGLU(nn.Module):
    """The gated MLP of Shazeer (2020) as DINOv2 giant has it: fc1 gives two halves, SiLU of the
    first gates the second."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, 2 * config.mlp_dim)
        self.fc2 = nn.Linear(config.mlp_dim, config.hidden_size)
        self.drop = nn.Dropout(config.dropout_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.fc1(x).chunk(2, dim=-1)
        return self.drop(self.fc2(self.drop(F.silu(gate) * value)))


class LayerScale(nn.Module):
    """A learned per-channel factor on a residual branch (Touvron et al. 2021, CaiT)."""

    def __init__(self, width: int, init: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((width,), init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    def __init__(self, config: ModelConfig, drop_path_rate: float = 0.0):
        super().__init__()
        D, scale = config.hidden_size, config.layer_scale
        self.norm1 = nn.LayerNorm(D, eps=config.layer_norm_eps)
        self.attn = Attention(config)
        self.drop = nn.Dropout(config.dropout_rate)
        self.ls1 = LayerScale(D, scale) if scale else nn.Identity()
        self.norm2 = nn.LayerNorm(D, eps=config.layer_norm_eps)
        self.mlp = SwiGLU(config) if config.mlp == "swiglu" else Mlp(config)
        self.ls2 = LayerScale(D, scale) if scale else nn.Identity()
        self.drop_path = nn.Identity()
        if drop_path_rate > 0:
            # Imported here: torchvision adds 1.4 s to every command's start on a 2-core CPU.
            from torchvision.ops import StochasticDepth

            # Stochastic depth (Huang et al., 2016): a sample's whole residual branch dropped.
            self.drop_path = StochasticDepth(drop_path_rate, "row")

    def forward(
        self, x: torch.Tensor, need_weights: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        y, weights = self.attn(self.norm1(x), need_weights)
        x = x + self.drop_path(self.ls1(self.drop(y)))
        x = x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))
        return x, weights


class AttentionPool(nn.Module):
    """Multihead attention pooling (MAP; Lee et al. 2019, big_vision's MAPHead, SigLIP's): a learned
    query attends over the tokens, then a residual MLP, as a block without its first norm."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        D = config.hidden_size
        self.num_heads, self.head_dim = config.num_heads, D // config.num_heads
        self.latent = nn.Parameter(torch.zeros(1, 1, D))
        self.q = nn.Linear(D, D)
        self.kv = nn.Linear(D, 2 * D)
        self.proj = nn.Linear(D, D)
        self.norm = nn.LayerNorm(D, eps=config.layer_norm_eps)
        # big_vision's MAPHead: no dropout in its MLP
        plain = config.replace(dropout_rate=0.0)
        self.mlp = SwiGLU(plain) if config.mlp == "swiglu" else Mlp(plain)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        # (B, heads, 1, head_dim)
        q = self.q(self.latent).expand(B, -1, -1).view(B, 1, self.num_heads, -1).transpose(1, 2)
        # (2, B, heads, T, head_dim)
        kv = self.kv(x).view(B, T, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, kv[0], kv[1]).transpose(1, 2).reshape(B, 1, D)
        y = self.proj(y)
        return (y + self.mlp(self.norm(y)))[:, 0]  # (B, D)


class VisionTransformer(nn.Module):
    """Images (B, 3, H, W), normalised as `config.image_mean` and `image_std` say ([-1, 1] for the
    official weights), to logits (B, num_classes).

    `model(x, return_attention=True)` computes the softmax explicitly and also returns every
    layer's attention weights, a list of (B, heads, tokens, tokens); the logits are the same.
    `forward_features` and `forward_intermediates` give the tokens, `forward_head` the logits of
    tokens: what a probe, a k-NN or a dense head needs.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        D = config.hidden_size
        self.stem = (
            ResNetStem(config.resnet_layers, config.resnet_width_factor, config.stem_norm)
            if config.is_hybrid
            else nn.Identity()
        )
        in_channels = self.stem.out_channels if config.is_hybrid else 3
        kernel = config.patch_size // config.stem_stride
        self.patch_embed = nn.Conv2d(in_channels, D, kernel, kernel, bias=config.patch_bias)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D)) if config.has_class_token else None
        self.pos_embed = nn.Parameter(torch.empty(1, config.num_positions, D))
        self.pos_drop = nn.Dropout(config.dropout_rate)
        # Stochastic depth grows linearly with depth, 0 at the first block (DeiT; timm's
        # drop_path_rate)
        rates = [config.drop_path_rate * i / max(1, config.depth - 1) for i in range(config.depth)]
        self.blocks = nn.ModuleList(Block(config, rate) for rate in rates)
        # recompute each block in the backward instead of keeping its activations
        self.grad_checkpointing = False
        # Flax's 1e-6; torch's 1e-5 moves B/16 logits by about 2e-3
        self.norm = nn.LayerNorm(D, eps=config.layer_norm_eps)
        self.norm_tokens = config.final_norm == "before_pool"
        pooled = 2 * D if config.classifier == "token_gap" else D
        if config.representation_size:
            self.pre_logits = nn.Sequential(
                nn.Linear(pooled, config.representation_size), nn.Tanh()
            )
        else:
            self.pre_logits = nn.Identity()
        self.head = nn.Linear(config.representation_size or pooled, config.num_classes)
        self._add_options(config, pooled)
        self.reset_parameters()
        # The CPU fast paths (fastpaths.py): the same parameters, the same results
        fuse_linear_layers(self.blocks)

    def _add_options(self, config: ModelConfig, pooled: int) -> None:
        """The parts later ViTs added, each None (or the identity) where the config leaves it out:
        DeiT's distillation token and head, registers, CLIP's norm before the blocks, SigLIP's
        attention pooling."""
        D = config.hidden_size
        self.dist_token = nn.Parameter(torch.zeros(1, 1, D)) if config.distilled else None
        self.reg_token = (
            nn.Parameter(torch.zeros(1, config.reg_tokens, D)) if config.reg_tokens else None
        )
        self.norm_pre = (
            nn.LayerNorm(D, eps=config.layer_norm_eps) if config.pre_norm else nn.Identity()
        )
        self.attn_pool = AttentionPool(config) if config.classifier == "map" else None
        self.head_dist = (
            nn.Linear(config.representation_size or pooled, config.num_classes)
            if config.distilled
            else None
        )

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The official initialisation (flax defaults of `models_vit.py`); the head starts at
        zero."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                _lecun_normal_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for block in self.blocks:
            qkv = block.attn.qkv
            for part in qkv.weight.chunk(3):  # xavier per projection, as three separate kernels
                nn.init.xavier_uniform_(part)
            nn.init.zeros_(qkv.bias)
            nn.init.xavier_uniform_(block.attn.proj.weight)
            nn.init.zeros_(block.attn.proj.bias)
            if self.config.attention_init == "mimetic":
                mimetic_init_(block.attn)
            for fc in (block.mlp.fc1, block.mlp.fc2):
                nn.init.xavier_uniform_(fc.weight)
                nn.init.normal_(fc.bias, std=1e-6)
        if self.config.pos_embed_init == "sincos2d":
            self.pos_embed.zero_()  # the prefix tokens' positions stay zero
            self.pos_embed[0, self.config.num_positions - self.config.grid_size**2 :] = sincos_2d(
                self.config.grid_size, self.config.hidden_size
            )
        else:
            nn.init.normal_(self.pos_embed, std=0.02)
        if isinstance(self.pre_logits, nn.Sequential):
            _lecun_normal_(self.pre_logits[0].weight)
            nn.init.zeros_(self.pre_logits[0].bias)
        for head in (self.head, self.head_dist):
            if head is not None:
                nn.init.zeros_(head.weight)
                nn.init.zeros_(head.bias)
        # The later options, as timm initialises them
        for token in (self.dist_token, self.reg_token):
            if token is not None:
                nn.init.trunc_normal_(token, std=0.02)
        if self.attn_pool is not None:
            nn.init.trunc_normal_(self.attn_pool.latent, std=self.config.hidden_size**-0.5)

    def prefix_tokens(self, batch: int, dtype: torch.dtype) -> list[torch.Tensor]:
        """The tokens before the patches, each (batch, n, D): class, distillation, registers."""
        tokens = (self.cls_token, self.dist_token, self.reg_token)
        return [t.to(dtype).expand(batch, -1, -1) for t in tokens if t is not None]

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-2:] != (self.config.img_size, self.config.img_size):
            raise DataError(
                f"input of {tuple(images.shape[-2:])} px; this model was built for "
                f"{self.config.img_size}x{self.config.img_size} px"
            )
        x = self.patch_embed(self.stem(images))  # (B, D, grid, grid)
        x = x.flatten(2).transpose(1, 2)  # (B, grid*grid, D)
        # Under bf16 autocast the patch embedding is bf16, and so stays the residual stream: an fp32
        # stream would be cast to bf16 before every matmul and back after, forward and backward.
        # fp16's narrow range keeps fp32.
        x = x.to(torch.bfloat16 if x.dtype == torch.bfloat16 else self.pos_embed.dtype)
        prefix, pos_embed = self.prefix_tokens(x.shape[0], x.dtype), self.pos_embed.to(x.dtype)
        if self.config.pos_embed_prefix:  # (B, tokens, D)
            x = torch.cat([*prefix, x], dim=1) + pos_embed
        else:  # the patches' positions only
            x = torch.cat([*prefix, x + pos_embed], dim=1)
        if self.training and self.config.patch_drop_rate > 0:
            x = self.drop_patches(x)
        return self.norm_pre(self.pos_drop(x))

    def drop_patches(self, x: torch.Tensor) -> torch.Tensor:
        """A random share of each image's patch tokens, positions already added; the prefix tokens
        are always kept. PatchDropout (Liu et al., 2022): a training step costs about that share of
        a full one."""
        prefix = self.config.num_prefix_tokens
        B, N, D = x.shape[0], x.shape[1] - prefix, x.shape[2]
        keep = max(1, round(N * (1 - self.config.patch_drop_rate)))
        index = torch.rand(B, N, device=x.device).argsort(dim=1)[:, :keep] + prefix  # (B, keep)
        if prefix:
            kept = torch.arange(prefix, device=x.device).expand(B, -1)
            index = torch.cat([kept, index], dim=1)
        return x.gather(1, index[..., None].expand(-1, -1, D))

    def encode(
        self, images: torch.Tensor, return_attention: bool = False
    ) -> tuple[torch.Tensor, list]:
        """The tokens (B, tokens, D) after the last block (before the final norm), and each block's
        attention weights (None unless asked for)."""
        x = self.embed(images)
        attention = []
        for block in self.blocks:
            if (
                self.grad_checkpointing
                and self.training
                and torch.is_grad_enabled()
                and not return_attention
            ):
                # The RNG state is replayed: same dropout masks
                x, weights = checkpoint(block, x, use_reentrant=False)
            else:
                x, weights = block(x, need_weights=return_attention)
            attention.append(weights)
        return x, attention

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """The token sequence (B, tokens, D) after the final norm (prefix tokens first: class,
        distillation, registers), or before it where the norm follows the pooling (timm's
        fc_norm)."""
        x, _ = self.encode(images)
        return self.norm(x) if self.norm_tokens else x

    def forward_intermediates(
        self, images: torch.Tensor, layers: int | Sequence[int] = 1, norm: bool = True
    ) -> list[torch.Tensor]:
        """The token sequences (B, tokens, D) that blocks `layers` put out (0-based, or an int n:
        the last n), each through the final norm if `norm`: DINOv2's get_intermediate_layers."""
        depth = self.config.depth
        wanted = range(depth - layers, depth) if isinstance(layers, int) else layers
        if not all(-depth <= i < depth for i in wanted):
            raise ValueError(f"layers {list(wanted)}: the model has blocks 0 to {depth - 1}")
        wanted = {i % depth for i in wanted}
        x, out = self.embed(images), []
        for i, block in enumerate(self.blocks[: max(wanted) + 1]):
            x, _ = block(x)
            if i in wanted:
                out.append(self.norm(x) if norm else x)
        return out

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, tokens, D) -> the head's input (B, D), or (B, 2D) for token_gap."""
        classifier, patches = self.config.classifier, tokens[:, self.config.num_prefix_tokens :]
        if classifier == "map":
            x = self.attn_pool(patches)
        elif classifier == "gap":
            x = patches.mean(dim=1)
        elif classifier == "token_gap":
            x = torch.cat([tokens[:, 0], patches.mean(dim=1)], dim=-1)
        else:
            x = tokens[:, 0]
        return x if self.norm_tokens else self.norm(x)  # timm's fc_norm

    def forward_head(self, tokens: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Logits of `forward_features`' tokens; with `pre_logits`, the vector the head reads."""
        x = self.pre_logits(self.pool(tokens))
        if self.head_dist is None:
            return x if pre_logits else self.head(x)
        # DeiT: the distillation token's own head, the two averaged
        dist = tokens[:, 1] if self.norm_tokens else self.norm(tokens[:, 1])
        dist = self.pre_logits(dist)
        return (x + dist) / 2 if pre_logits else (self.head(x) + self.head_dist(dist)) / 2

    def forward(self, images: torch.Tensor, return_attention: bool = False):
        x, attention = self.encode(images, return_attention)
        logits = self.forward_head(self.norm(x) if self.norm_tokens else x)
        return (logits, attention) if return_attention else logits


def create_model(name: str | ModelConfig = "B/16", **overrides) -> VisionTransformer:
    """Build a variant by either spelling, any field overridden:
    `create_model("ViT-B_16", num_classes=10, img_size=224)`, `create_model("Ti/16", patch_size=4,
    img_size=32)`.
    """
    config = (
        name.replace(**overrides)
        if isinstance(name, ModelConfig)
        else get_config(name, **overrides)
    )
    return VisionTransformer(config)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

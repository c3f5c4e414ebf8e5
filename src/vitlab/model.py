"""The Vision Transformer (Dosovitskiy et al., 2020), and the parts later ViTs added to it.

Written to match google-research/vision_transformer (`vit_jax/models_vit.py`) exactly, so that its
released `.npz` weights give its logits: pre-norm blocks, LayerNorm eps 1e-6, tanh-approximated GELU
(the hybrid's ResNet stem is in `resnet.py`, the initialisations in `initialization.py`). What later
ViTs compute otherwise (DINOv2's layer scale and registers, CLIP's norm before the blocks, SigLIP's
attention pooling, DeiT's distillation token, timm's fc_norm, another GELU or LayerNorm eps) are
ModelConfig fields, each off by default, so that their weights give their logits too.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import ModelConfig, get_config
from .dropout import use_sparse_dropout
from .errors import DataError
from .fastpaths import fuse_linear_layers, use_explicit_attention
from .initialization import lecun_normal_, mimetic_init_, sincos_2d
from .resnet import ResNetStem


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
        # DeiT's training with a teacher (distillation.py): in training, the class and distillation
        # heads' logits apart, (cls, dist); an attribute, so that DDP's and compile's forward keep it
        self.heads_apart = False
        # Flax's 1e-6; torch's 1e-5 moves B/16 logits by about 2e-3
        self.norm = nn.LayerNorm(D, eps=config.layer_norm_eps)
        self.norm_tokens = config.final_norm == "before_pool"
        pooled = config.pooled_width
        if config.representation_size:
            self.pre_logits = nn.Sequential(
                nn.Linear(pooled, config.representation_size), nn.Tanh()
            )
        else:
            self.pre_logits = nn.Identity()
        self.head = nn.Linear(config.representation_size or pooled, config.num_classes)
        self._add_options(config, pooled)
        self.reset_parameters()
        # The CPU fast paths (fastpaths.py, dropout.py): the same parameters, the same results
        fuse_linear_layers(self.blocks)
        use_sparse_dropout(self)

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
                lecun_normal_(module.weight)
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
            lecun_normal_(self.pre_logits[0].weight)
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
    ) -> tuple[list[torch.Tensor], list]:
        """The tokens (B, tokens, D) of the last `pool_blocks` blocks (before the final norm), the
        last block's last, and each block's attention weights (None unless asked for)."""
        x = self.embed(images)
        attention, outputs = [], []
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
            outputs = [*outputs, x][-self.config.pool_blocks :]
        return outputs, attention

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """The token sequence (B, tokens, D) after the final norm (prefix tokens first: class,
        distillation, registers), or before it where the norm follows the pooling (timm's
        fc_norm)."""
        return self._normed(self.encode(images)[0])[-1]

    def _normed(self, blocks: list[torch.Tensor]) -> list[torch.Tensor]:
        return [self.norm(x) for x in blocks] if self.norm_tokens else blocks

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

    def pool(self, tokens: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """The last block's tokens (B, tokens, D), or the last `pool_blocks` blocks' in order, ->
        the head's input (B, pooled_width): the class token, the patches' mean, both, or attention
        pooling, of each block the head reads."""
        blocks = tokens if isinstance(tokens, list) else [tokens]
        if len(blocks) != self.config.pool_blocks:
            raise ValueError(f"the head reads the last {self.config.pool_blocks} blocks' tokens")
        classifier, prefix = self.config.classifier, self.config.num_prefix_tokens
        if classifier == "map":
            x = self.attn_pool(blocks[-1][:, prefix:])
        else:
            parts = [b[:, prefix:].mean(dim=1) if classifier == "gap" else b[:, 0] for b in blocks]
            if classifier == "token_gap":  # DINOv2's: the last block's patch mean beside them
                parts.append(blocks[-1][:, prefix:].mean(dim=1))
            x = torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]
        return x if self.norm_tokens else self.norm(x)  # timm's fc_norm

    def forward_head(
        self, tokens: torch.Tensor | list[torch.Tensor], pre_logits: bool = False
    ) -> torch.Tensor:
        """Logits of `forward_features`' tokens (or of the last `pool_blocks` blocks' tokens, each
        normed); with `pre_logits`, the vector the head reads."""
        x = self.pre_logits(self.pool(tokens))
        if self.head_dist is None:
            return x if pre_logits else self.head(x)
        # DeiT: the distillation token's own head, the two averaged
        dist = tokens[:, 1] if self.norm_tokens else self.norm(tokens[:, 1])
        dist = self.pre_logits(dist)
        if pre_logits:
            return (x + dist) / 2
        if self.heads_apart and self.training:
            return self.head(x), self.head_dist(dist)
        return (self.head(x) + self.head_dist(dist)) / 2

    def forward(
        self, images: torch.Tensor, return_attention: bool = False, pre_logits: bool = False
    ):
        """Logits (B, num_classes), or with `pre_logits` the vector the head reads: a frozen
        feature; a DeiT model training with `heads_apart`, its two heads' logits (cls, dist)."""
        blocks, attention = self.encode(images, return_attention)
        normed = self._normed(blocks)
        out = self.forward_head(normed if len(normed) > 1 else normed[0], pre_logits=pre_logits)
        return (out, attention) if return_attention else out


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

"""Modality stems and the transformer trunk they feed.

A model is stems + trunks: CLIP gives each modality its own trunk, SharedCLIP gives both the same one
(seeds/001 section 3.1, Figure 2). The trunk is timm's pre-norm ``Block`` (scaled-dot-product attention, so flash
kernels on H100), a final LayerNorm and a bias-free projection.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch.utils.checkpoint import checkpoint


class ImageStem(nn.Module):
    """Patch embedding (a bias-free conv, as CLIP), class token, positional embedding and CLIP's pre-norm."""

    def __init__(self, image_size: int, patch_size: int, width: int):
        super().__init__()
        self.patch_size = patch_size
        self.grid = image_size // patch_size
        self.patch_embed = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.class_token = nn.Parameter(torch.zeros(width))
        self.pos_embed = nn.Parameter(torch.zeros(self.grid * self.grid + 1, width))
        self.norm_pre = nn.LayerNorm(width)

    def init_weights(self) -> None:
        scale = self.class_token.shape[0] ** -0.5
        nn.init.normal_(self.class_token, std=scale)
        nn.init.normal_(self.pos_embed, std=scale)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-1] != self.grid * self.patch_size or images.shape[-2] != self.grid * self.patch_size:
            raise ValueError(f"expected images of {self.grid * self.patch_size} px, got {tuple(images.shape[-2:])}")
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # [b, grid^2, width]
        cls = self.class_token.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed.to(x.dtype)
        return self.norm_pre(x)


class TextStem(nn.Module):
    """Token and positional embeddings."""

    def __init__(self, vocab_size: int, context_length: int, width: int):
        super().__init__()
        self.context_length = context_length
        self.token_embed = nn.Embedding(vocab_size, width)
        self.pos_embed = nn.Parameter(torch.zeros(context_length, width))

    def init_weights(self) -> None:
        nn.init.normal_(self.token_embed.weight, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.01)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.shape[1] != self.context_length:
            raise ValueError(f"expected token rows of length {self.context_length}, got {tokens.shape[1]}")
        return self.token_embed(tokens) + self.pos_embed


class Trunk(nn.Module):
    """``layers`` pre-norm blocks, a final LayerNorm and a bias-free projection to the joint embedding."""

    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float, embed_dim: int):
        super().__init__()
        self.blocks = nn.ModuleList(
            [Block(width, heads, mlp_ratio=mlp_ratio, qkv_bias=True, act_layer=nn.GELU) for _ in range(layers)])
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, embed_dim, bias=False)
        self.grad_checkpointing = False

    def init_weights(self) -> None:
        """CLIP's initialisation: residual projections scaled down with depth."""
        width, layers = self.norm.normalized_shape[0], len(self.blocks)
        attn_std = width ** -0.5
        proj_std = attn_std * (2 * layers) ** -0.5
        fc_std = (2 * width) ** -0.5
        for block in self.blocks:
            nn.init.normal_(block.attn.qkv.weight, std=attn_std)
            nn.init.normal_(block.attn.proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.fc1.weight, std=fc_std)
            nn.init.normal_(block.mlp.fc2.weight, std=proj_std)
            for lin in (block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2):
                nn.init.zeros_(lin.bias)
        nn.init.normal_(self.proj.weight, std=attn_std)

    def forward(self, x: torch.Tensor, pool_index: torch.Tensor | None, causal: bool) -> torch.Tensor:
        """Tokens [b, n, width] -> pooled, projected [b, embed_dim].

        ``pool_index`` picks one position per row (the end-of-text token); None takes position 0 (class token).
        """
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, None, causal, use_reentrant=False)
            else:
                x = block(x, is_causal=causal)
        pooled = x[:, 0] if pool_index is None else x[torch.arange(x.shape[0], device=x.device), pool_index]
        return self.proj(self.norm(pooled))


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1)

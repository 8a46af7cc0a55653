"""Modality stems and the transformer trunk they feed.

A model is stems + trunks: CLIP gives each modality its own trunk, SharedCLIP gives both the same one
(Eslami & de Melo, ICLR 2025, arXiv 2406.17639, section 3.1, Figure 2). The trunk is timm's pre-norm ``Block``
(scaled-dot-product attention, so flash kernels on H100), a final LayerNorm and a bias-free projection. Every
LayerNorm takes the model's one ``eps`` (``model.norm_eps``), as in OpenCLIP and Hugging Face CLIP, so the exports
(alignclip.export) reproduce our embeddings exactly. With ``pooled_last_block`` on, the trunk's last
block is evaluated at the pooled position of each sequence only (``pooled_block``), the one row the trunk returns.
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch.utils.checkpoint import checkpoint

from alignclip.models.stems import build_stem


def conv_stem_channels(patch_size: int, last: int) -> list[int]:
    """Channels of the convolutional stem (alignclip.models.stems.conv_stem) from the image's 3 up: one 3x3
    stride-2 conv per halving (patch 8: three) ending at ``last`` and halving backwards, at least 8 (last 128:
    3 -> 32 -> 64 -> 128)."""
    halvings = patch_size.bit_length() - 1
    return [3] + [max(8, last >> (halvings - 1 - i)) for i in range(halvings)]


class ImageStem(nn.Module):
    """Patch embedding (a bias-free conv, as CLIP, or one of alignclip.models.stems), class token, positional
    embedding and CLIP's pre-norm."""

    def __init__(self, image_size: int, patch_size: int, width: int, eps: float = 1e-5, stem: str = "patch",
                 stem_channels: int = 0):
        super().__init__()
        self.patch_size = patch_size
        self.grid = image_size // patch_size
        if stem == "conv":
            self.patch_embed = build_stem(stem, patch_size, width,
                                          conv_stem_channels(patch_size, stem_channels or width))
        elif stem == "hybrid":
            self.patch_embed = build_stem(stem, patch_size, width)
        elif stem == "patch":
            self.patch_embed = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        else:
            raise ValueError(f"model.vision.stem must be 'patch', 'conv' or 'hybrid', got {stem!r}")
        self.class_token = nn.Parameter(torch.zeros(width))
        self.pos_embed = nn.Parameter(torch.zeros(self.grid * self.grid + 1, width))
        self.norm_pre = nn.LayerNorm(width, eps=eps)

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


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the GELU approximation OpenAI's CLIP was trained with (Radford et al. 2021)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"gelu": nn.GELU, "quick_gelu": QuickGELU}


class Trunk(nn.Module):
    """``layers`` pre-norm blocks, a final LayerNorm and a bias-free projection to the joint embedding."""

    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float, embed_dim: int,
                 block_eps: float = 1e-5, final_eps: float = 1e-5, act: str = "gelu"):
        super().__init__()
        block_norm = functools.partial(nn.LayerNorm, eps=block_eps)
        self.blocks = nn.ModuleList([Block(width, heads, mlp_ratio=mlp_ratio, qkv_bias=True,
                                           act_layer=ACTIVATIONS[act], norm_layer=block_norm)
                                     for _ in range(layers)])
        self.norm = nn.LayerNorm(width, eps=final_eps)
        self.proj = nn.Linear(width, embed_dim, bias=False)
        self.grad_checkpointing = False
        self.pooled_last_block = False  # build_model sets it from model.pooled_last_block (on by default)

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
        With ``pooled_last_block``, the last block runs at the pooled positions only (``pooled_block``): the same
        values and gradients without the rows nothing reads (forward hooks on that block then do not fire).
        """
        pooled_last = self.pooled_last_block and len(self.blocks) > 0
        blocks = self.blocks[:-1] if pooled_last else self.blocks
        for block in blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, None, causal, use_reentrant=False)
            else:
                x = block(x, is_causal=causal)
        rows = torch.arange(x.shape[0], device=x.device)
        index = torch.zeros_like(rows) if pool_index is None else pool_index
        if pooled_last:
            if self.grad_checkpointing and torch.is_grad_enabled():
                pooled = checkpoint(pooled_block, self.blocks[-1], x, index, causal, use_reentrant=False)
            else:
                pooled = pooled_block(self.blocks[-1], x, index, causal)
        else:
            pooled = x[rows, index]
        return self.proj(self.norm(pooled))


def pooled_block(block: Block, x: torch.Tensor, index: torch.Tensor, causal: bool) -> torch.Tensor:
    """``block(x, is_causal=causal)[rows, index]`` -> [b, width], computing only that row of each sequence.

    Keys and values come from every position (a causal query at ``index`` sees positions <= ``index``); the
    query, the attention output projection and the MLP run on one position per sequence instead of n. In the last
    block of a trunk that is all the pooled output reads: a 4-block tower skips about a fifth of its linear FLOPs
    (forward and backward), a 12-block one about 7 %.
    """
    attn = block.attn
    b, n, _ = x.shape
    rows = torch.arange(b, device=x.device)
    heads, head_dim, inner = attn.num_heads, attn.head_dim, attn.attn_dim
    h = block.norm1(x)
    q_weight, kv_weight = attn.qkv.weight.split([inner, 2 * inner])
    q_bias, kv_bias = attn.qkv.bias.split([inner, 2 * inner]) if attn.qkv.bias is not None else (None, None)
    k, v = F.linear(h, kv_weight, kv_bias).reshape(b, n, 2, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q = F.linear(h[rows, index], q_weight, q_bias).reshape(b, heads, 1, head_dim)
    q, k = attn.q_norm(q), attn.k_norm(k)
    mask = None
    if causal:  # [b, 1, 1, n]: the query at ``index`` attends to positions 0 .. index
        mask = (torch.arange(n, device=x.device) <= index[:, None])[:, None, None, :]
    if attn.fused_attn:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    else:  # timm's explicit path (fast_path.sdpa=false)
        scores = (q * attn.scale) @ k.transpose(-2, -1)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        out = scores.softmax(dim=-1) @ v
    out = attn.proj(attn.norm(out.reshape(b, inner)))
    y = x[rows, index] + block.drop_path1(block.ls1(attn.proj_drop(out)))
    return y + block.drop_path2(block.ls2(block.mlp(block.norm2(y))))


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1)

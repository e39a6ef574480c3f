"""A tiny ViT-style image encoder (Dosovitskiy et al., *An Image is Worth 16x16 Words*, ICLR 2021,
arXiv:2010.11929) with explicit ``nn.Linear`` projections (``blocks.0.attn.qkv``, ``blocks.0.mlp.fc1``, ...)
so adapter techniques can target them by name."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # (N, h, T, d/h) each
        out = nn.functional.scaled_dot_product_attention(q, k, v)  # (N, h, T, d/h)
        return self.proj(out.transpose(1, 2).reshape(n, t, d))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer encoder block."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, mlp_ratio * dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))  # (N, T, dim)


class TinyTransformer(nn.Module):
    """Patch embedding, ``depth`` encoder blocks, mean-pooled tokens, a linear head.

    Args:
        num_classes: classifier outputs.
        in_channels: input channels.
        image_size: input size (square); must be divisible by ``patch``.
        patch: patch size.
        dim, depth, heads, mlp_ratio: encoder shape.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 28, patch: int = 4,
                 dim: int = 64, depth: int = 2, heads: int = 4, mlp_ratio: int = 2) -> None:
        super().__init__()
        if image_size % patch:
            raise ValueError(f"image_size {image_size} is not divisible by patch {patch}")
        self.patch_embed = nn.Conv2d(in_channels, dim, patch, patch)
        self.pos = nn.Parameter(torch.zeros(1, (image_size // patch) ** 2, dim))
        nn.init.trunc_normal_(self.pos, std=0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        self.block_names = [f"blocks.{i}" for i in range(depth)]
        self.classifier_name = "head"
        self.default_input_size = image_size
        self.in_channels = in_channels  # with default_input_size: the example input edgetrain probes

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos  # (N, T, dim)
        return self.head(self.norm(self.blocks(x)).mean(1))  # (N, num_classes)

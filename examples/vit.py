"""Vision Transformer in the timm / torchvision style, small enough for CPU tests.

Patch embedding by a strided convolution, a class token and learned position
embedding, pre-norm blocks ``x = x + attn(norm1(x))`` and ``x = x + mlp(norm2(x))``,
a final LayerNorm and a linear head on the class token. Attention is written
out (``qkv`` Linear or separate ``q/k/v`` Linears, explicit matmul and softmax,
``proj``) so that q, k, v and the attention probabilities are ordinary saved
tensors the converter can see.

Input: one float image batch of shape ``(batch, in_channels, image_size, image_size)``.
Output: class logits of shape ``(batch, num_classes)``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from examples._common import image_inputs, logits_shape


@dataclass(frozen=True)
class ViTConfig:
    """Sizes of a ViT; ``fused_qkv`` picks one ``qkv`` Linear (timm) over ``q``/``k``/``v`` Linears."""

    image_size: int = 32  # pixels per side
    patch_size: int = 4  # pixels per patch side
    in_channels: int = 3
    num_classes: int = 10
    dim: int = 64  # embedding width per token
    depth: int = 4  # number of blocks
    num_heads: int = 4
    mlp_ratio: float = 2.0  # hidden width of the MLP relative to dim
    dropout: float = 0.1  # probability, used after attention probabilities, projections and MLP
    fused_qkv: bool = True

    def __post_init__(self) -> None:
        for name in ("image_size", "patch_size", "in_channels", "num_classes", "dim", "depth", "num_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"ViTConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"ViTConfig.image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})"
            )
        if self.dim % self.num_heads:
            raise ValueError(f"ViTConfig.dim ({self.dim}) must be a multiple of num_heads ({self.num_heads})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"ViTConfig.dropout must be a probability in [0, 1), got {self.dropout}")
        if self.mlp_ratio <= 0:
            raise ValueError(f"ViTConfig.mlp_ratio must be > 0, got {self.mlp_ratio}")


CONFIG = ViTConfig()


class PatchEmbed(nn.Module):
    """Cut the image into non-overlapping patches and project each to ``dim`` (one strided conv)."""

    def __init__(self, patch_size: int, in_channels: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj(x)  # (batch, dim, rows, cols)
        return x.flatten(2).transpose(1, 2)  # (batch, patches, dim)


class Attention(nn.Module):
    """Multi-head self-attention with explicit scores, softmax and weighted sum."""

    def __init__(self, dim: int, num_heads: int, dropout: float, fused_qkv: bool):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.fused_qkv = fused_qkv
        if fused_qkv:
            self.qkv = nn.Linear(dim, dim * 3)
        else:
            self.q = nn.Linear(dim, dim)
            self.k = nn.Linear(dim, dim)
            self.v = nn.Linear(dim, dim)
        self.attn_drop = nn.Dropout(dropout)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(dropout)

    def split_heads(self, x: Tensor) -> Tensor:
        """(batch, tokens, dim) -> (batch, heads, tokens, head_dim)."""
        return x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

    def forward(self, x: Tensor) -> Tensor:
        if self.fused_qkv:
            q, k, v = self.qkv(x).chunk(3, dim=-1)
        else:
            q, k, v = self.q(x), self.k(x), self.v(x)
        q, k, v = self.split_heads(q), self.split_heads(k), self.split_heads(v)

        attn = (q * self.scale) @ k.transpose(-2, -1)
        attn = attn.softmax(dim=-1)
        attn = self.attn_drop(attn)
        x = attn @ v

        x = x.transpose(1, 2).flatten(2)  # (batch, tokens, dim)
        x = self.proj(x)
        x = self.proj_drop(x)
        return x


class Mlp(nn.Module):
    """fc1, GELU, dropout, fc2, dropout."""

    def __init__(self, dim: int, hidden_dim: int, dropout: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop2 = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = self.fc1(x)
        x = self.act(x)
        x = self.drop1(x)
        x = self.fc2(x)
        x = self.drop2(x)
        return x


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, dropout: float, fused_qkv: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, dropout, fused_qkv)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return x


class VisionTransformer(nn.Module):
    """Patch embedding, class token, position embedding, blocks, final norm, head on the class token."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        num_patches = (config.image_size // config.patch_size) ** 2
        self.patch_embed = PatchEmbed(config.patch_size, config.in_channels, config.dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, config.dim))
        self.pos_drop = nn.Dropout(config.dropout)
        self.blocks = nn.Sequential(*[
            Block(config.dim, config.num_heads, config.mlp_ratio, config.dropout, config.fused_qkv)
            for _ in range(config.depth)
        ])
        self.norm = nn.LayerNorm(config.dim)
        self.head = nn.Linear(config.dim, config.num_classes)

        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x)
        cls_token = self.cls_token.expand(x.size(0), -1, -1)
        x = torch.cat((cls_token, x), dim=1)
        x = self.pos_drop(x + self.pos_embed)
        x = self.blocks(x)
        x = self.norm(x)
        return self.head(x[:, 0])


def build_model(**overrides) -> VisionTransformer:
    """ViT from ``CONFIG`` with ``overrides`` (any ViTConfig field) applied."""
    return VisionTransformer(dataclasses.replace(CONFIG, **overrides))


example_inputs = image_inputs(CONFIG)
output_shape = logits_shape(CONFIG, "num_classes")


# Per-sample shape of the default input (channels, height, width); the batch dimension comes first.
input_shape = (CONFIG.in_channels, CONFIG.image_size, CONFIG.image_size)

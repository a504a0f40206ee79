"""MLP-Mixer in the timm style, small enough for CPU tests.

Patch embedding by a strided convolution, then blocks of two pre-norm residual
MLPs: token mixing across patches (on the transposed activations) and channel
mixing across features, each ``fc1 -> GELU -> dropout -> fc2 -> dropout``;
final LayerNorm, mean over patches, linear head.

Input: one float image batch of shape ``(batch, in_channels, image_size, image_size)``.
Output: class logits of shape ``(batch, num_classes)``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from torch import Tensor, nn

from examples._common import image_inputs, logits_shape


@dataclass(frozen=True)
class MixerConfig:
    """Sizes of the Mixer; hidden widths of the two MLPs are given in features."""

    image_size: int = 32  # pixels per side
    patch_size: int = 4  # pixels per patch side
    in_channels: int = 3
    num_classes: int = 10
    dim: int = 64  # features per patch
    depth: int = 4  # number of blocks
    tokens_hidden_dim: int = 32  # hidden width of the token-mixing MLP
    channels_hidden_dim: int = 128  # hidden width of the channel-mixing MLP
    dropout: float = 0.1  # probability, after GELU and after fc2 in both MLPs

    def __post_init__(self) -> None:
        for name in ("image_size", "patch_size", "in_channels", "num_classes", "dim", "depth",
                     "tokens_hidden_dim", "channels_hidden_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"MixerConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.image_size % self.patch_size:
            raise ValueError(f"MixerConfig.image_size ({self.image_size}) must be a multiple of "
                             f"patch_size ({self.patch_size})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"MixerConfig.dropout must be a probability in [0, 1), got {self.dropout}")


CONFIG = MixerConfig()


class PatchEmbed(nn.Module):
    """Cut the image into non-overlapping patches and project each to ``dim`` (one strided conv)."""

    def __init__(self, patch_size: int, in_channels: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj(x)  # (batch, dim, rows, cols)
        return x.flatten(2).transpose(1, 2)  # (batch, patches, dim)


class Mlp(nn.Module):
    """fc1, GELU, dropout, fc2, dropout over the last dimension."""

    def __init__(self, in_features: int, hidden_features: int, dropout: float):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop2 = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = self.fc1(x)
        x = self.act(x)
        x = self.drop1(x)
        x = self.fc2(x)
        x = self.drop2(x)
        return x


class MixerBlock(nn.Module):
    """Token mixing ``x + T(mlp_tokens(T(norm1(x))))`` then channel mixing ``x + mlp_channels(norm2(x))``."""

    def __init__(self, num_patches: int, dim: int, tokens_hidden_dim: int, channels_hidden_dim: int,
                 dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp_tokens = Mlp(num_patches, tokens_hidden_dim, dropout)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp_channels = Mlp(dim, channels_hidden_dim, dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.mlp_tokens(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        x = x + self.mlp_channels(self.norm2(x))
        return x


class MlpMixer(nn.Module):
    """Patch embedding, ``depth`` Mixer blocks, final LayerNorm, mean over patches, head."""

    def __init__(self, config: MixerConfig):
        super().__init__()
        num_patches = (config.image_size // config.patch_size) ** 2
        self.stem = PatchEmbed(config.patch_size, config.in_channels, config.dim)
        self.blocks = nn.Sequential(*[
            MixerBlock(num_patches, config.dim, config.tokens_hidden_dim, config.channels_hidden_dim,
                       config.dropout)
            for _ in range(config.depth)
        ])
        self.norm = nn.LayerNorm(config.dim, eps=1e-6)
        self.head = nn.Linear(config.dim, config.num_classes)

        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.normal_(m.bias, std=1e-6)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        x = self.blocks(x)
        x = self.norm(x)
        x = x.mean(dim=1)
        return self.head(x)


def build_model(**overrides) -> MlpMixer:
    """MLP-Mixer from ``CONFIG`` with ``overrides`` (any MixerConfig field) applied."""
    return MlpMixer(dataclasses.replace(CONFIG, **overrides))


example_inputs = image_inputs(CONFIG)
output_shape = logits_shape(CONFIG, "num_classes")


# Per-sample shape of the default input (channels, height, width); the batch dimension comes first.
input_shape = (CONFIG.in_channels, CONFIG.image_size, CONFIG.image_size)

"""Encoder-decoder Transformer as in "Attention is all you need", small enough for CPU tests.

Token embeddings scaled by sqrt(d_model) plus sinusoidal positions; post-norm
layers ``x = norm(x + dropout(sublayer(x)))``; the encoder has self-attention
and a ReLU feed-forward network, the decoder has causal self-attention,
cross-attention over the encoder output and the feed-forward network; a linear
generator gives target-vocabulary logits. Attention uses explicit
``q_proj/k_proj/v_proj/out_proj`` Linears with matmul and softmax written out
(not ``nn.MultiheadAttention``), so every Linear and the attention
probabilities are visible.

Inputs: source token ids ``(batch, src_len)`` in ``[0, src_vocab_size)`` and
target token ids ``(batch, tgt_len)`` in ``[0, tgt_vocab_size)``, both int64
(defaults: vocabularies of 512, 32 tokens each; no padding mask).
Output: target logits of shape ``(batch, tgt_len, tgt_vocab_size)``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class TransformerConfig:
    """Sizes of the model; ``max_len`` bounds both sequence lengths (tokens)."""

    src_vocab_size: int = 512
    tgt_vocab_size: int = 512
    src_len: int = 32  # tokens per example source sequence
    tgt_len: int = 32  # tokens per example target sequence
    max_len: int = 64
    d_model: int = 64
    num_heads: int = 4
    d_ff: int = 128  # hidden width of the feed-forward network
    num_encoder_layers: int = 2
    num_decoder_layers: int = 2
    dropout: float = 0.1  # probability, on embeddings, attention probabilities and every sublayer output

    def __post_init__(self) -> None:
        for name in ("src_vocab_size", "tgt_vocab_size", "src_len", "tgt_len", "max_len", "d_model",
                     "num_heads", "d_ff", "num_encoder_layers", "num_decoder_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"TransformerConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.num_heads:
            raise ValueError(f"TransformerConfig.d_model ({self.d_model}) must be a multiple of "
                             f"num_heads ({self.num_heads})")
        if max(self.src_len, self.tgt_len) > self.max_len:
            raise ValueError(f"TransformerConfig.src_len ({self.src_len}) and tgt_len ({self.tgt_len}) must be "
                             f"<= max_len ({self.max_len}); raise max_len")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"TransformerConfig.dropout must be a probability in [0, 1), got {self.dropout}")


CONFIG = TransformerConfig()


def sinusoidal_positions(max_len: int, d_model: int) -> Tensor:
    """Fixed encodings ``(max_len, d_model)``: sin on even features, cos on odd, wavelengths up to 10000."""
    position = torch.arange(max_len, dtype=torch.float32).unsqueeze(1)
    frequency = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
    encoding = torch.zeros(max_len, d_model)
    encoding[:, 0::2] = torch.sin(position * frequency)
    encoding[:, 1::2] = torch.cos(position * frequency[: d_model // 2])
    return encoding


class Embedding(nn.Module):
    """Token embedding times sqrt(d_model), plus sinusoidal position, then dropout."""

    def __init__(self, vocab_size: int, d_model: int, max_len: int, dropout: float):
        super().__init__()
        self.tokens = nn.Embedding(vocab_size, d_model)
        self.scale = math.sqrt(d_model)
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("positions", sinusoidal_positions(max_len, d_model), persistent=False)

    def forward(self, token_ids: Tensor) -> Tensor:
        seq_len = token_ids.size(1)
        # torch.narrow rather than [:n]: torch.fx cannot slice a buffer by a traced length.
        return self.dropout(self.tokens(token_ids) * self.scale + torch.narrow(self.positions, 0, 0, seq_len))


class MultiHeadAttention(nn.Module):
    """Scaled dot-product attention over ``num_heads`` heads; ``causal`` hides later key positions."""

    def __init__(self, d_model: int, num_heads: int, dropout: float, causal: bool = False, max_len: int = 0):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.causal = causal
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.dropout = nn.Dropout(dropout)
        if causal:
            future = torch.triu(torch.ones(max_len, max_len, dtype=torch.bool), diagonal=1)
            self.register_buffer("future_mask", future, persistent=False)

    def split_heads(self, x: Tensor) -> Tensor:
        """(batch, seq, d_model) -> (batch, heads, seq, head_dim)."""
        return x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

    def forward(self, query: Tensor, key: Tensor, value: Tensor) -> Tensor:
        q = self.split_heads(self.q_proj(query))
        k = self.split_heads(self.k_proj(key))
        v = self.split_heads(self.v_proj(value))

        scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(self.head_dim)
        if self.causal:
            query_len, key_len = query.size(1), key.size(1)
            future = torch.narrow(torch.narrow(self.future_mask, 0, 0, query_len), 1, 0, key_len)
            scores = scores.masked_fill(future, float("-inf"))
        weights = torch.softmax(scores, dim=-1)
        weights = self.dropout(weights)

        context = torch.matmul(weights, v).transpose(1, 2).flatten(2)
        return self.out_proj(context)


class FeedForward(nn.Module):
    """Position-wise ``linear2(dropout(relu(linear1(x))))``."""

    def __init__(self, d_model: int, d_ff: int, dropout: float):
        super().__init__()
        self.linear1 = nn.Linear(d_model, d_ff)
        self.relu = nn.ReLU()
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ff, d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear2(self.dropout(self.relu(self.linear1(x))))


class EncoderLayer(nn.Module):
    """Post-norm: ``norm1(x + self_attn(x))`` then ``norm2(x + ffn(x))``."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.self_attn = MultiHeadAttention(config.d_model, config.num_heads, config.dropout)
        self.dropout1 = nn.Dropout(config.dropout)
        self.norm1 = nn.LayerNorm(config.d_model)
        self.ffn = FeedForward(config.d_model, config.d_ff, config.dropout)
        self.dropout2 = nn.Dropout(config.dropout)
        self.norm2 = nn.LayerNorm(config.d_model)

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm1(x + self.dropout1(self.self_attn(x, x, x)))
        x = self.norm2(x + self.dropout2(self.ffn(x)))
        return x


class DecoderLayer(nn.Module):
    """Post-norm: causal self-attention, cross-attention over ``memory``, feed-forward."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.self_attn = MultiHeadAttention(config.d_model, config.num_heads, config.dropout,
                                            causal=True, max_len=config.max_len)
        self.dropout1 = nn.Dropout(config.dropout)
        self.norm1 = nn.LayerNorm(config.d_model)
        self.cross_attn = MultiHeadAttention(config.d_model, config.num_heads, config.dropout)
        self.dropout2 = nn.Dropout(config.dropout)
        self.norm2 = nn.LayerNorm(config.d_model)
        self.ffn = FeedForward(config.d_model, config.d_ff, config.dropout)
        self.dropout3 = nn.Dropout(config.dropout)
        self.norm3 = nn.LayerNorm(config.d_model)

    def forward(self, x: Tensor, memory: Tensor) -> Tensor:
        x = self.norm1(x + self.dropout1(self.self_attn(x, x, x)))
        x = self.norm2(x + self.dropout2(self.cross_attn(x, memory, memory)))
        x = self.norm3(x + self.dropout3(self.ffn(x)))
        return x


class Transformer(nn.Module):
    """Encoder over the source, decoder over the target attending to it, generator to target logits."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.src_embed = Embedding(config.src_vocab_size, config.d_model, config.max_len, config.dropout)
        self.tgt_embed = Embedding(config.tgt_vocab_size, config.d_model, config.max_len, config.dropout)
        self.encoder = nn.ModuleList([EncoderLayer(config) for _ in range(config.num_encoder_layers)])
        self.decoder = nn.ModuleList([DecoderLayer(config) for _ in range(config.num_decoder_layers)])
        self.generator = nn.Linear(config.d_model, config.tgt_vocab_size)

        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def encode(self, src_ids: Tensor) -> Tensor:
        memory = self.src_embed(src_ids)
        for layer in self.encoder:
            memory = layer(memory)
        return memory

    def decode(self, tgt_ids: Tensor, memory: Tensor) -> Tensor:
        x = self.tgt_embed(tgt_ids)
        for layer in self.decoder:
            x = layer(x, memory)
        return x

    def forward(self, src_ids: Tensor, tgt_ids: Tensor) -> Tensor:
        return self.generator(self.decode(tgt_ids, self.encode(src_ids)))


def build_model(**overrides) -> Transformer:
    """Transformer from ``CONFIG`` with ``overrides`` (any TransformerConfig field) applied."""
    return Transformer(dataclasses.replace(CONFIG, **overrides))


def example_inputs(batch_size: int = 4, **overrides) -> tuple[Tensor, Tensor]:
    """Reproducible uniform source and target token ids, int64 ``(batch, src_len)`` and ``(batch, tgt_len)``."""
    config = dataclasses.replace(CONFIG, **overrides)
    generator = torch.Generator().manual_seed(0)
    src_ids = torch.randint(0, config.src_vocab_size, (batch_size, config.src_len), generator=generator)
    tgt_ids = torch.randint(0, config.tgt_vocab_size, (batch_size, config.tgt_len), generator=generator)
    return src_ids, tgt_ids


def output_shape(batch_size: int = 4, **overrides) -> tuple[int, ...]:
    """Shape of the target logits: ``(batch, tgt_len, tgt_vocab_size)``."""
    config = dataclasses.replace(CONFIG, **overrides)
    return (batch_size, config.tgt_len, config.tgt_vocab_size)


# Per-sample shapes of the default inputs (source positions, target positions); batch comes first.
input_shape = ((CONFIG.src_len,), (CONFIG.tgt_len,))

"""GPT-style decoder-only language model (GPT-2 layout), small enough for CPU tests.

Token and position embeddings, pre-norm blocks ``x = x + attn(ln_1(x))`` and
``x = x + mlp(ln_2(x))`` with causal self-attention (one ``c_attn`` Linear for
q, k, v, explicit masked softmax, ``c_proj``) and a GELU MLP, final ``ln_f``
and an LM head whose weight is tied to the token embedding by default.

Input: token ids of shape ``(batch, seq_len)``, int64 in ``[0, vocab_size)``
(default vocabulary 512, sequence 32; ``seq_len <= block_size``).
Output: next-token logits of shape ``(batch, seq_len, vocab_size)``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from examples._common import logits_shape, token_inputs


@dataclass(frozen=True)
class GPTConfig:
    """Sizes of the decoder; ``block_size`` is the longest sequence the model accepts (tokens)."""

    vocab_size: int = 512
    seq_len: int = 32  # tokens per example input
    block_size: int = 64
    n_embd: int = 64
    n_layer: int = 2
    n_head: int = 4
    dropout: float = 0.1  # probability, for embeddings, attention probabilities and residual branches
    tie_word_embeddings: bool = True

    def __post_init__(self) -> None:
        for name in ("vocab_size", "seq_len", "block_size", "n_embd", "n_layer", "n_head"):
            if getattr(self, name) < 1:
                raise ValueError(f"GPTConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"GPTConfig.n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")
        if self.seq_len > self.block_size:
            raise ValueError(f"GPTConfig.seq_len ({self.seq_len}) exceeds block_size ({self.block_size}); "
                             "raise block_size")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be a probability in [0, 1), got {self.dropout}")


CONFIG = GPTConfig()


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where each position sees only itself and earlier positions."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.head_dim = config.n_embd // config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        causal = torch.tril(torch.ones(config.block_size, config.block_size, dtype=torch.bool))
        self.register_buffer("bias", causal.view(1, 1, config.block_size, config.block_size), persistent=False)

    def split_heads(self, x: Tensor) -> Tensor:
        """(batch, seq, n_embd) -> (batch, heads, seq, head_dim)."""
        return x.unflatten(-1, (self.n_head, self.head_dim)).transpose(1, 2)

    def forward(self, x: Tensor) -> Tensor:
        seq_len = x.size(1)
        q, k, v = self.c_attn(x).split(self.head_dim * self.n_head, dim=2)
        q, k, v = self.split_heads(q), self.split_heads(k), self.split_heads(v)

        att = (q @ k.transpose(-2, -1)) * self.head_dim**-0.5
        # torch.narrow rather than [:n]: torch.fx cannot slice a buffer by a traced length.
        causal = torch.narrow(torch.narrow(self.bias, 2, 0, seq_len), 3, 0, seq_len)
        att = att.masked_fill(~causal, float("-inf"))
        att = att.softmax(dim=-1)
        att = self.attn_dropout(att)
        y = att @ v

        y = y.transpose(1, 2).flatten(2)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """c_fc to 4 * n_embd, GELU, c_proj back, dropout."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-norm block: ``x + attn(ln_1(x))`` then ``x + mlp(ln_2(x))``."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    """Embeddings, ``n_layer`` blocks, final LayerNorm, LM head (tied to ``wte`` unless configured not to)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.register_buffer("position_ids", torch.arange(config.block_size).unsqueeze(0), persistent=False)

        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=0.02)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.wte.weight

    def forward(self, input_ids: Tensor) -> Tensor:
        seq_len = input_ids.size(1)
        x = self.wte(input_ids) + self.wpe(torch.narrow(self.position_ids, 1, 0, seq_len))
        x = self.drop(x)
        for block in self.h:
            x = block(x)
        x = self.ln_f(x)
        return self.lm_head(x)


def build_model(**overrides) -> GPT:
    """GPT from ``CONFIG`` with ``overrides`` (any GPTConfig field) applied."""
    return GPT(dataclasses.replace(CONFIG, **overrides))


example_inputs = token_inputs(CONFIG)
output_shape = logits_shape(CONFIG, "seq_len", "vocab_size")


# Per-sample shape of the default input (token positions); the batch dimension comes first.
input_shape = (CONFIG.seq_len,)

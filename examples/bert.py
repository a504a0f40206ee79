"""BERT-style encoder with a masked-language-model head, laid out like Hugging Face's BERT.

Post-norm blocks: embeddings (word + position + token type) -> LayerNorm -> dropout;
self-attention with separate ``query``/``key``/``value`` Linears and explicit
matmul/softmax; ``output.dense`` + dropout + ``LayerNorm(x + ...)``;
``intermediate.dense`` + GELU; ``output.dense`` + dropout + ``LayerNorm(x + ...)``.
The MLM head transforms (dense, GELU, LayerNorm) and decodes with a Linear whose
weight is tied to the word embedding.

Input: token ids of shape ``(batch, seq_len)``, int64 in ``[0, vocab_size)``
(default vocabulary 512, sequence 32); every token is attended (no padding mask)
and all tokens are of segment type 0.
Output: MLM logits of shape ``(batch, seq_len, vocab_size)``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from examples._common import logits_shape, token_inputs


@dataclass(frozen=True)
class BertConfig:
    """Sizes of the encoder; ``max_position_embeddings`` bounds ``seq_len``."""

    vocab_size: int = 512
    seq_len: int = 32  # tokens per example input
    max_position_embeddings: int = 64
    type_vocab_size: int = 2
    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    intermediate_size: int = 128
    dropout: float = 0.1  # probability, for hidden states and attention probabilities
    layer_norm_eps: float = 1e-12

    def __post_init__(self) -> None:
        for name in ("vocab_size", "seq_len", "max_position_embeddings", "type_vocab_size", "hidden_size",
                     "num_hidden_layers", "num_attention_heads", "intermediate_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"BertConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"BertConfig.hidden_size ({self.hidden_size}) must be a multiple of "
                             f"num_attention_heads ({self.num_attention_heads})")
        if self.seq_len > self.max_position_embeddings:
            raise ValueError(f"BertConfig.seq_len ({self.seq_len}) exceeds max_position_embeddings "
                             f"({self.max_position_embeddings}); raise max_position_embeddings")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"BertConfig.dropout must be a probability in [0, 1), got {self.dropout}")


CONFIG = BertConfig()


class BertEmbeddings(nn.Module):
    """Sum of word, position and token-type embeddings, then LayerNorm and dropout."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)
        positions = torch.arange(config.max_position_embeddings).unsqueeze(0)
        self.register_buffer("position_ids", positions, persistent=False)
        self.register_buffer("token_type_ids", torch.zeros_like(positions), persistent=False)

    def forward(self, input_ids: Tensor) -> Tensor:
        seq_len = input_ids.size(1)
        embeddings = self.word_embeddings(input_ids)
        # torch.narrow rather than [:n]: torch.fx cannot slice a buffer by a traced length.
        embeddings = embeddings + self.token_type_embeddings(torch.narrow(self.token_type_ids, 1, 0, seq_len))
        embeddings = embeddings + self.position_embeddings(torch.narrow(self.position_ids, 1, 0, seq_len))
        embeddings = self.LayerNorm(embeddings)
        return self.dropout(embeddings)


class BertSelfAttention(nn.Module):
    """Separate query/key/value projections, scaled dot products, softmax, dropout, weighted sum."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.num_attention_heads = config.num_attention_heads
        self.attention_head_size = config.hidden_size // config.num_attention_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = nn.Dropout(config.dropout)

    def transpose_for_scores(self, x: Tensor) -> Tensor:
        """(batch, seq, hidden) -> (batch, heads, seq, head_size)."""
        return x.unflatten(-1, (self.num_attention_heads, self.attention_head_size)).transpose(1, 2)

    def forward(self, hidden_states: Tensor) -> Tensor:
        query_layer = self.transpose_for_scores(self.query(hidden_states))
        key_layer = self.transpose_for_scores(self.key(hidden_states))
        value_layer = self.transpose_for_scores(self.value(hidden_states))

        attention_scores = torch.matmul(query_layer, key_layer.transpose(-1, -2))
        attention_scores = attention_scores / self.attention_head_size**0.5
        attention_probs = nn.functional.softmax(attention_scores, dim=-1)
        attention_probs = self.dropout(attention_probs)

        context_layer = torch.matmul(attention_probs, value_layer)
        return context_layer.transpose(1, 2).flatten(2)


class BertSelfOutput(nn.Module):
    """Dense projection, dropout, then post-norm residual ``LayerNorm(input + ...)``."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, hidden_states: Tensor, input_tensor: Tensor) -> Tensor:
        hidden_states = self.dense(hidden_states)
        hidden_states = self.dropout(hidden_states)
        return self.LayerNorm(hidden_states + input_tensor)


class BertAttention(nn.Module):
    """Self-attention followed by its output block."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertSelfOutput(config)

    def forward(self, hidden_states: Tensor) -> Tensor:
        return self.output(self.self(hidden_states), hidden_states)


class BertIntermediate(nn.Module):
    """Dense expansion to ``intermediate_size`` and GELU."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.intermediate_act_fn = nn.GELU()

    def forward(self, hidden_states: Tensor) -> Tensor:
        return self.intermediate_act_fn(self.dense(hidden_states))


class BertOutput(nn.Module):
    """Dense contraction back to ``hidden_size``, dropout, post-norm residual."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, hidden_states: Tensor, input_tensor: Tensor) -> Tensor:
        hidden_states = self.dense(hidden_states)
        hidden_states = self.dropout(hidden_states)
        return self.LayerNorm(hidden_states + input_tensor)


class BertLayer(nn.Module):
    """Attention block then feed-forward block, each post-norm."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(self, hidden_states: Tensor) -> Tensor:
        attention_output = self.attention(hidden_states)
        return self.output(self.intermediate(attention_output), attention_output)


class BertEncoder(nn.Module):
    """A stack of ``num_hidden_layers`` BertLayers."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList([BertLayer(config) for _ in range(config.num_hidden_layers)])

    def forward(self, hidden_states: Tensor) -> Tensor:
        for layer_module in self.layer:
            hidden_states = layer_module(hidden_states)
        return hidden_states


class BertLMPredictionHead(nn.Module):
    """Transform (dense, GELU, LayerNorm) then decode to vocabulary logits with a tied weight."""

    def __init__(self, config: BertConfig, word_embeddings: nn.Embedding):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.transform_act_fn = nn.GELU()
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)
        self.decoder.weight = word_embeddings.weight

    def forward(self, hidden_states: Tensor) -> Tensor:
        hidden_states = self.dense(hidden_states)
        hidden_states = self.transform_act_fn(hidden_states)
        hidden_states = self.LayerNorm(hidden_states)
        return self.decoder(hidden_states)


class BertForMaskedLM(nn.Module):
    """Embeddings, encoder and MLM head; returns logits over the vocabulary for every token."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.cls = BertLMPredictionHead(config, self.embeddings.word_embeddings)

        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=0.02)

    def forward(self, input_ids: Tensor) -> Tensor:
        hidden_states = self.embeddings(input_ids)
        hidden_states = self.encoder(hidden_states)
        return self.cls(hidden_states)


def build_model(**overrides) -> BertForMaskedLM:
    """BERT MLM model from ``CONFIG`` with ``overrides`` (any BertConfig field) applied."""
    return BertForMaskedLM(dataclasses.replace(CONFIG, **overrides))


example_inputs = token_inputs(CONFIG)
output_shape = logits_shape(CONFIG, "seq_len", "vocab_size")


# Per-sample shape of the default input (token positions); the batch dimension comes first.
input_shape = (CONFIG.seq_len,)

"""A two-layer Hugging Face Llama from a small random-init config, in train mode, and token ids for it."""

import pytest
import torch


def tiny_llama(batch: int = 4, tokens: int = 32) -> tuple[torch.nn.Module, torch.Tensor]:
    """(LlamaForCausalLM, ids) seeded with 0; skips the test where transformers is missing."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config).train(), torch.randint(0, 1000, (batch, tokens))

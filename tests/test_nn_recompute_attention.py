"""RecomputedAttention (aalconvert.nn.recompute_attention): bit-identical to the module it replaces."""

import pytest
import torch
from torch import nn

from aalconvert.errors import ConversionError
from aalconvert.nn.recompute_attention import RecomputedAttention


class Attention(nn.Module):
    def __init__(self, dim: int = 16, heads: int = 2, dropout: float = 0.2):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.attn_drop = nn.Dropout(dropout)

    def forward(self, x):
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1)).softmax(dim=-1)
        return (self.attn_drop(attn) @ v).transpose(1, 2).flatten(2)


class TwoReaders(Attention):
    def forward(self, x):
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1)).softmax(dim=-1)
        return (self.attn_drop(attn) @ v).sum() + attn.sum()  # the probabilities have a second reader


def test_variant_matches_the_module_bit_for_bit_and_reverts():
    torch.manual_seed(0)
    module = Attention().train()
    variant = RecomputedAttention.from_module(module)
    assert "softmax_dropout_matmul" in variant.core_code and isinstance(variant, Attention)
    x = torch.randn(3, 11, 16, requires_grad=True)
    torch.manual_seed(4)
    expected = module(x)
    torch.manual_seed(4)
    actual = variant(x)
    assert torch.equal(actual, expected)
    params = [x, *module.parameters()]
    for a, e in zip(torch.autograd.grad(actual.sum(), params), torch.autograd.grad(expected.sum(), params)):
        assert torch.equal(a, e)
    assert type(variant.to_module()) is Attention


def test_variant_refuses_a_chain_whose_probabilities_have_another_reader_and_options():
    with pytest.raises(ConversionError, match="nothing to rebuild"):
        RecomputedAttention.from_module(TwoReaders())
    with pytest.raises(ConversionError, match="takes no options"):
        RecomputedAttention.from_module(Attention(), bits=4)

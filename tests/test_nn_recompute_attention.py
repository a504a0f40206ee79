"""softmax_dropout_matmul and RecomputedAttention (aalconvert.nn.recompute_attention).

The reference is plain PyTorch under the same RNG state:
``torch.matmul(F.dropout(torch.softmax(s, dim), p, training), v)`` and its autograd.
Everything is compared bit for bit (the rule is exact).
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from aalconvert.errors import ConversionError
from aalconvert.memory import measure_saved
from aalconvert.nn.lossless import MaskDropout
from aalconvert.nn.recompute_attention import RecomputedAttention, softmax_dropout_matmul


def operands(batch: tuple[int, ...], tokens: int, head_dim: int, dtype=torch.float32):
    """Scores and a strided v (a slice of a wider tensor, as after a fused qkv projection)."""
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(*batch, tokens, tokens, generator=generator).to(dtype).requires_grad_()
    wide = torch.randn(*batch, tokens, 3 * head_dim, generator=generator).to(dtype).requires_grad_()
    return scores, wide


def run(function, scores, wide, head_dim, seed=7):
    torch.manual_seed(seed)
    out = function(scores, wide[..., head_dim: 2 * head_dim])
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
    grads = torch.autograd.grad(out, (scores, wide), g)
    return out, grads


@pytest.mark.parametrize("batch", [(1, 1), (2, 3), (5,)], ids=str)
@pytest.mark.parametrize("p", [0.0, 0.1, 0.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dropout_class", [nn.Dropout, MaskDropout])
def test_fused_forward_and_gradients_are_bit_identical_to_torch(batch, p, dtype, dropout_class):
    tokens, head_dim = 13, 5
    scores, wide = operands(batch, tokens, head_dim, dtype)
    dropout = dropout_class(p)
    expected = run(lambda s, v: torch.matmul(F.dropout(torch.softmax(s, -1), p, True), v), scores, wide, head_dim)
    actual = run(lambda s, v: softmax_dropout_matmul(s, v, -1, dropout), scores, wide, head_dim)
    assert torch.equal(actual[0], expected[0])
    for a, e in zip(actual[1], expected[1]):
        assert torch.equal(a, e)


def test_fused_form_keeps_no_dropped_probabilities_and_a_1_bit_mask():
    tokens, head_dim, batch = 33, 8, (2, 4)
    scores, wide = operands(batch, tokens, head_dim)
    dropout = nn.Dropout(0.1)

    def kept(function):
        torch.manual_seed(0)
        return measure_saved(lambda: function(scores, wide[..., head_dim: 2 * head_dim])).nbytes

    bp = kept(lambda s, v: torch.matmul(F.dropout(torch.softmax(s, -1), 0.1, True), v))
    fused = kept(lambda s, v: softmax_dropout_matmul(s, v, -1, dropout))
    square = math.prod(batch) * tokens * tokens
    # BP (CPU): y, float noise, dropped probabilities, contiguous copy of v. Fused: y, 1-bit mask, v copy.
    assert bp - fused == 4 * square + 4 * square - math.ceil(square / 8)


def test_eval_mode_no_grad_and_hooked_dropout_run_the_original_ops():
    scores, wide = operands((2,), 7, 3)
    v = wide[..., 3:6]
    dropout = nn.Dropout(0.5).eval()
    assert torch.equal(softmax_dropout_matmul(scores, v, -1, dropout), torch.softmax(scores, -1) @ v)
    dropout.train()
    with torch.no_grad():
        torch.manual_seed(3)
        expected = torch.matmul(F.dropout(torch.softmax(scores, -1), 0.5, True), v)
        torch.manual_seed(3)
        assert torch.equal(softmax_dropout_matmul(scores, v, -1, dropout), expected)
    calls = []
    dropout.register_forward_hook(lambda m, args, out: calls.append(out.shape))
    softmax_dropout_matmul(scores, v, -1, dropout)
    assert calls == [(2, 7, 7)]


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

"""softmax_dropout_matmul (aalconvert.nn.softmax_dropout_matmul).

The reference is plain PyTorch under the same RNG state:
``torch.matmul(F.dropout(torch.softmax(s, dim), p, training), v)`` and its autograd,
compared bit for bit when nothing is quantized; with k-bit copies, the gradient
formulas written out in float64 at the decoded softmax output and v.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from aalconvert.kernels import dequantize, quantize, quantized_nbytes
from aalconvert.memory import measure_saved
from aalconvert.nn.approx_common import ApproxOptions
from aalconvert.nn.lossless import MaskDropout
from aalconvert.nn.softmax_dropout_matmul import softmax_dropout_matmul


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


def decoded(x: torch.Tensor, bits: int) -> torch.Tensor:
    return dequantize(quantize(x.detach(), bits, group_size=256 if bits == 8 else 64, companding="sqrt"))


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("bits", [8, 2])
def test_k_bit_form_is_forward_exact_with_gradients_at_the_decoded_copies(p, bits):
    tokens, head_dim, batch = 17, 6, (2, 3)
    scores, wide = operands(batch, tokens, head_dim)
    v = wide[..., head_dim: 2 * head_dim]
    dropout = nn.Dropout(p)
    options = ApproxOptions(bits=bits, min_numel=0)
    torch.manual_seed(7)
    out = softmax_dropout_matmul(scores, v, -1, dropout, options)
    torch.manual_seed(7)
    assert torch.equal(out, torch.matmul(F.dropout(torch.softmax(scores, -1), p, True), v))
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    ds, dwide = torch.autograd.grad(out, (scores, wide), g)

    torch.manual_seed(7)  # the same draws: softmax takes no random numbers
    y = torch.softmax(scores.detach(), -1)
    noise = torch.empty_like(y).bernoulli_(1 - p).div_(1 - p) if p else torch.ones_like(y)
    y_, v_, noise, g = (t.double() for t in (decoded(y, bits), decoded(v.contiguous(), bits), noise, g))
    dy = (g @ v_.transpose(-2, -1)) * noise
    ds_ref = y_ * (dy - (dy * y_).sum(-1, keepdim=True))
    dv_ref = (y_ * noise).transpose(-2, -1) @ g
    torch.testing.assert_close(ds.double(), ds_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dwide[..., head_dim: 2 * head_dim].double(), dv_ref, rtol=1e-4, atol=1e-5)
    assert not dwide[..., :head_dim].any() and not dwide[..., 2 * head_dim:].any()


def test_k_bit_form_keeps_k_bit_y_and_v_and_a_1_bit_mask():
    tokens, head_dim, batch = 33, 8, (2, 4)
    scores, wide = operands(batch, tokens, head_dim)
    saved = measure_saved(
        lambda: softmax_dropout_matmul(scores, wide[..., :head_dim], -1, nn.Dropout(0.1), ApproxOptions(bits=4, min_numel=0))
    )
    square, values = math.prod(batch) * tokens * tokens, math.prod(batch) * tokens * head_dim
    q4 = lambda n: quantized_nbytes(n, 4, 64)
    assert saved.nbytes == q4(square) + q4(values) + math.ceil(square / 8)

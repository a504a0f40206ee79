"""approx_matmul / approx_bmm and the ApproxAttention variant (aalconvert.nn.approx_matmul, approx_attention).

References are plain PyTorch: torch.matmul's own forward and autograd, and
autograd through torch at the decoded operands (quantize -> dequantize).
"""

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from aalconvert.errors import ConversionError
from aalconvert.kernels import dequantize, quantize, quantized_nbytes
from aalconvert.memory import measure_saved
from aalconvert.nn.approx_attention import ApproxAttention
from aalconvert.nn.approx_common import ApproxOptions
from aalconvert.nn.approx_matmul import approx_bmm, approx_matmul
from aalconvert.nn.approx import ApproxLinear


def decoded(x: torch.Tensor, bits: int) -> torch.Tensor:
    return dequantize(quantize(x.detach(), bits, group_size=256 if bits == 8 else 64, companding="sqrt"))


def reference_grads(a, b, g, bits):
    """(da, db) of matmul through torch autograd, each taken at the *other* operand decoded."""
    a_ref = a.detach().clone().requires_grad_()
    b_ref = b.detach().clone().requires_grad_()
    (torch.matmul(a_ref, decoded(b, bits)) * g).sum().backward()
    (torch.matmul(decoded(a, bits), b_ref) * g).sum().backward()
    return a_ref.grad, b_ref.grad


# ------------------------------------------------------------------ approx_matmul


SHAPES = [
    ((2, 3, 7, 5), (2, 3, 5, 513)),  # attention-like, awkward sizes
    ((1, 7, 513), (1, 513, 9)),
    ((2, 3, 7, 5), (5, 11)),  # b broadcast over batch dims
    ((7, 5), (4, 5, 3)),  # a broadcast over b's batch
    ((2, 1, 7, 5), (3, 5, 4)),  # both broadcast
]


@pytest.mark.parametrize(("a_shape", "b_shape"), SHAPES)
@pytest.mark.parametrize("bits", [8, 4, 2])
def test_approx_matmul_forward_exact_and_grads_use_the_decoded_other_operand(a_shape, b_shape, bits):
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(a_shape, generator=generator, requires_grad=True)
    b = torch.randn(b_shape, generator=generator, requires_grad=True)
    options = ApproxOptions(bits=bits, min_numel=0)
    y = approx_matmul(a, b, options)
    assert torch.equal(y, torch.matmul(a, b))
    g = torch.randn(y.shape, generator=generator)
    y.backward(g)
    da, db = reference_grads(a, b, g, bits)
    torch.testing.assert_close(a.grad, da, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.grad, db, rtol=1e-5, atol=1e-5)


def test_approx_matmul_below_min_numel_gives_torch_gradients():
    generator = torch.Generator().manual_seed(1)
    a = torch.randn(2, 7, 5, generator=generator, requires_grad=True)
    b = torch.randn(2, 5, 3, generator=generator, requires_grad=True)
    a_ref, b_ref = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    g = torch.randn(2, 7, 3, generator=generator)
    approx_matmul(a, b, ApproxOptions(min_numel=10**6)).backward(g)
    torch.matmul(a_ref, b_ref).backward(g)
    torch.testing.assert_close(a.grad, a_ref.grad)
    torch.testing.assert_close(b.grad, b_ref.grad)


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float16, 2e-2), (torch.bfloat16, 5e-2)])
def test_approx_bmm_low_precision_matches_decoded_reference(dtype, tol):
    generator = torch.Generator().manual_seed(2)
    a = torch.randn(3, 17, 33, generator=generator).to(dtype).requires_grad_()
    b = torch.randn(3, 33, 9, generator=generator).to(dtype).requires_grad_()
    y = approx_bmm(a, b, ApproxOptions(bits=8, min_numel=0))
    assert y.dtype == dtype and torch.equal(y, torch.bmm(a, b))
    g = torch.randn(y.shape, generator=generator).to(dtype)
    y.backward(g)
    da, db = reference_grads(a.float(), b.float(), g.float(), 8)
    torch.testing.assert_close(a.grad.float(), da, rtol=tol, atol=tol)
    torch.testing.assert_close(b.grad.float(), db, rtol=tol, atol=tol)


def test_approx_matmul_keeps_only_k_bit_copies_of_both_operands():
    a = torch.randn(4, 8, 64, 32, requires_grad=True)
    b = torch.randn(4, 8, 32, 64, requires_grad=True)
    saved = measure_saved(lambda: approx_matmul(a, b, ApproxOptions(bits=4)))
    assert saved.nbytes == quantized_nbytes(a.numel(), 4, 64) + quantized_nbytes(b.numel(), 4, 64)


def test_approx_matmul_copies_an_operand_only_when_the_other_needs_a_gradient():
    a = torch.randn(4, 64, 64, requires_grad=True)
    b = torch.randn(4, 64, 64)  # no gradient: a's copy (needed only for db) is not made
    saved = measure_saved(lambda: approx_matmul(a, b, ApproxOptions(bits=4)))
    assert saved.nbytes == quantized_nbytes(b.numel(), 4, 64)


def test_approx_matmul_of_vectors_and_without_grad_is_torch_matmul():
    a, b = torch.randn(5, requires_grad=True), torch.randn(5, 3)
    assert torch.equal(approx_matmul(a, b), torch.matmul(a, b))
    with torch.no_grad():
        x = torch.randn(2, 3, 4)
        assert torch.equal(approx_matmul(x, x.transpose(1, 2)), x @ x.transpose(1, 2))


# ------------------------------------------------------------------ ApproxAttention


class Attention(nn.Module):
    """Functional attention core between module calls (fused qkv, dropout on the probabilities)."""

    def __init__(self, dim: int = 32, heads: int = 4, dropout: float = 0.0):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.drop = nn.Dropout(dropout)
        self.proj = nn.Linear(dim, dim)
        self.register_buffer("unused_stat", torch.zeros(3))

    def forward(self, x):
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        attn = F.softmax(q @ k.transpose(-2, -1) * 0.5, dim=-1)
        return self.proj((self.drop(attn) @ v).transpose(1, 2).flatten(2))


def test_variant_is_forward_exact_and_shares_every_tensor_and_key_in_order():
    torch.manual_seed(0)
    module = Attention()
    variant = ApproxAttention.from_module(module, bits=4, min_numel=0)
    assert isinstance(variant, Attention) and isinstance(variant, ApproxAttention)
    assert list(variant.state_dict()) == list(module.state_dict())
    assert all(a is b for a, b in zip(variant.parameters(), module.parameters()))
    assert variant.qkv is module.qkv and variant.unused_stat is module.unused_stat
    x = torch.randn(2, 9, 32, requires_grad=True)
    assert torch.equal(variant(x), module(x))
    assert "softmax_dropout_matmul" in variant.core_code and "approx_matmul" in variant.core_code


def test_variant_keeps_k_bit_attention_operands_instead_of_full_ones():
    torch.manual_seed(0)
    batch, tokens, dim, heads = 2, 33, 32, 4
    module = Attention(dim, heads)
    x = torch.randn(batch, tokens, dim, requires_grad=True)
    variant = ApproxAttention.from_module(module, bits=4, min_numel=0)
    saved = measure_saved(lambda: variant(x), module.parameters())
    # Expected from shapes alone: qkv keeps x, proj keeps its input (both fp32, plain Linears);
    # q @ k^T keeps k-bit q and k^T; softmax -> dropout (p=0) -> @ v keeps the k-bit softmax
    # output and k-bit v (the probabilities after dropout are rebuilt from them).
    head = batch * heads * tokens * (dim // heads)
    square = batch * heads * tokens * tokens
    q4 = lambda n: quantized_nbytes(n, 4, 64)
    expected = 2 * 4 * batch * tokens * dim + 3 * q4(head) + q4(square)
    assert saved.nbytes == expected
    g = torch.randn(saved.output.shape)
    saved.output.backward(g)
    assert torch.isfinite(x.grad).all() and module.qkv.weight.grad is not None


def test_children_swapped_after_building_are_used_and_hooks_on_them_fire():
    torch.manual_seed(0)
    module = Attention()
    variant = ApproxAttention.from_module(module)
    calls = []
    variant.proj = ApproxLinear.from_module(variant.proj)
    variant.proj.register_forward_hook(lambda m, args, out: calls.append(type(m)))
    x = torch.randn(2, 5, 32, requires_grad=True)
    assert torch.equal(variant(x), module(x))
    assert calls == [ApproxLinear]


def test_to_module_gives_the_original_class_with_the_same_registries_and_deepcopy_works():
    module = Attention()
    variant = ApproxAttention.from_module(module)
    restored = variant.to_module()
    assert type(restored) is Attention
    assert list(restored.state_dict()) == list(module.state_dict())
    assert all(a is b for a, b in zip(restored.parameters(), module.parameters()))
    clone = copy.deepcopy(variant)
    x = torch.randn(1, 4, 32)
    assert type(clone) is type(variant) and torch.equal(clone(x), variant(x))
    with pytest.raises(ConversionError, match="already"):
        ApproxAttention.from_module(variant)


def test_pickled_variant_loads_as_the_same_variant_with_the_same_state():
    torch.manual_seed(0)
    variant = ApproxAttention.from_module(Attention(), bits=2, min_numel=0)
    buffer = io.BytesIO()
    torch.save(variant, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert type(loaded) is type(variant) and loaded.core_options == variant.core_options
    assert list(loaded.state_dict()) == list(variant.state_dict())
    x = torch.randn(2, 5, 32)
    assert torch.equal(loaded(x), variant(x))


class _SoftmaxReadTwice(Attention):
    def forward(self, x):
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1)).softmax(-1)
        return (attn @ v).sum() + attn.sum()  # no dropout chain: softmax and products one by one


def test_softmax_and_products_outside_a_dropout_chain_are_replaced_one_by_one():
    torch.manual_seed(0)
    module = _SoftmaxReadTwice()
    variant = ApproxAttention.from_module(module, bits=8, min_numel=0)
    assert variant.core_code.count("approx_matmul(") == 2 and "approx_softmax(" in variant.core_code
    x = torch.randn(2, 7, 32, requires_grad=True)
    assert torch.equal(variant(x), module(x))


class _Optional(Attention):
    def forward(self, x, mask=None):
        return super().forward(x)


class _ReadsTraining(Attention):
    def forward(self, x):
        y = super().forward(x)
        return y * 2 if self.training else y


class _NoCore(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x).softmax(dim=-1, dtype=torch.float64) @ self.fc.weight


@pytest.mark.parametrize(
    ("module", "message"),
    [(_Optional(), "optional argument 'mask'"), (_ReadsTraining(), "self.training"),
     (_NoCore(), "no functional softmax and no matmul of two activations")],
    ids=["optional-argument", "reads-training", "nothing-to-rewrite"],
)
def test_variant_refuses_modules_a_traced_copy_would_get_wrong(module, message):
    with pytest.raises(ConversionError, match=message):
        ApproxAttention.from_module(module)

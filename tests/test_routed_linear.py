"""Linear layers run only through a function their parent calls: torchvision's Swin attention.

``torchvision.models.swin_transformer.ShiftedWindowAttention`` (V1 and V2) never
calls its ``qkv`` and ``proj`` children: its forward hands ``self.qkv.weight``,
``self.proj.weight`` and their biases to ``shifted_window_attention``, an
``fx.wrap``-ed function that runs ``F.linear`` on them (V2 passes a copy of
``qkv.bias`` with its key third zeroed). torchvision does not import beside the
CI torch, so ``WindowAttention`` below copies that structure: a wrapped
module-level function, the weights passed as arguments, ``F.linear`` inside.
"""

import copy
import io

import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

import aalconvert
from aalconvert.facts import gather_facts
from aalconvert.memory import measure_saved
from aalconvert.nn.asa import ASALinear
from aalconvert.nn.routed_linear import RoutedLinears

EPS, LR_EXPANSION = 0.01, 100.0


def window_attention(x, qkv_weight, proj_weight, heads, qkv_bias=None, proj_bias=None, zero_key_bias=False):
    """Attention over windows of 4 tokens, written as torchvision's ``shifted_window_attention`` is."""
    batch, tokens, channels = x.shape
    x = x.reshape(batch * tokens // 4, 4, channels)
    if zero_key_bias:  # Swin V2: a copy of the bias, its key third zeroed
        qkv_bias = qkv_bias.clone()
        qkv_bias[channels:2 * channels].zero_()
    qkv = F.linear(x, qkv_weight, qkv_bias)
    q, k, v = qkv.reshape(x.shape[0], 4, 3, heads, channels // heads).permute(2, 0, 3, 1, 4)
    attention = (q * (channels // heads) ** -0.5).matmul(k.transpose(-2, -1)).softmax(-1)
    x = attention.matmul(v).transpose(1, 2).reshape(x.shape[0], 4, channels)
    return F.linear(x, proj_weight, proj_bias).reshape(batch, tokens, channels)


torch.fx.wrap("window_attention")


class WindowAttention(nn.Module):
    def __init__(self, width: int, heads: int, zero_key_bias: bool) -> None:
        super().__init__()
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.heads, self.zero_key_bias = heads, zero_key_bias

    def forward(self, x):
        return window_attention(x, self.qkv.weight, self.proj.weight, self.heads, qkv_bias=self.qkv.bias,
                                proj_bias=self.proj.bias, zero_key_bias=self.zero_key_bias)


class Block(nn.Module):
    def __init__(self, width: int, zero_key_bias: bool) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = WindowAttention(width, 2, zero_key_bias)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def swin_like(zero_key_bias: bool = False) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), Block(16, zero_key_bias), Block(16, zero_key_bias), nn.Linear(16, 3))


def tokens() -> torch.Tensor:
    return torch.randn(2, 8, 6, generator=torch.Generator().manual_seed(1))


class _ReferenceASA(TorchFunctionMode):
    """methods.md section 2 written out with autograd: forward W (x + eps*s) + b,
    dW = lr_expansion * eps * g^T s, dx = g W, db = sum(g), for the weights given."""

    def __init__(self, weights):
        super().__init__()
        self.weights = weights

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and any(args[1] is w for w in self.weights):
            x, weight, bias = args[0], args[1], args[2] if len(args) > 2 else kwargs.get("bias")
            s = torch.where(x > 0, 1.0, -1.0).detach()
            scaled = (LR_EXPANSION * EPS) * s
            return (F.linear(x + EPS * s, weight.detach(), bias)
                    + F.linear(scaled, weight) - F.linear(scaled, weight).detach())
        return func(*args, **kwargs)


def _gradients(model, x):
    model.zero_grad()
    model(x).square().sum().backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("zero_key_bias", [False, True], ids=["swin_v1", "swin_v2_bias_copy"])
def test_asa_routes_the_parents_functional_linears_and_matches_the_formula(zero_key_bias):
    model, x = swin_like(zero_key_bias), tokens()
    reference = copy.deepcopy(model)
    converted = aalconvert.convert(model, "asa", example_inputs=(x,))

    attention = converted[1].attn
    assert isinstance(attention, RoutedLinears) and isinstance(attention, WindowAttention)
    assert isinstance(attention.qkv, ASALinear) and isinstance(attention.proj, ASALinear)
    assert list(converted.state_dict()) == list(reference.state_dict())
    assert attention.qkv.weight is model[1].attn.qkv.weight

    weights = [m.weight for block in reference[1:3] for m in (block.attn.qkv, block.attn.proj,
                                                               block.mlp[0], block.mlp[2])]
    got = _gradients(converted, x)
    with _ReferenceASA(weights):
        expected = _gradients(reference, x)
    assert got.keys() == expected.keys()
    for name in got:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)
    if zero_key_bias:  # the zeroed copy passes no gradient to the key third of the bias
        assert torch.count_nonzero(got["1.attn.qkv.bias"][16:32]) == 0


def test_a_routed_layer_keeps_a_one_bit_sign_and_inspect_predicts_the_measured_bytes():
    model, x = swin_like(), tokens()
    measure = lambda m: measure_saved(lambda: m(x), m.parameters()).nbytes
    bp = measure(model)
    report = aalconvert.inspect(model, (x,), "asa")
    converted = aalconvert.convert(copy.deepcopy(model), "asa", example_inputs=(x,))
    measured = measure(converted)
    assert report.totals.converted_bytes == measured
    # per block, fp32 inputs become 1-bit signs: qkv's, proj's and mlp[0]'s (2 x 8 x 16 values
    # each) and mlp[2]'s (2 x 8 x 32)
    per_block = sum(n * 4 - n // 8 for n in (256, 256, 256, 512))
    assert bp - measured == 2 * per_block
    row = next(r for r in report.rows if r.name == "1.attn")
    assert row.rule.startswith("asa") and "1.attn.qkv, 1.attn.proj run as asa" in row.explanation


def test_facts_see_the_functional_linears_in_the_residual_branch():
    facts = gather_facts(swin_like(), (tokens(),))
    branches = [block.branch_weighted for block in facts.blocks]
    assert ("1.attn.qkv", "1.attn.proj") in branches
    assert facts.call_count("1.attn.qkv") == 0 and len(facts.functional_nodes["1.attn.qkv"]) == 1


def test_revert_compile_pickle_and_hooks_keep_the_routed_forward():
    model, x = swin_like(), tokens()
    plain_out = model(x)
    converted = aalconvert.convert(copy.deepcopy(model), "asa", example_inputs=(x,))
    out = converted(x)
    assert not torch.equal(out, plain_out)  # ASA's forward perturbs the input by eps * s

    buffer = io.BytesIO()
    torch.save(converted, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert isinstance(loaded[1].attn, RoutedLinears) and isinstance(loaded[1].attn.qkv, ASALinear)
    torch.testing.assert_close(loaded(x), out, rtol=0, atol=0)

    compiled = torch.compile(converted, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), out, rtol=0, atol=0)
    compiled_grads, eager_grads = _gradients(compiled, x), _gradients(converted, x)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[f"_orig_mod.{name}"], grad, rtol=1e-6, atol=1e-7)

    calls = []
    converted[1].attn.register_forward_hook(lambda module, args, output: calls.append(output.shape))
    torch.testing.assert_close(converted(x), out, rtol=0, atol=0)
    assert calls == [torch.Size([2, 8, 16])]

    reverted = aalconvert.revert(converted)
    assert type(reverted[1].attn) is WindowAttention and type(reverted[1].attn.qkv) is nn.Linear
    torch.testing.assert_close(reverted(x), plain_out, rtol=0, atol=0)
    assert len(calls) == 2  # the user's hook stays on the reverted module


def test_a_child_reverted_on_its_own_is_no_longer_routed():
    model, x = swin_like(), tokens()
    converted = aalconvert.convert(model, "asa", example_inputs=(x,))
    attention, h = converted[1].attn, torch.randn(2, 8, 16)
    assert not torch.equal(attention(h), WindowAttention.forward(attention, h))
    attention.qkv, attention.proj = attention.qkv.to_module(), attention.proj.to_module()
    torch.testing.assert_close(attention(h), WindowAttention.forward(attention, h), rtol=0, atol=0)


def test_approx_packs_what_the_routed_parent_saves():
    model, x = swin_like(), tokens()
    auto = aalconvert.inspect(model, (x,), "auto").totals.converted_bytes
    packed = aalconvert.inspect(model, (x,), ["auto", "approx4"], min_numel=16).totals.converted_bytes
    assert packed < 0.5 * auto

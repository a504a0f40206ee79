"""``gated_down`` / ``gated_product`` against torch autograd: ``down(act(gate) * up)`` keeping gate and up.

The reference is the plain expression on the same Parameters. Exact form:
every gradient bit-identical (odd shapes, 1 token, biases, bf16 autocast, bf16
Parameters, chunked operands); k-bit form: gradient cosine >= 0.99 at 4 bits.
What is kept is measured with ``aalconvert.memory.measure_saved``.
"""

import pytest
import torch
from torch import nn
from transformers.activations import GELUTanh, NewGELUActivation, SiLUActivation

from aalconvert.errors import SavedTensorModifiedError
from aalconvert.memory import measure_saved
from aalconvert.nn.approx_common import ApproxOptions
from aalconvert.nn.gated_mlp import (
    ApproxGatedMLP,
    RecomputedGatedMLP,
    activation_problem,
    gated_down,
    gated_product,
)

ACTIVATIONS = {
    "hf_silu": SiLUActivation,
    "hf_gelu_tanh": GELUTanh,
    "hf_new_gelu": NewGELUActivation,
    "silu": nn.SiLU,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "relu": nn.ReLU,
}
SHAPES = [(2, 5, 16), (1, 1, 16), (3, 16), (16,), (2, 3, 7, 16)]


class GatedMLP(nn.Module):
    """Hugging Face's LlamaMLP, written out (``down_proj(act_fn(gate_proj(x)) * up_proj(x))``)."""

    def __init__(self, hidden: int = 16, intermediate: int = 37, bias: bool = False, act=None) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.up_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.down_proj = nn.Linear(intermediate, hidden, bias=bias)
        self.act_fn = act if act is not None else SiLUActivation()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class FusedGateUpMLP(GatedMLP):
    """Phi-3's MLP: one projection chunked into gate and up, ``up * act(gate)``."""

    def __init__(self, hidden: int = 16, intermediate: int = 37) -> None:
        super().__init__(hidden, intermediate)
        self.gate_up_proj = nn.Linear(hidden, 2 * intermediate, bias=False)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(up * self.act_fn(gate))


def weighted_sum(out: torch.Tensor) -> torch.Tensor:
    weights = torch.linspace(-1, 1, out.numel(), dtype=torch.float32).view(out.shape)
    return (out.float() * weights).sum()


def grads(mlp: nn.Module, x: torch.Tensor, fused: bool, options=None, autocast=False, product_only=False):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        gate, up = mlp.gate_proj(x), mlp.up_proj(x)
        if not fused:
            out = mlp.down_proj(mlp.act_fn(gate) * up)
        elif product_only:
            out = mlp.down_proj(gated_product(gate, up, mlp.act_fn, True, options))
        else:
            out = gated_down(gate, up, mlp.act_fn, mlp.down_proj, True, options)
    return torch.autograd.grad(weighted_sum(out), [x, *mlp.parameters()])


def assert_bit_identical(actual, expected):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=0, atol=0)


def cosine(actual, expected) -> float:
    a = torch.cat([g.flatten().double() for g in actual])
    e = torch.cat([g.flatten().double() for g in expected])
    return torch.nn.functional.cosine_similarity(a, e, dim=0).item()


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
def test_gated_down_gradients_are_bit_identical_to_autograd(act, shape, bias):
    torch.manual_seed(0)
    mlp = GatedMLP(bias=bias, act=ACTIVATIONS[act]())
    x = torch.randn(shape, requires_grad=True)
    assert_bit_identical(grads(mlp, x, fused=True), grads(mlp, x, fused=False))


@pytest.mark.parametrize("shape", [(2, 5, 16), (1, 1, 16), (3, 16)])
@pytest.mark.parametrize("act", ["hf_silu", "hf_gelu_tanh", "hf_new_gelu"])
def test_gated_down_is_bit_identical_under_bf16_autocast(act, shape):
    torch.manual_seed(0)
    mlp = GatedMLP(bias=True, act=ACTIVATIONS[act]())
    x = torch.randn(shape, requires_grad=True)
    actual = grads(mlp, x, fused=True, autocast=True)
    assert actual[1].dtype == torch.float32  # the Parameters' gradients in their own dtype
    assert_bit_identical(actual, grads(mlp, x, fused=False, autocast=True))


def test_gated_down_is_bit_identical_with_bf16_parameters():
    torch.manual_seed(0)
    mlp = GatedMLP(bias=True).to(torch.bfloat16)
    x = torch.randn(2, 9, 16, dtype=torch.bfloat16, requires_grad=True)
    assert_bit_identical(grads(mlp, x, fused=True), grads(mlp, x, fused=False))


@pytest.mark.parametrize("autocast", [False, True])
def test_gated_product_alone_is_bit_identical(autocast):
    torch.manual_seed(0)
    mlp = GatedMLP(bias=True, act=GELUTanh())
    x = torch.randn(2, 5, 16, requires_grad=True)
    actual = grads(mlp, x, fused=True, autocast=autocast, product_only=True)
    assert_bit_identical(actual, grads(mlp, x, fused=False, autocast=autocast))


def test_chunked_operands_in_either_order_are_bit_identical():
    torch.manual_seed(0)
    mlp = FusedGateUpMLP()
    x = torch.randn(2, 5, 16, requires_grad=True)

    def run(fused):
        gate, up = mlp.gate_up_proj(x).chunk(2, dim=-1)
        if fused:
            out = gated_down(gate, up, mlp.act_fn, mlp.down_proj, act_first=False)
        else:
            out = mlp.down_proj(up * mlp.act_fn(gate))
        return torch.autograd.grad(weighted_sum(out), [x, mlp.gate_up_proj.weight, mlp.down_proj.weight])

    assert_bit_identical(run(True), run(False))


def _kept_bytes(fn, mlp, x) -> int:
    gate, up = mlp.gate_proj(x).detach().requires_grad_(), mlp.up_proj(x).detach().requires_grad_()
    return measure_saved(lambda: fn(gate, up), mlp.parameters()).nbytes


def test_bp_keeps_four_intermediate_tensors_and_the_fused_op_two():
    mlp = GatedMLP(intermediate=64)
    x = torch.randn(4, 8, 16)
    width = 4 * 8 * 64 * 4  # one intermediate-width fp32 tensor, bytes
    plain = _kept_bytes(lambda g, u: mlp.down_proj(mlp.act_fn(g) * u), mlp, x)
    fused = _kept_bytes(lambda g, u: gated_down(g, u, mlp.act_fn, mlp.down_proj), mlp, x)
    product = _kept_bytes(lambda g, u: mlp.down_proj(gated_product(g, u, mlp.act_fn)), mlp, x)
    assert plain == 4 * width
    assert fused == 2 * width
    assert product == 3 * width  # gate, up, and down_proj's own input


def test_k_bit_copies_keep_less_and_give_gradient_cosine_above_099():
    torch.manual_seed(0)
    mlp = GatedMLP(hidden=64, intermediate=176, bias=True)
    x = torch.randn(4, 32, 64, requires_grad=True)
    options = ApproxOptions(bits=4)
    width = 4 * 32 * 176 * 4
    kept = _kept_bytes(lambda g, u: gated_down(g, u, mlp.act_fn, mlp.down_proj, True, options), mlp, x)
    assert kept < 2 * width / 6  # two 4-bit copies with their group metadata
    expected = grads(mlp, x, fused=False)
    for product_only in (False, True):
        actual = grads(mlp, x, fused=True, options=options, product_only=product_only)
        assert cosine(actual, expected) >= 0.99
    assert cosine(grads(mlp, x, fused=True, options=options, autocast=True),
                  grads(mlp, x, fused=False, autocast=True)) >= 0.99


def test_without_autograd_or_under_torch_func_the_plain_ops_run():
    torch.manual_seed(0)
    mlp = GatedMLP()
    x = torch.randn(2, 5, 16)
    gate, up = mlp.gate_proj(x), mlp.up_proj(x)
    with torch.no_grad():
        out = gated_down(gate, up, mlp.act_fn, mlp.down_proj)
        assert out.grad_fn is None
        assert torch.equal(out, mlp.down_proj(mlp.act_fn(gate) * up))

    params = dict(mlp.named_parameters())

    def loss(p, fused):
        g = torch.func.functional_call(mlp.gate_proj, {"weight": p["gate_proj.weight"]}, (x,))
        u = torch.func.functional_call(mlp.up_proj, {"weight": p["up_proj.weight"]}, (x,))
        down = lambda m: torch.func.functional_call(mlp.down_proj, {"weight": p["down_proj.weight"]}, (m,))
        out = down(gated_product(g, u, mlp.act_fn)) if fused else down(mlp.act_fn(g) * u)
        return weighted_sum(out)

    actual, expected = torch.func.grad(loss)(params, True), torch.func.grad(loss)(params, False)
    for name in params:
        assert torch.equal(actual[name], expected[name])


def _scale_output(module, args, output):
    return output * 1.5


@pytest.mark.parametrize("hooked", ["act_fn", "down_proj"])
def test_value_changing_hooks_on_the_activation_or_down_proj_keep_gradients_exact(hooked):
    torch.manual_seed(0)
    mlp = GatedMLP(bias=True)
    getattr(mlp, hooked).register_forward_hook(_scale_output)
    x = torch.randn(2, 5, 16, requires_grad=True)
    assert_bit_identical(grads(mlp, x, fused=True), grads(mlp, x, fused=False))


def test_a_global_module_hook_keeps_gradients_exact():
    torch.manual_seed(0)
    mlp = GatedMLP(bias=True)
    x = torch.randn(2, 5, 16, requires_grad=True)
    handle = nn.modules.module.register_module_forward_hook(
        lambda module, args, output: output * 1.5 if module is mlp.act_fn else None
    )
    try:
        assert_bit_identical(grads(mlp, x, fused=True), grads(mlp, x, fused=False))
    finally:
        handle.remove()


def test_modifying_the_kept_gate_in_place_raises():
    mlp = GatedMLP()
    x = torch.randn(2, 5, 16, requires_grad=True)
    gate, up = mlp.gate_proj(x), mlp.up_proj(x)
    out = gated_down(gate, up, mlp.act_fn, mlp.down_proj)
    with torch.no_grad():
        gate.add_(1.0)
    with pytest.raises(SavedTensorModifiedError, match="gated MLP"):
        out.sum().backward()


def test_activation_problem_accepts_activations_and_refuses_the_rest():
    assert activation_problem(SiLUActivation()) is None
    assert activation_problem(nn.GELU(approximate="tanh")) is None
    assert "in place" in activation_problem(nn.SiLU(inplace=True))
    assert "not a known" in activation_problem(nn.Linear(2, 2))
    assert "not a known" in activation_problem(nn.PReLU())

    class LearnedActivation(nn.Module):  # a zoo-style activation with a Parameter
        def __init__(self):
            super().__init__()
            self.beta = nn.Parameter(torch.ones(()))

        def forward(self, x):
            return x * torch.sigmoid(self.beta * x)

    assert "Parameters" in activation_problem(LearnedActivation())


def test_variants_rewrite_a_gated_mlp_keep_its_class_and_revert():
    torch.manual_seed(0)
    mlp = GatedMLP(bias=True)
    x = torch.randn(2, 5, 16, requires_grad=True)
    expected = torch.autograd.grad(weighted_sum(mlp(x)), [x, *mlp.parameters()])
    variant = RecomputedGatedMLP.from_module(mlp)
    assert isinstance(variant, GatedMLP) and "gated_down" in variant.core_code
    assert_bit_identical(torch.autograd.grad(weighted_sum(variant(x)), [x, *variant.parameters()]), expected)
    assert type(variant.to_module()) is GatedMLP
    approx = ApproxGatedMLP.from_module(mlp, bits=4, min_numel=0)
    assert cosine(torch.autograd.grad(weighted_sum(approx(x)), [x, *approx.parameters()]), expected) >= 0.99


def test_chunked_mlp_variant_is_bit_identical():
    torch.manual_seed(0)
    mlp = FusedGateUpMLP()
    x = torch.randn(2, 5, 16, requires_grad=True)
    expected = torch.autograd.grad(weighted_sum(mlp(x)), [x, *mlp.parameters()], allow_unused=True)
    variant = RecomputedGatedMLP.from_module(mlp)
    assert "gated_down" in variant.core_code
    actual = torch.autograd.grad(weighted_sum(variant(x)), [x, *variant.parameters()], allow_unused=True)
    for a, e in zip(actual, expected):
        assert (a is None) == (e is None)
        if a is not None:
            assert torch.equal(a, e)


def test_a_forward_without_a_gated_product_is_refused():
    from aalconvert.errors import ConversionError

    class NoGate(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.act = nn.Linear(4, 4), nn.SiLU()

        def forward(self, x):
            return self.act(self.fc(x))

    with pytest.raises(ConversionError, match="act\\(gate\\) \\* up"):
        RecomputedGatedMLP.from_module(NoGate())


@pytest.mark.parametrize("variant", ["recompute", "approx"])
def test_the_rewritten_forward_compiles_in_one_graph(variant):
    torch.manual_seed(0)
    mlp = GatedMLP(bias=True)
    x = torch.randn(2, 5, 16, requires_grad=True)
    expected = torch.autograd.grad(weighted_sum(mlp(x)), [x, *mlp.parameters()])
    converted = (RecomputedGatedMLP.from_module(mlp) if variant == "recompute"
                 else ApproxGatedMLP.from_module(mlp, bits=8, min_numel=0))
    torch._dynamo.reset()
    compiled = torch.compile(converted, backend="aot_eager", fullgraph=True)
    actual = torch.autograd.grad(weighted_sum(compiled(x)), [x, *converted.parameters()])
    if variant == "recompute":
        assert_bit_identical(actual, expected)
    else:
        assert cosine(actual, expected) >= 0.999

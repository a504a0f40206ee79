"""Variants of zoo transposed linears (transformers' GPT-2 Conv1D): ASA and approx, and the rules picking them."""

import io
import math

import pytest
import torch
import transformers
from transformers.activations import NewGELUActivation
from aalconvert.kernels import packed_nbytes, quantized_nbytes
from torch import nn
from transformers.pytorch_utils import Conv1D

import aalconvert
from aalconvert.errors import ConversionError
from aalconvert.memory import measure_saved
from aalconvert.nn import CONVERTED_TYPES
from aalconvert.nn.approx_common import compress, restore
from aalconvert.nn.approx_weighted import ApproxTransposedLinear
from aalconvert.nn.asa import ASATransposedLinear, pack_sign
from aalconvert.nn.recompute import RecomputedInputTransposedLinear
from aalconvert.nn.zoo_linear import is_transposed_linear

DTYPES = [(torch.float32, 1e-5), (torch.float16, 5e-3), (torch.bfloat16, 3e-2)]
INPUT_SHAPES = [(7,), (1, 7), (5, 7), (2, 3, 7), (2, 1, 3, 7)]
ASA_OPTIONS = [{}, {"eps": 0.05, "lr_expansion": 3.0, "variant": "relu"}]


def zoo_layer(nx: int = 7, nf: int = 5, dtype: torch.dtype = torch.float32) -> Conv1D:
    torch.manual_seed(0)
    layer = Conv1D(nf, nx)
    nn.init.normal_(layer.bias)
    return layer.to(dtype)


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, rel: float) -> None:
    """|actual - expected| <= rel * max|expected| (+ a floor for all-zero references)."""
    error = (actual.double() - expected.double()).abs().max().item()
    scale = expected.double().abs().max().item()
    assert error <= rel * scale + 1e-12, f"max error {error:.3g} vs scale {scale:.3g}"


def reference_sign(x: torch.Tensor, variant: str) -> torch.Tensor:
    """s of methods.md section 2: -1/+1 with x <= 0 -> -1, or 0/1 for the relu variant."""
    low = -1.0 if variant == "sign" else 0.0
    return torch.where(x > 0, torch.ones_like(x), torch.full_like(x, low))


def zoo_autograd(layer: Conv1D, x: torch.Tensor, g: torch.Tensor):
    """(y, dx, dW, db) of the zoo layer's own forward under torch autograd, at input ``x``."""
    x = x.detach().requires_grad_()
    weight, bias = layer.weight.detach().requires_grad_(), layer.bias.detach().requires_grad_()
    y = torch.addmm(bias, x.view(-1, x.size(-1)), weight).view(*x.shape[:-1], weight.shape[1])
    y.backward(g)
    return y.detach(), x.grad, weight.grad, bias.grad


# ------------------------------------------------------------------ detection


def test_detection_accepts_transformers_conv1d_and_refuses_lookalikes():
    assert is_transposed_linear(zoo_layer())
    assert not is_transposed_linear(nn.Linear(7, 5))

    class Conv1D(nn.Module):  # right name, wrong home: not a zoo layer
        def __init__(self):
            super().__init__()
            self.nf, self.weight, self.bias = 5, nn.Parameter(torch.ones(7, 5)), nn.Parameter(torch.ones(5))

    assert not is_transposed_linear(Conv1D())
    wrong_nf = zoo_layer()
    wrong_nf.nf = 7
    assert not is_transposed_linear(wrong_nf)
    no_bias = zoo_layer()
    no_bias.bias = None
    assert not is_transposed_linear(no_bias)
    with pytest.raises(ConversionError, match="bias has shape None"):
        ASATransposedLinear.from_module(no_bias)
    with pytest.raises(ConversionError, match="not a zoo Conv1D"):
        ApproxTransposedLinear.from_module(nn.Linear(7, 5))


def test_converting_a_variant_or_bad_options_is_refused():
    asa = ASATransposedLinear.from_module(zoo_layer())
    with pytest.raises(ConversionError, match="already converted"):
        ApproxTransposedLinear.from_module(asa)
    with pytest.raises(ConversionError, match="variant must be one of"):
        ASATransposedLinear.from_module(zoo_layer(), variant="tanh")
    with pytest.raises(ConversionError, match="bits must be one of"):
        ApproxTransposedLinear.from_module(zoo_layer(), bits=3)
    assert set(CONVERTED_TYPES) >= {ASATransposedLinear, ApproxTransposedLinear, RecomputedInputTransposedLinear}


# ------------------------------------------------------------------ ASA


@pytest.mark.parametrize("options", ASA_OPTIONS)
@pytest.mark.parametrize("shape", INPUT_SHAPES)
@pytest.mark.parametrize("dtype,rel", DTYPES)
def test_asa_transposed_linear_matches_formula_with_sign(options, shape, dtype, rel):
    layer = zoo_layer(dtype=dtype)
    asa = ASATransposedLinear.from_module(layer, **options)
    eps, lr_expansion, variant = asa.eps, asa.lr_expansion, asa.variant
    torch.manual_seed(1)
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    y = asa(x)
    g = torch.randn_like(y)
    y.backward(g)

    s = reference_sign(x.detach().double(), variant)
    w, b, g64 = layer.weight.detach().double(), layer.bias.detach().double(), g.double()
    assert_close_scaled(y, (x.detach().double() + eps * s) @ w + b, rel)
    assert_close_scaled(x.grad, g64 @ w.t(), rel)
    expected_dw = lr_expansion * eps * s.reshape(-1, 7).t() @ g64.reshape(-1, 5)
    assert layer.weight.grad.shape == (7, 5)
    assert_close_scaled(layer.weight.grad, expected_dw, rel)
    assert_close_scaled(layer.bias.grad, g64.reshape(-1, 5).sum(0), rel)


def test_asa_transposed_linear_dx_and_db_equal_zoo_autograd_at_the_perturbed_input():
    layer = zoo_layer(nx=33, nf=513)
    asa = ASATransposedLinear.from_module(layer)
    x = torch.randn(3, 7, 33, requires_grad=True)
    y = asa(x)
    g = torch.randn_like(y)
    y.backward(g)
    perturbed = x.detach() + 0.01 * reference_sign(x.detach(), "sign")
    y_ref, dx_ref, _, db_ref = zoo_autograd(layer, perturbed, g)
    assert torch.equal(y.detach(), y_ref)
    assert torch.equal(x.grad, dx_ref)
    assert torch.equal(layer.bias.grad, db_ref)


@pytest.mark.parametrize("shape", [(1, 7), (3, 5, 7), (513, 7)])
def test_asa_transposed_linear_keeps_one_bit_per_input_element(shape):
    asa = ASATransposedLinear.from_module(zoo_layer())
    x = torch.randn(shape, requires_grad=True)
    saved = measure_saved(lambda: asa(x), asa.parameters())
    assert saved.nbytes == math.ceil(x.numel() / 8) == packed_nbytes(x.numel())


def test_asa_transposed_linear_uses_a_shared_packed_sign_and_eval_forward_is_the_same():
    asa = ASATransposedLinear.from_module(zoo_layer())
    x = torch.randn(4, 7, requires_grad=True)
    packed = pack_sign(x)
    saved = measure_saved(lambda: asa(x, packed_sign=packed), asa.parameters())
    assert set(saved.storages) == {packed.untyped_storage().data_ptr()}
    with torch.no_grad():
        assert torch.equal(asa(x), saved.output.detach())
    with pytest.raises(ConversionError, match="pass pack_sign"):
        asa(x, packed_sign=pack_sign(torch.randn(5, 7)))


# ------------------------------------------------------------------ approx


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_approx_transposed_linear_forward_is_bit_identical_to_the_zoo_layer(dtype):
    layer = zoo_layer(nx=14, nf=513, dtype=dtype)
    approx = ApproxTransposedLinear.from_module(layer, bits=4, min_numel=0)
    inputs = [
        torch.randn(14, dtype=dtype),
        torch.randn(2, 3, 14, dtype=dtype),
        torch.randn(2, 3, 28, dtype=dtype)[..., ::2],  # strided: F.linear(x, W.t()) differs here
        torch.randn(14, 2, 3, dtype=dtype).permute(1, 2, 0),  # column-major rows
    ]
    for x in inputs:
        expected = layer(x)
        assert torch.equal(approx(x.requires_grad_()), expected)
        with torch.no_grad():
            assert torch.equal(approx(x), expected)


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("shape", [(1, 64), (3, 7, 64), (513, 64)])
def test_approx_transposed_linear_gradients_equal_autograd_at_the_dequantized_input(bits, shape):
    layer = zoo_layer(nx=64, nf=5)
    approx = ApproxTransposedLinear.from_module(layer, bits=bits, group_size=64, min_numel=0)
    torch.manual_seed(2)
    x = torch.randn(shape, requires_grad=True)
    y = approx(x)
    g = torch.randn_like(y)
    y.backward(g)

    decoded = restore(*compress(x.detach(), approx.approx_options))  # what backward decodes
    assert not torch.equal(decoded, x.detach())
    _, _, dw_ref, _ = zoo_autograd(layer, decoded, g)
    y_ref, dx_ref, _, db_ref = zoo_autograd(layer, x, g)
    assert torch.equal(y.detach(), y_ref)
    assert_close_scaled(layer.weight.grad, dw_ref, 1e-6)
    assert torch.equal(x.grad, dx_ref)
    assert torch.equal(layer.bias.grad, db_ref)


def test_approx_transposed_linear_keeps_k_bits_and_small_inputs_exactly():
    approx = ApproxTransposedLinear.from_module(zoo_layer(nx=64), bits=4, group_size=64, min_numel=256)
    x = torch.randn(8, 64, requires_grad=True)
    saved = measure_saved(lambda: approx(x), approx.parameters())
    assert saved.nbytes == quantized_nbytes(x.numel(), 4, 64) < x.numel() * 4 / 4
    small = torch.randn(2, 64, requires_grad=True)  # 128 < min_numel: kept as it is
    saved = measure_saved(lambda: approx(small), approx.parameters())
    assert set(saved.storages) == {small.untyped_storage().data_ptr()}
    small.grad = None
    saved.output.sum().backward()
    assert torch.equal(small.grad, zoo_autograd(approx.to_module(), small, torch.ones(2, 5))[1])


def test_only_the_needed_gradients_are_computed_and_kept():
    layer = zoo_layer(nx=64)
    layer.weight.requires_grad_(False)
    approx = ApproxTransposedLinear.from_module(layer, min_numel=0)
    x = torch.randn(8, 64, requires_grad=True)
    saved = measure_saved(lambda: approx(x), approx.parameters())
    assert saved.nbytes == 0  # no dW: nothing of x kept (the weight is a Parameter)
    saved.output.sum().backward()
    assert layer.weight.grad is None and layer.bias.grad is not None
    assert torch.equal(x.grad, zoo_autograd(layer, x, torch.ones(8, 5))[1])


# ------------------------------------------------------------------ module identity


ZOO_VARIANTS = [ASATransposedLinear, ApproxTransposedLinear, RecomputedInputTransposedLinear]


@pytest.mark.parametrize("variant_cls", ZOO_VARIANTS)
def test_variant_shares_parameters_keys_and_reverts_to_the_zoo_class(variant_cls):
    layer = zoo_layer()
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    variant = variant_cls.from_module(layer)
    assert variant.weight is layer.weight and variant.bias is layer.bias
    assert list(variant.state_dict()) == list(layer.state_dict()) == ["weight", "bias"]
    assert "Conv1D, in_features=7, out_features=5" in repr(variant)

    before = layer.weight.detach().clone()
    variant(torch.randn(3, 7)).sum().backward()
    optimizer.step()
    assert not torch.equal(layer.weight, before)  # the optimizer built before conversion saw dW

    back = variant.to_module()
    assert type(back) is Conv1D and back.weight is layer.weight and back.bias is layer.bias
    assert (back.nf, back.nx) == (5, 7) and not hasattr(back, "zoo_class")
    x = torch.randn(2, 7)
    assert torch.equal(back(x), layer(x))


@pytest.mark.parametrize("variant_cls", ZOO_VARIANTS)
def test_converted_layer_survives_torch_save_and_load(variant_cls):
    variant = variant_cls.from_module(zoo_layer())
    buffer = io.BytesIO()
    torch.save(variant, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert type(loaded) is variant_cls and loaded.zoo_class is Conv1D
    x = torch.randn(4, 7)
    assert torch.equal(loaded(x), variant(x))
    assert type(loaded.to_module()) is Conv1D


# ------------------------------------------------------------------ GPT-2 through the rules


def test_gpt2_conv1d_layers_are_converted_by_asa_auto_approx4_and_recompute():
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=32,
        bos_token_id=0, eos_token_id=0,
    )
    ids = torch.randint(0, 100, (4, 32), generator=torch.Generator().manual_seed(0))

    def build() -> nn.Module:
        torch.manual_seed(0)
        return transformers.GPT2Model(config).train()

    def run(model: nn.Module):
        torch.manual_seed(3)
        return measure_saved(lambda: model(ids).last_hidden_state, model.parameters())

    bp_model = build()
    bp = run(bp_model)
    exact = run(aalconvert.convert(build(), "exact", example_inputs=(ids,)))  # every rule includes it
    conv_names = [name for name, m in bp_model.named_modules() if isinstance(m, Conv1D)]
    assert len(conv_names) == 8
    # inputs of the Conv1D layers: nothing else in GPT-2 keeps them, so ASA frees all of them
    input_bytes = 2 * 4 * 32 * (32 + 32 + 32 + 128) * 4
    packed_bytes = 2 * 4 * 32 * (32 + 32 + 32 + 128) // 8

    for rule, variant_cls in (("asa", ASATransposedLinear), ("auto", ASATransposedLinear),
                              ("approx4", ApproxTransposedLinear)):
        model = aalconvert.convert(build(), rule, example_inputs=(ids,))
        # under approx4, the layers after a LayerNorm or NewGELUActivation share its k-bit copy (a
        # recompute variant); under auto, they keep nothing (recompute, exact) rather than ASA's
        # 1-bit sign; attn.c_proj (after the attention's matmul) stays ASA's
        chained = [n for n in conv_names
                   if rule in ("approx4", "auto") and n.endswith(("c_attn", "c_fc", "mlp.c_proj"))]
        assert all(type(model.get_submodule(name)) is RecomputedInputTransposedLinear for name in chained)
        assert all(type(model.get_submodule(name)) is variant_cls
                   for name in conv_names if name not in chained), rule
        assert list(model.state_dict()) == list(bp_model.state_dict())
        saved = run(model)
        saved.output.pow(2).mean().backward()
        assert all(p.grad is not None for p in model.parameters())
        if rule == "asa":
            assert saved.nbytes == exact.nbytes - input_bytes + packed_bytes
        elif rule == "auto":
            assert saved.nbytes <= exact.nbytes - input_bytes + packed_bytes
        else:
            assert torch.equal(saved.output.detach(), bp.output.detach())  # exact forward
            assert saved.nbytes < bp.nbytes
        reverted = aalconvert.revert(model)
        assert all(type(reverted.get_submodule(name)) is Conv1D for name in conv_names)

    bp.output.pow(2).mean().backward()
    model = aalconvert.convert(build(), "recompute", example_inputs=(ids,))
    # mlp.c_proj reads NewGELUActivation's output, traced through (no graph leaf): it rebuilds it too
    chained = [name for name in conv_names if name.endswith(("c_attn", "c_fc", "mlp.c_proj"))]
    assert all(type(model.get_submodule(name)) is RecomputedInputTransposedLinear for name in chained)
    saved = run(model)
    saved.output.pow(2).mean().backward()
    assert torch.equal(saved.output.detach(), bp.output.detach())
    for (name, p), (_, p_bp) in zip(model.named_parameters(), bp_model.named_parameters()):
        assert torch.equal(p.grad, p_bp.grad), name
    # Not kept any more, per layer: two layer-norm outputs, the GELU output, and what
    # NewGELUActivation's ops keep beyond their input (its variant keeps the input only,
    # aalconvert.nn.zoo_pointwise).
    gelu_input = torch.randn(4, 32, 128, requires_grad=True)
    gelu_extra = measure_saved(lambda: NewGELUActivation()(gelu_input)).nbytes - gelu_input.numel() * 4
    assert gelu_extra > 0
    assert saved.nbytes == exact.nbytes - 2 * (2 * 4 * 32 * 32 * 4 + 4 * 32 * 128 * 4 + gelu_extra)


# ------------------------------------------------------------------ recompute


def recomputed_pair(dtype: torch.dtype = torch.float32, nx: int = 33, nf: int = 513):
    """(layer norm, zoo layer, its recompute variant reading the norm's input)."""
    norm = nn.LayerNorm(nx).to(dtype)
    layer = zoo_layer(nx=nx, nf=nf, dtype=dtype)
    return norm, layer, RecomputedInputTransposedLinear.from_module(layer, chain=(norm,))


@pytest.mark.parametrize("shape", [(33,), (1, 33), (3, 7, 33)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_recomputed_transposed_linear_is_bit_identical_to_the_zoo_layer(shape, dtype):
    norm, layer, recomputed = recomputed_pair(dtype)
    torch.manual_seed(4)
    z = torch.randn(shape, dtype=dtype, requires_grad=True)
    g = torch.randn(*shape[:-1], 513, dtype=dtype)
    results = []
    for module in (layer, recomputed):
        for p in (*norm.parameters(), *layer.parameters(), z):
            p.grad = None
        x = norm(z)
        y = module(x, z) if module is recomputed else module(x)
        y.backward(g)
        results.append([y.detach(), z.grad, layer.weight.grad, layer.bias.grad, norm.weight.grad])
    for plain, rebuilt in zip(*results):
        assert torch.equal(plain, rebuilt)


def test_recomputed_transposed_linear_keeps_only_the_norm_input_and_reverts():
    norm, layer, recomputed = recomputed_pair()
    z = torch.randn(4, 9, 33, requires_grad=True)
    params = [*norm.parameters(), *layer.parameters()]
    plain = measure_saved(lambda: layer(norm(z)), params)
    rebuilt = measure_saved(lambda: recomputed(norm(z), z), params)
    assert plain.nbytes - rebuilt.nbytes == z.numel() * 4  # the norm's output is no longer kept
    assert "Conv1D, in_features=33, out_features=513" in repr(recomputed)
    assert type(recomputed.to_module()) is Conv1D and recomputed.to_module().weight is layer.weight

"""Recomputed-input layers: bit-identical to the plain chain + layer, keeping only the chain input.

Every check runs a plain torch pipeline ``z -> chain -> layer`` and an independent
deep copy of it converted with ``from_module`` + ``layer(x, z)``, and compares
outputs, every gradient (chain input, layer and norm parameters) and running stats.
"""

import copy
import math

import pytest
import torch
from torch import nn

from aalconvert.errors import ConversionError, SavedTensorModifiedError
from aalconvert.memory import measure_saved
from aalconvert.nn.lossless import MaskReLU
from aalconvert.nn.recompute import (
    RecomputedInputConv1d,
    RecomputedInputConv2d,
    RecomputedInputConv3d,
    RecomputedInputLinear,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
_BITS_DTYPE = {
    torch.float64: torch.int64,
    torch.float32: torch.int32,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
}
VARIANT_OF = {
    nn.Linear: RecomputedInputLinear,
    nn.Conv1d: RecomputedInputConv1d,
    nn.Conv2d: RecomputedInputConv2d,
    nn.Conv3d: RecomputedInputConv3d,
}


def assert_bit_identical(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    bits = _BITS_DTYPE[actual.dtype]
    assert torch.equal(actual.contiguous().view(bits), expected.contiguous().view(bits))


class Pipeline(nn.Module):
    """z -> chain modules -> layer, registered as children like a traced model would."""

    def __init__(self, chain, layer):
        super().__init__()
        self.chain = nn.ModuleList(chain)
        self.layer = layer

    def forward(self, z):
        x = z
        for module in self.chain:
            x = module(x)
        if isinstance(self.layer, tuple(VARIANT_OF.values())):
            return self.layer(x, z)
        return self.layer(x)


def convert(pipeline: Pipeline, mask_relu: bool = False) -> Pipeline:
    converted = copy.deepcopy(pipeline)
    if mask_relu:
        for i, module in enumerate(converted.chain):
            if type(module) is nn.ReLU:
                converted.chain[i] = MaskReLU.from_module(module)
    layer = converted.layer
    converted.layer = VARIANT_OF[type(layer)].from_module(layer, chain=tuple(converted.chain))
    return converted


def randomize(pipeline: Pipeline, seed: int = 0) -> Pipeline:
    """Non-trivial norm affine parameters, so their gradients are checked for real."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in pipeline.chain.parameters():
            param.copy_(torch.rand(param.shape, generator=generator) + 0.5)
    return pipeline


def run(pipeline: Pipeline, z: torch.Tensor, seed: int = 1):
    leaf = z.detach().clone(memory_format=torch.preserve_format).requires_grad_()
    y = pipeline(leaf)
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(y.dtype)
    y.backward(grad)
    grads = {name: p.grad for name, p in pipeline.named_parameters()}
    buffers = dict(pipeline.named_buffers())
    return y.detach(), leaf.grad, grads, buffers


def assert_same_run(plain: Pipeline, z: torch.Tensor, mask_relu: bool = False):
    converted = convert(plain, mask_relu)
    expected = run(plain, z)
    actual = run(converted, z)
    assert_bit_identical(actual[0], expected[0])
    assert_bit_identical(actual[1], expected[1])
    assert actual[2].keys() == expected[2].keys()
    for name in expected[2]:
        assert expected[2][name] is not None, name
        assert_bit_identical(actual[2][name], expected[2][name])
    for name in expected[3]:  # running stats updated once, exactly as in the forward
        assert torch.equal(actual[3][name], expected[3][name]), name
    return actual


def make(shape, dtype, channels_last=False, seed=0):
    z = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
    if channels_last:
        z = z.to(memory_format=torch.channels_last_3d if z.dim() == 5 else torch.channels_last)
    return z


# ------------------------------------------------------------------------ conv


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("mask_relu", [False, True])
def test_bn_relu_conv2d_bit_identical(dtype, training, channels_last, mask_relu):
    torch.manual_seed(0)
    plain = Pipeline([nn.BatchNorm2d(6), nn.ReLU(inplace=True)], nn.Conv2d(6, 5, 3, padding=1))
    plain = randomize(plain).to(dtype).train(training)
    assert_same_run(plain, make((3, 6, 7, 9), dtype, channels_last), mask_relu)


CONV_CASES = [
    (nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=2, groups=2), (2, 4, 9, 8)),
    (nn.Conv2d(4, 2, 3, padding="same", dilation=(2, 1)), (1, 4, 6, 6)),
    (nn.Conv2d(4, 4, (1, 3), padding="same", bias=False), (1, 4, 5, 7)),
    (nn.Conv2d(4, 3, (1, 2), padding="valid"), (2, 4, 1, 5)),
    (nn.Conv2d(4, 3, 3, stride=(2, 1)), (4, 7, 13)),  # unbatched input
]


@pytest.mark.parametrize("case", range(len(CONV_CASES)))
@pytest.mark.parametrize("dtype", DTYPES)
def test_gelu_conv2d_awkward_geometry_bit_identical(case, dtype):
    torch.manual_seed(case)
    conv, shape = CONV_CASES[case]
    plain = Pipeline([nn.GELU()], copy.deepcopy(conv)).to(dtype)
    assert_same_run(plain, make(shape, dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_groupnorm_silu_conv1d_bit_identical(dtype):
    torch.manual_seed(0)
    plain = Pipeline([nn.GroupNorm(2, 4), nn.SiLU()], nn.Conv1d(4, 3, 5, padding=2))
    assert_same_run(randomize(plain).to(dtype), make((3, 4, 513), dtype))


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_bn3d_relu_conv3d_bit_identical(training, channels_last):
    torch.manual_seed(0)
    plain = Pipeline([nn.BatchNorm3d(3), nn.ReLU()], nn.Conv3d(3, 2, 3, padding=1))
    z = make((2, 3, 4, 5, 3), torch.float32, channels_last)
    assert_same_run(randomize(plain).train(training), z)


# ---------------------------------------------------------------------- linear

LINEAR_INPUTS = {
    "2d": lambda dtype: make((7, 16), dtype),
    "3d": lambda dtype: make((2, 5, 16), dtype),
    "4d": lambda dtype: make((2, 1, 3, 16), dtype),
    "1d": lambda dtype: make((16,), dtype),
    "2d_column_major": lambda dtype: make((16, 7), dtype).t(),
    "3d_not_contiguous": lambda dtype: make((5, 2, 16), dtype).transpose(0, 1),
    "1d_strided": lambda dtype: make((32,), dtype)[::2],
}


@pytest.mark.parametrize("layout", LINEAR_INPUTS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gelu_linear_bit_identical_for_every_input_layout(layout, bias, dtype):
    # GELU keeps its input's layout, so each layout reaches the Linear as it is.
    torch.manual_seed(0)
    plain = Pipeline([nn.GELU()], nn.Linear(16, 9, bias=bias)).to(dtype)
    assert_same_run(plain, LINEAR_INPUTS[layout](dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 16), (2, 513, 16), (16,)])
def test_layernorm_linear_bit_identical(dtype, shape):
    torch.manual_seed(0)
    plain = randomize(Pipeline([nn.LayerNorm(16)], nn.Linear(16, 7))).to(dtype)
    assert_same_run(plain, make(shape, dtype))


def test_layernorm_linear_under_cpu_autocast_bit_identical():
    torch.manual_seed(0)
    plain = randomize(Pipeline([nn.LayerNorm(16), nn.GELU()], nn.Linear(16, 8)))
    converted = convert(plain)
    results = []
    for pipeline in (plain, converted):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results.append(run(pipeline, make((3, 5, 16), torch.float32)))
    (y_ref, dz_ref, g_ref, _), (y, dz, g, _) = results
    assert y.dtype == torch.bfloat16
    assert_bit_identical(y, y_ref)
    assert_bit_identical(dz, dz_ref)
    for name in g_ref:
        assert_bit_identical(g[name], g_ref[name])


def test_no_grad_and_frozen_weight_run_the_plain_layer():
    torch.manual_seed(0)
    plain = Pipeline([nn.GELU()], nn.Linear(16, 4))
    converted = convert(plain)
    z = make((3, 16), torch.float32)
    with torch.no_grad():
        assert torch.equal(converted(z), plain(z))
    converted.layer.weight.requires_grad_(False)
    plain.layer.weight.requires_grad_(False)
    assert_bit_identical(run(converted, z)[1], run(plain, z)[1])


# -------------------------------------------------------------------- gradcheck


def test_bn_relu_conv2d_gradcheck_float64():
    torch.manual_seed(0)
    bn, conv = nn.BatchNorm2d(2).double(), nn.Conv2d(2, 3, 3, padding=1).double()
    layer = RecomputedInputConv2d.from_module(conv, chain=(bn, MaskReLU()))
    z = torch.randn(2, 2, 4, 4, dtype=torch.float64, requires_grad=True)

    def f(z, bn_weight, weight, bias):
        return layer(torch.relu(bn(z)), z)

    assert torch.autograd.gradcheck(f, (z, bn.weight, conv.weight, conv.bias))


@pytest.mark.parametrize("shape", [(3, 6), (2, 3, 6), (6,)])
def test_layernorm_linear_gradcheck_float64(shape):
    torch.manual_seed(0)
    norm, linear = nn.LayerNorm(6).double(), nn.Linear(6, 4).double()
    layer = RecomputedInputLinear.from_module(linear, chain=(norm,))
    z = torch.randn(shape, dtype=torch.float64, requires_grad=True)

    def f(z, norm_weight, weight, bias):
        return layer(norm(z), z)

    assert torch.autograd.gradcheck(f, (z, norm.weight, linear.weight, linear.bias))


def test_groupnorm_silu_conv1d_and_gelu_conv3d_gradcheck_float64():
    torch.manual_seed(0)
    for chain, conv, shape in [
        ((nn.GroupNorm(1, 2), nn.SiLU()), nn.Conv1d(2, 2, 3, stride=2), (2, 2, 7)),
        ((nn.GELU(),), nn.Conv3d(2, 1, 2, bias=False), (1, 2, 3, 3, 3)),
    ]:
        chain = tuple(m.double() for m in chain)
        conv = conv.double()
        layer = VARIANT_OF[type(conv)].from_module(conv, chain=chain)
        z = torch.randn(shape, dtype=torch.float64, requires_grad=True)

        def f(z, weight):
            x = z
            for module in chain:
                x = module(x)
            return layer(x, z)

        assert torch.autograd.gradcheck(f, (z, conv.weight))


# ----------------------------------------------------------------------- memory


def saved_bytes(pipeline: Pipeline, z: torch.Tensor) -> int:
    excluded = list(pipeline.parameters()) + list(pipeline.buffers())
    return measure_saved(lambda: pipeline(z), exclude=excluded).nbytes


def test_bn_mask_relu_conv_keeps_bn_tensors_plus_mask_only():
    torch.manual_seed(0)
    z = torch.randn(2, 8, 9, 7, requires_grad=True)
    plain = Pipeline([nn.BatchNorm2d(8), nn.ReLU()], nn.Conv2d(8, 4, 3))
    bn_only = saved_bytes(Pipeline([plain.chain[0]], nn.Identity()), z)
    assert saved_bytes(plain, z) == bn_only + 4 * z.numel()  # BP keeps the ReLU output
    converted = convert(plain, mask_relu=True)
    assert saved_bytes(converted, z) == bn_only + math.ceil(z.numel() / 8)


@pytest.mark.parametrize("chain", [lambda: nn.LayerNorm(16), lambda: nn.GELU()])
def test_norm_or_gelu_linear_keeps_only_what_the_chain_keeps(chain):
    torch.manual_seed(0)
    z = torch.randn(3, 5, 16, requires_grad=True)
    plain = Pipeline([chain()], nn.Linear(16, 8))
    chain_only = saved_bytes(Pipeline([plain.chain[0]], nn.Identity()), z)
    assert saved_bytes(plain, z) == chain_only + 4 * z.numel()
    assert saved_bytes(convert(plain), z) == chain_only


# -------------------------------------------------------------- in-place errors


def test_chain_input_modified_in_place_raises_saved_tensor_modified_error():
    torch.manual_seed(0)
    converted = convert(Pipeline([nn.BatchNorm2d(3), nn.ReLU()], nn.Conv2d(3, 2, 1)))
    z = torch.randn(2, 3, 4, 4, requires_grad=True) * 1
    y = converted(z)
    with torch.no_grad():
        z.mul_(2)
    with pytest.raises(SavedTensorModifiedError, match="chain input"):
        y.sum().backward()


def test_weight_modified_in_place_raises_saved_tensor_modified_error_naming_it():
    torch.manual_seed(0)
    converted = convert(Pipeline([nn.GELU()], nn.Linear(5, 3)))
    y = converted(torch.randn(4, 5, requires_grad=True))
    with torch.no_grad():
        converted.layer.weight.add_(1)
    with pytest.raises(SavedTensorModifiedError, match="the weight"):
        y.sum().backward()


def test_layer_input_modified_in_place_after_forward_keeps_gradient_right():
    torch.manual_seed(0)
    plain = Pipeline([nn.GELU()], nn.Linear(5, 3))
    converted = convert(plain)
    z = torch.randn(4, 5)
    leaf_ref, leaf = z.clone().requires_grad_(), z.clone().requires_grad_()
    plain(leaf_ref).sum().backward()
    x = converted.chain[0](leaf)
    y = converted.layer(x, leaf)
    x.mul_(0)  # plain nn.Linear keeps x and would refuse this backward
    y.sum().backward()
    assert torch.equal(leaf.grad, leaf_ref.grad)
    assert torch.equal(converted.layer.weight.grad, plain.layer.weight.grad)


# ------------------------------------------------------------------- conversion


@pytest.mark.parametrize(
    "plain_layer",
    [nn.Linear(4, 3), nn.Conv1d(2, 3, 1), nn.Conv2d(2, 3, 3, bias=False), nn.Conv3d(2, 1, 1)],
)
def test_from_module_shares_parameters_and_state_dict_keys_round_trip(plain_layer):
    chain = (nn.GELU(),)
    model = nn.Sequential(chain[0], plain_layer)
    keys_before = list(model.state_dict().keys())
    converted = VARIANT_OF[type(plain_layer)].from_module(plain_layer, chain=chain)
    assert isinstance(converted, type(plain_layer))
    assert converted.weight is plain_layer.weight and converted.bias is plain_layer.bias
    assert list(converted.children()) == []  # the chain is not registered a second time
    model[1] = converted
    assert list(model.state_dict().keys()) == keys_before
    assert [id(p) for p in model.parameters()] == [id(p) for p in plain_layer.parameters()]
    back = converted.to_module()
    assert type(back) is type(plain_layer) and not hasattr(back, "chain")
    assert back.weight is plain_layer.weight and back.bias is plain_layer.bias
    assert repr(back) == repr(plain_layer)
    assert "chain=GELU" in repr(converted)


def test_from_module_keeps_forward_hooks():
    linear = nn.Linear(4, 2)
    calls = []
    linear.register_forward_hook(lambda module, args, out: calls.append(type(module).__name__))
    converted = RecomputedInputLinear.from_module(linear, chain=(nn.ReLU(),))
    converted(torch.relu(torch.randn(3, 4)), torch.randn(3, 4))
    assert calls == ["RecomputedInputLinear"]


@pytest.mark.parametrize(
    "conv, message",
    [
        (nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"), "padding_mode='reflect'"),
        (nn.Conv2d(2, 2, 2, padding="same"), "padding='same'"),
    ],
)
def test_from_module_refuses_conv_settings_it_cannot_mirror(conv, message):
    with pytest.raises(ConversionError, match=message):
        RecomputedInputConv2d.from_module(conv)


def test_set_chain_refuses_an_in_place_first_module():
    layer = RecomputedInputLinear.from_module(nn.Linear(4, 2))
    with pytest.raises(ConversionError, match="in place"):
        layer.set_chain(nn.ReLU(inplace=True))


def test_set_chain_refuses_modules_that_cannot_be_rebuilt():
    layer = RecomputedInputLinear.from_module(nn.Linear(4, 2))
    with pytest.raises(ConversionError, match="Dropout, which cannot be rebuilt"):
        layer.set_chain(nn.LayerNorm(4), nn.Dropout(0.1))


def test_chain_input_without_chain_is_refused():
    layer = RecomputedInputLinear.from_module(nn.Linear(4, 2))
    with pytest.raises(ConversionError, match="call set_chain"):
        layer(torch.randn(3, 4), torch.randn(3, 4))


def test_chain_that_does_not_produce_the_input_is_reported_in_backward():
    layer = RecomputedInputLinear.from_module(nn.Linear(4, 2), chain=(nn.GELU(),))
    x = torch.randn(3, 4, requires_grad=True)
    y = layer(x, torch.randn(6, 4))
    with pytest.raises(ConversionError, match="does not produce this layer's input"):
        y.sum().backward()


class _CountingLayerNorm(nn.LayerNorm):
    calls = 0

    def forward(self, x):
        type(self).calls += 1
        return super().forward(x)


class ThreeReaders(nn.Module):
    """A Llama/BERT attention's q, k and v reading one norm's output, each rebuilding it."""

    def __init__(self, converted: bool):
        super().__init__()
        self.norm = _CountingLayerNorm(6)
        self.q, self.k, self.v = (nn.Linear(6, 6) for _ in range(3))
        if converted:
            for name in ("q", "k", "v"):
                setattr(self, name, RecomputedInputLinear.from_module(getattr(self, name), chain=(self.norm,)))

    def forward(self, z):
        x = self.norm(z)
        if isinstance(self.q, RecomputedInputLinear):
            return self.q(x, z) * self.k(x, z) + self.v(x, z)
        return self.q(x) * self.k(x) + self.v(x)


def randomize_norm(model: ThreeReaders) -> ThreeReaders:
    with torch.no_grad():
        model.norm.weight.uniform_(0.5, 1.5)
        model.norm.bias.uniform_(-0.5, 0.5)
    return model


@pytest.mark.parametrize("backwards", [1, 2])
def test_layers_reading_one_chain_output_rebuild_it_once_with_bit_identical_gradients(backwards):
    torch.manual_seed(0)
    plain = randomize_norm(ThreeReaders(converted=False))
    converted = ThreeReaders(converted=True)
    converted.load_state_dict(plain.state_dict())
    z = torch.randn(4, 5, 6)
    grads = {}
    for name, model in (("plain", plain), ("converted", converted)):
        leaf = z.clone().requires_grad_()
        out = model(leaf)
        _CountingLayerNorm.calls = 0
        for _ in range(backwards):  # a second backward through the retained graph rebuilds again
            out.backward(torch.ones_like(out), retain_graph=True)
        grads[name] = (_CountingLayerNorm.calls, leaf.grad, [p.grad for p in model.parameters()])
    assert grads["plain"][0] == 0 and grads["converted"][0] == backwards  # one rebuild for q, k and v
    assert_bit_identical(grads["converted"][1], grads["plain"][1])
    for actual, expected in zip(grads["converted"][2], grads["plain"][2]):
        assert_bit_identical(actual, expected)


def test_second_order_gradients_through_shared_readers_match_bp():
    torch.manual_seed(0)
    plain = randomize_norm(ThreeReaders(converted=False)).double()
    converted = ThreeReaders(converted=True).double()
    converted.load_state_dict(plain.state_dict())
    z = torch.randn(3, 6, dtype=torch.float64)
    results = []
    for model in (plain, converted):
        leaf = z.clone().requires_grad_()
        (grad,) = torch.autograd.grad(model(leaf).square().sum(), leaf, create_graph=True)
        results.append(torch.autograd.grad(grad.square().sum(), list(model.parameters())))
    for actual, expected in zip(results[1], results[0]):
        torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)

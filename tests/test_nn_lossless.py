"""Lossless variants: forward and gradients bit-identical to torch, and the bytes they keep.

Reference for every check is the plain torch module run on a clone of the same input.
"""

import math

import pytest
import torch
from torch import nn

from aalconvert.errors import ConversionError
from aalconvert.memory import measure_saved
from hypothesis import given, settings
from hypothesis import strategies as st

from aalconvert.nn.lossless import (
    CompactMaxPool2d,
    MaskDropout,
    MaskHardtanh,
    MaskLeakyReLU,
    MaskReLU,
    MaskReLU6,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
_BITS_DTYPE = {
    torch.float64: torch.int64,
    torch.float32: torch.int32,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
}


def assert_bit_identical(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Same dtype, shape and bits (so NaN == NaN and -0.0 != +0.0)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    bits = _BITS_DTYPE[actual.dtype]
    assert torch.equal(actual.contiguous().view(bits), expected.contiguous().view(bits))


def make_input(shape, dtype, channels_last=False, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator).to(dtype)
    if x.numel() > 2:
        x.view(-1)[::5] = 0.0  # exact zeros sit on the ReLU kink
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    return x


def forward_backward(module, x, grad_seed=1, rng_seed=None):
    """Output and input gradient of module(x) for a fixed upstream gradient."""
    leaf = x.detach().clone(memory_format=torch.preserve_format).requires_grad_()
    if rng_seed is not None:
        torch.manual_seed(rng_seed)
    y = module(leaf * 1)  # a non-leaf input, so in-place modules are allowed
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(grad_seed)).to(y.dtype)
    y.backward(grad)
    return y.detach(), leaf.grad


SHAPES = [(1,), (7,), (513,), (3, 1, 5), (2, 3, 5, 7)]


# --------------------------------------------------------------------------- ReLU


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("inplace", [False, True])
def test_mask_relu_forward_and_grad_bit_identical_to_relu(dtype, shape, inplace):
    x = make_input(shape, dtype)
    expected = forward_backward(nn.ReLU(inplace=inplace), x)
    actual = forward_backward(MaskReLU(inplace=inplace), x)
    for a, e in zip(actual, expected):
        assert_bit_identical(a, e)


@pytest.mark.parametrize("dtype", DTYPES)
def test_mask_relu_channels_last_keeps_layout_and_bits(dtype):
    x = make_input((2, 5, 3, 7), dtype, channels_last=True)
    y_ref, g_ref = forward_backward(nn.ReLU(), x)
    y, g = forward_backward(MaskReLU(), x)
    assert_bit_identical(y, y_ref)
    assert_bit_identical(g, g_ref)
    assert y.stride() == y_ref.stride()


def test_mask_relu_nan_and_infinite_gradients_match_relu():
    x = torch.tensor([float("nan"), -1.0, 0.0, -0.0, 2.0, float("inf"), float("-inf")])
    grad = torch.tensor([1.0, float("inf"), float("nan"), -0.0, -0.0, 3.0, float("nan")])
    results = []
    for module in (nn.ReLU(), MaskReLU()):
        leaf = x.clone().requires_grad_()
        y = module(leaf)
        y.backward(grad)
        results.append((y.detach(), leaf.grad))
    for a, e in zip(*results):
        assert_bit_identical(a, e)


def test_mask_relu_inplace_modifies_its_input_like_relu():
    h = torch.randn(4, 9).requires_grad_() * 1
    y = MaskReLU(inplace=True)(h)
    assert y.data_ptr() == h.data_ptr()
    assert torch.equal(h, torch.relu(h.detach()))


def test_mask_relu_gradcheck_float64():
    x = torch.randn(3, 4, 5, dtype=torch.float64)
    x = (x + x.sign() * 0.1).requires_grad_()  # away from the kink
    assert torch.autograd.gradcheck(MaskReLU(), (x,))


@pytest.mark.parametrize("numel", [1, 7, 8, 513])
def test_mask_relu_keeps_one_bit_per_element(numel):
    x = torch.randn(numel, requires_grad=True)
    assert measure_saved(lambda: MaskReLU()(x)).nbytes == math.ceil(numel / 8)
    assert measure_saved(lambda: nn.ReLU()(x)).nbytes == 4 * numel


def test_mask_relu_output_modified_in_place_keeps_gradient_right():
    x = torch.randn(6, 5)
    leaf_ref, leaf = x.clone().requires_grad_(), x.clone().requires_grad_()
    (torch.relu(leaf_ref) * 3).sum().backward()
    y = MaskReLU()(leaf)
    y.mul_(3)
    y.sum().backward()
    assert torch.equal(leaf.grad, leaf_ref.grad)


def test_mask_relu_without_grad_is_plain_relu():
    x = torch.randn(5, 3)
    with torch.no_grad():
        assert torch.equal(MaskReLU()(x), torch.relu(x))


# ------------------------------------------------------------------------ Dropout


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_mask_dropout_same_draws_output_and_grad_as_dropout(dtype, shape, p):
    x = make_input(shape, dtype)
    expected = forward_backward(nn.Dropout(p), x, rng_seed=3)
    actual = forward_backward(MaskDropout(p), x, rng_seed=3)
    for a, e in zip(actual, expected):
        assert_bit_identical(a, e)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inplace", [False, True])
def test_mask_dropout_channels_last_and_inplace_bit_identical(dtype, inplace):
    x = make_input((2, 6, 5, 3), dtype, channels_last=True)
    y_ref, g_ref = forward_backward(nn.Dropout(0.3, inplace=inplace), x, rng_seed=7)
    y, g = forward_backward(MaskDropout(0.3, inplace=inplace), x, rng_seed=7)
    assert_bit_identical(y, y_ref)
    assert_bit_identical(g, g_ref)
    assert y.stride() == y_ref.stride()


@pytest.mark.parametrize("p", [0.0, 1.0])
def test_mask_dropout_edge_probabilities_match_dropout(p):
    x = make_input((4, 7), torch.float32)
    expected = forward_backward(nn.Dropout(p), x, rng_seed=0)
    actual = forward_backward(MaskDropout(p), x, rng_seed=0)
    for a, e in zip(actual, expected):
        assert_bit_identical(a, e)


def test_mask_dropout_eval_is_identity():
    x = torch.randn(3, 8, requires_grad=True)
    module = MaskDropout(0.5).eval()
    y = module(x)
    assert torch.equal(y, x)
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_mask_dropout_gradcheck_float64():
    x = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    module = MaskDropout(0.4)

    def seeded(t):
        torch.manual_seed(11)
        return module(t)

    assert torch.autograd.gradcheck(seeded, (x,))


@pytest.mark.parametrize("numel", [1, 9, 513])
def test_mask_dropout_keeps_one_bit_per_element(numel):
    x = torch.randn(numel, requires_grad=True)
    assert measure_saved(lambda: MaskDropout(0.5)(x)).nbytes == math.ceil(numel / 8)
    assert measure_saved(lambda: nn.Dropout(0.5)(x)).nbytes == 4 * numel


# ------------------------------------------------------------------------ MaxPool

POOL_CONFIGS = [
    dict(kernel_size=2),
    dict(kernel_size=3, stride=2, padding=1),
    dict(kernel_size=3, stride=2, padding=1, ceil_mode=True),
    dict(kernel_size=(2, 3), stride=(1, 2), padding=(1, 0), dilation=(2, 1), ceil_mode=True),
    dict(kernel_size=3, stride=1, padding=1),
    dict(kernel_size=1),
    dict(kernel_size=(16, 16), padding=8),
]


def tie_heavy_input(shape, dtype, channels_last=False):
    """Few distinct values, so windows hold ties that torch must break its own way."""
    x = torch.randint(0, 3, shape, generator=torch.Generator().manual_seed(5)).to(dtype)
    return x.to(memory_format=torch.channels_last) if channels_last else x


@pytest.mark.parametrize("config", POOL_CONFIGS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_compact_max_pool_bit_identical_with_ties(config, dtype, channels_last):
    x = tie_heavy_input((2, 3, 17, 19), dtype, channels_last)
    y_ref, g_ref = forward_backward(nn.MaxPool2d(**config), x)
    y, g = forward_backward(CompactMaxPool2d(**config), x)
    assert_bit_identical(y, y_ref)
    assert_bit_identical(g, g_ref)
    assert y.stride() == y_ref.stride() and g.stride() == g_ref.stride()


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (3, 7, 9), (1, 2, 13, 5)])
def test_compact_max_pool_awkward_shapes_bit_identical(shape):
    config = dict(kernel_size=3, stride=2, padding=1, ceil_mode=True)
    x = make_input(shape, torch.float32)
    expected = forward_backward(nn.MaxPool2d(**config), x)
    actual = forward_backward(CompactMaxPool2d(**config), x)
    for a, e in zip(actual, expected):
        assert_bit_identical(a, e)


def test_compact_max_pool_nan_picks_what_torch_picks():
    x = make_input((1, 2, 6, 6), torch.float32)
    x[0, 0, 1, 2] = float("nan")
    expected = forward_backward(nn.MaxPool2d(3, 1), x)
    actual = forward_backward(CompactMaxPool2d(3, 1), x)
    for a, e in zip(actual, expected):
        assert_bit_identical(a, e)


@pytest.mark.parametrize("config", POOL_CONFIGS[:4])
def test_compact_max_pool_gradcheck_float64(config):
    x = torch.randn(1, 2, 5, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(CompactMaxPool2d(**config), (x,))


def test_compact_max_pool_keeps_one_byte_per_output_element():
    x = torch.randn(2, 3, 17, 19, requires_grad=True)
    module = CompactMaxPool2d(3, 2, 1)
    saved = measure_saved(lambda: module(x))
    assert saved.nbytes == saved.output.numel()
    plain = measure_saved(lambda: nn.MaxPool2d(3, 2, 1)(x))
    assert plain.nbytes == 4 * x.numel() + 8 * plain.output.numel()


def test_compact_max_pool_refuses_window_over_256_elements():
    with pytest.raises(ConversionError, match="257-element window"):
        CompactMaxPool2d.from_module(nn.MaxPool2d((1, 257)))


def test_compact_max_pool_refuses_return_indices():
    with pytest.raises(ConversionError, match="return_indices=True"):
        CompactMaxPool2d.from_module(nn.MaxPool2d(2, return_indices=True))


def test_compact_max_pool_input_modified_in_place_keeps_gradient_right():
    x = torch.randn(1, 2, 6, 6)
    leaf_ref, leaf = x.clone().requires_grad_(), x.clone().requires_grad_()
    nn.MaxPool2d(2)(leaf_ref * 1).sum().backward()
    h = leaf * 1
    y = CompactMaxPool2d(2)(h)
    h.zero_()  # torch's max-pool keeps its input and would refuse this backward
    y.sum().backward()
    assert torch.equal(leaf.grad, leaf_ref.grad)


# --------------------------------------------------------------------- conversion

ROUND_TRIPS = [
    (MaskReLU, nn.ReLU(inplace=True)),
    (MaskReLU6, nn.ReLU6(inplace=True)),
    (MaskHardtanh, nn.Hardtanh(-0.5, 2.5, inplace=True)),
    (MaskLeakyReLU, nn.LeakyReLU(-0.3, inplace=True)),
    (MaskDropout, nn.Dropout(0.25, inplace=True)),
    (CompactMaxPool2d, nn.MaxPool2d((2, 3), (1, 2), (1, 0), (2, 1), ceil_mode=True)),
]


@pytest.mark.parametrize("variant, plain", ROUND_TRIPS)
@pytest.mark.parametrize("training", [True, False])
def test_from_module_and_to_module_round_trip_settings(variant, plain, training):
    plain.train(training)
    converted = variant.from_module(plain)
    assert isinstance(converted, type(plain))
    assert converted.training == training
    assert converted.state_dict().keys() == plain.state_dict().keys()
    back = converted.to_module()
    assert type(back) is type(plain) and back.training == training
    assert back.__dict__.keys() == plain.__dict__.keys()
    assert repr(back) == repr(plain)
    assert "keeps=" in repr(converted)


@pytest.mark.parametrize(
    "variant", [MaskReLU, MaskReLU6, MaskHardtanh, MaskLeakyReLU, MaskDropout, CompactMaxPool2d]
)
def test_from_module_refuses_other_module_types(variant):
    with pytest.raises(ConversionError, match="expects"):
        variant.from_module(nn.Identity())


# --------------------------------------------------------- ReLU6 / Hardtanh / LeakyReLU
#
# 1-bit variants whose backward runs torch's own hardtanh_backward / leaky_relu_backward
# on a stand-in rebuilt from the bits. Reference: the plain torch module, in place too.

PIECEWISE = [
    (lambda inplace: nn.ReLU6(inplace=inplace), MaskReLU6),
    (lambda inplace: nn.Hardtanh(inplace=inplace), MaskHardtanh),
    (lambda inplace: nn.Hardtanh(0.1, 0.3, inplace=inplace), MaskHardtanh),  # bounds round in bf16
    (lambda inplace: nn.Hardtanh(-7.5, -2.0, inplace=inplace), MaskHardtanh),
    (lambda inplace: nn.LeakyReLU(inplace=inplace), MaskLeakyReLU),
    (lambda inplace: nn.LeakyReLU(0.2, inplace=inplace), MaskLeakyReLU),
    (lambda inplace: nn.LeakyReLU(0.0, inplace=inplace), MaskLeakyReLU),
    (lambda inplace: nn.LeakyReLU(-0.5, inplace=inplace), MaskLeakyReLU),
    (lambda inplace: nn.LeakyReLU(3.0, inplace=inplace), MaskLeakyReLU),
]
PIECEWISE_IDS = ["relu6", "hardtanh", "hardtanh-0.1-0.3", "hardtanh-neg", "leaky", "leaky-0.2",
                 "leaky-0", "leaky-neg", "leaky-3"]
ALL_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _torch_refuses(plain: nn.Module) -> bool:
    """torch's in-place leaky_relu_ backward refuses a negative slope (ours gives the
    out-of-place gradient, checked separately)."""
    return isinstance(plain, nn.LeakyReLU) and plain.inplace and plain.negative_slope < 0


def special_values(numel: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Random values with NaN, +-inf, the kinks and bounds of every PIECEWISE module, and -0.0."""
    x = torch.randn(numel, generator=torch.Generator().manual_seed(seed)).mul_(5).to(dtype)
    specials = [math.nan, math.inf, -math.inf, 0.0, -0.0, 6.0, -6.0, 1.0, -1.0, 0.1, 0.3,
                -7.5, -2.0, 0.05]
    for offset, value in enumerate(specials):
        x[offset::len(specials) + 3] = value
    return x


def compare_with_torch(make, variant, x, grad) -> None:
    for inplace in (False, True):
        plain = make(inplace)
        if _torch_refuses(plain):
            continue
        results = []
        for module in (plain, variant.from_module(plain)):
            leaf = x.detach().clone(memory_format=torch.preserve_format).requires_grad_()
            y = module(leaf * 1)
            y.backward(grad)
            results.append((y.detach(), leaf.grad))
        (y_ref, g_ref), (y, g) = results
        assert_bit_identical(y, y_ref)
        assert_bit_identical(g, g_ref)
        assert y.stride() == y_ref.stride() and g.stride() == g_ref.stride()


@pytest.mark.parametrize("make, variant", PIECEWISE, ids=PIECEWISE_IDS)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("numel", [1, 17, 40, 100_003])  # scalar tail, vector loop, thread chunks
def test_piecewise_masks_bit_identical_on_nan_inf_bounds_and_signed_zeros(make, variant, dtype, numel):
    x = special_values(numel, dtype)
    grad = torch.randn(numel, generator=torch.Generator().manual_seed(1)).to(dtype)
    grad[::4] = -0.0
    grad[1::9] = math.nan
    compare_with_torch(make, variant, x, grad)


@pytest.mark.parametrize("make, variant", PIECEWISE, ids=PIECEWISE_IDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_piecewise_masks_channels_last_and_strided_inputs_keep_torch_strides(make, variant, dtype):
    x = special_values(2 * 6 * 5 * 7, dtype).view(2, 6, 5, 7).to(memory_format=torch.channels_last)
    grad = torch.randn(2, 6, 5, 7).to(dtype)
    compare_with_torch(make, variant, x, grad.to(memory_format=torch.channels_last))
    compare_with_torch(make, variant, x, grad)  # gradient in another layout than the input
    compare_with_torch(make, variant, x.transpose(1, 3), grad.transpose(1, 3))


@settings(max_examples=40, deadline=None)
@given(
    case=st.integers(0, len(PIECEWISE) - 1),
    shape=st.lists(st.integers(1, 9), min_size=1, max_size=4),
    scale=st.sampled_from([1e-3, 1.0, 7.0, 1e4]),
    dtype=st.sampled_from(ALL_DTYPES),
    seed=st.integers(0, 2**16),
)
def test_piecewise_masks_bit_identical_over_shapes_and_scales(case, shape, scale, dtype, seed):
    make, variant = PIECEWISE[case]
    generator = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=generator) * scale).to(dtype)
    grad = torch.randn(shape, generator=generator).to(dtype)
    compare_with_torch(make, variant, x, grad)


def test_inplace_leaky_relu_with_negative_slope_gives_the_out_of_place_gradient():
    x = special_values(101, torch.float32)
    grad = torch.randn(101)
    leaf_ref, leaf = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ref = nn.LeakyReLU(-0.5)(leaf_ref * 1)
    y_ref.backward(grad)
    h = leaf * 1
    y = MaskLeakyReLU(-0.5, inplace=True)(h)
    assert y.data_ptr() == h.data_ptr()
    y.backward(grad)
    assert_bit_identical(y.detach(), y_ref.detach())
    assert_bit_identical(leaf.grad, leaf_ref.grad)


@pytest.mark.parametrize("variant, plain", [(MaskReLU6, nn.ReLU6()), (MaskHardtanh, nn.Hardtanh(-2, 3)),
                                            (MaskLeakyReLU, nn.LeakyReLU(0.1))])
@pytest.mark.parametrize("numel", [1, 7, 8, 513])
def test_piecewise_masks_keep_one_bit_per_element(variant, plain, numel):
    x = (torch.randn(numel) * 4).requires_grad_()
    assert measure_saved(lambda: variant.from_module(plain)(x)).nbytes == math.ceil(numel / 8)
    assert measure_saved(lambda: plain(x)).nbytes == 4 * numel


def test_hardtanh_mask_keeps_the_positions_of_nan_inputs_on_cpu():
    """torch's CPU hardtanh_backward blocks NaN in its vector loop and passes it in the scalar
    tail; the stand-in carries NaN where the input had it (8 bytes per NaN, none without)."""
    x = torch.randn(1000)
    x[[3, 500, 999]] = math.nan
    x.requires_grad_()
    assert measure_saved(lambda: MaskReLU6()(x)).nbytes == 125 + 3 * 8
    assert measure_saved(lambda: MaskLeakyReLU()(x)).nbytes == 125


@pytest.mark.parametrize("module", [MaskReLU6(), MaskHardtanh(-1.5, 0.5), MaskLeakyReLU(0.3)])
def test_piecewise_masks_gradcheck_and_second_order_zeros_like_torch(module):
    x = torch.randn(3, 4, 5, dtype=torch.float64) * 3
    x = (x + x.sign() * 0.1).requires_grad_()
    assert torch.autograd.gradcheck(module, (x,))
    # A gradient penalty: torch's backward ops have a zero derivative in their saved input,
    # so the Parameters before the activation get zero (not None) second-order gradients.
    lin_ref = nn.Linear(5, 5).double()
    lin = nn.Linear(5, 5).double()
    lin.load_state_dict(lin_ref.state_dict())
    grads = []
    for layer, act in ((lin_ref, module.to_module()), (lin, module)):
        inp = x.detach().clone().requires_grad_()
        (g,) = torch.autograd.grad(act(layer(inp)).sum(), inp, create_graph=True)
        g.pow(2).sum().backward()
        grads.append((inp.grad, layer.weight.grad, layer.bias.grad))
    for a, e in zip(*grads):
        assert a is not None and torch.equal(a, e)


@pytest.mark.parametrize("module", [MaskReLU6(inplace=True), MaskHardtanh(), MaskLeakyReLU(0.3)])
def test_piecewise_masks_without_grad_or_under_torch_func_are_the_plain_op(module):
    x = torch.randn(5, 3) * 4
    plain = module.to_module()
    with torch.no_grad():
        assert torch.equal(module(x.clone()), plain(x.clone()))
    g = torch.func.grad(lambda t: module(t * 1).sum())(x)
    assert torch.equal(g, torch.func.grad(lambda t: plain(t * 1).sum())(x))


def test_piecewise_masks_keep_user_hooks_and_modified_outputs_keep_gradients_right():
    plain = nn.ReLU6()
    calls = []
    plain.register_forward_hook(lambda m, i, o: calls.append(type(m).__name__))
    converted = MaskReLU6.from_module(plain)
    x = special_values(30, torch.float32)
    leaf_ref, leaf = x.clone().requires_grad_(), x.clone().requires_grad_()
    (plain(leaf_ref) * 3).sum().backward()
    y = converted(leaf)
    y.mul_(3)  # our variant keeps no tensor the caller sees
    y.sum().backward()
    assert calls == ["ReLU6", "MaskReLU6"]
    assert torch.equal(leaf.grad, leaf_ref.grad)
    assert type(converted.to_module()) is nn.ReLU6

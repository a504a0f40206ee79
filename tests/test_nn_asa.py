"""ASA layers: forward on x + eps*s, dW from the 1-bit sign, exact dx and db, ceil(N/8) bytes kept."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import aalconvert.nn.asa as asa_module
from aalconvert.errors import ConversionError, SavedTensorModifiedError
from aalconvert.kernels import pack_bits
from aalconvert.memory import measure_saved
from aalconvert.nn.asa import (
    ASAConv1d,
    ASAConv2d,
    ASAFunction,
    ASALinear,
    ASASignPack,
    pack_sign,
)
from aalconvert.nn.weighted import WeightedGeometry

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")

# (dtype, relative tolerance against a float64 reference, scaled by the reference's largest entry)
DTYPES = [(torch.float32, 1e-5), (torch.float16, 5e-3), (torch.bfloat16, 3e-2)]
OPTIONS = [dict(), dict(eps=0.05, lr_expansion=3.0, variant="relu"), dict(variant="relu")]

CONV2D_CONFIGS = [
    dict(kernel_size=3, bias=False),
    dict(kernel_size=3, stride=2, padding=1),
    dict(kernel_size=(2, 3), padding="same", bias=False),
    dict(kernel_size=3, padding="valid", dilation=2, groups=2),
    dict(kernel_size=(3, 1), stride=(1, 2), padding=(2, 0), groups=4),
]
CONV1D_CONFIGS = [
    dict(kernel_size=3, stride=2, padding=1, bias=False),
    dict(kernel_size=4, padding="same"),
    dict(kernel_size=3, dilation=2, groups=2),
]
LINEAR_INPUT_SHAPES = [(7,), (1, 7), (5, 7), (2, 3, 7), (2, 1, 3, 7)]


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, rel: float) -> None:
    """|actual - expected| <= rel * max|expected| (+ a floor for all-zero references)."""
    error = (actual.double() - expected.double()).abs().max().item()
    scale = expected.double().abs().max().item()
    assert error <= rel * scale + 1e-12, f"max error {error:.3g} vs scale {scale:.3g}"


def reference_sign(x: torch.Tensor, variant: str) -> torch.Tensor:
    """s of methods.md section 2: -1/+1 with x <= 0 -> -1, or 0/1 for the relu variant."""
    low = -1.0 if variant == "sign" else 0.0
    return torch.where(x > 0, torch.ones_like(x), torch.full_like(x, low)).detach()


def reference_weight_grad(module: nn.Module, source: torch.Tensor, grad: torch.Tensor):
    """dW of ``module`` had its input been ``source``: conv1d/conv2d_weight or einsum, in float64."""
    grad, source = grad.double(), source.double()
    if isinstance(module, nn.Linear):
        return torch.einsum("...o,...i->oi", grad, source)
    weight_grad = torch.nn.grad.conv1d_weight if isinstance(module, nn.Conv1d) else torch.nn.grad.conv2d_weight
    if source.dim() == len(module.kernel_size) + 1:  # unbatched input
        grad, source = grad.unsqueeze(0), source.unsqueeze(0)
    padding = module.padding
    if padding == "same":  # torch pads the odd extra zero on the right
        dims = len(module.kernel_size)
        totals = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size)]
        right = [t % 2 for t in totals]
        source = F.pad(source, [p for extra in reversed(right) for p in (0, extra)])
        padding = tuple(t // 2 for t in totals)
        assert len(padding) == dims
    elif padding == "valid":
        padding = 0
    return weight_grad(source, module.weight.shape, grad, module.stride, padding,
                       module.dilation, module.groups)


def check_asa_layer(module, variant_cls, x, rel, options):
    """Forward = torch layer on x + eps*s; dx, db = autograd's; dW = lr_expansion*eps*formula(s)."""
    layer = variant_cls.from_module(module, **options)
    eps, lr_expansion = layer.eps, layer.lr_expansion
    sign = reference_sign(x, layer.variant)
    x_asa = x.clone().requires_grad_()
    y = layer(x_asa)
    with torch.no_grad():
        expected = module(x + eps * sign)
    assert_close_scaled(y, expected, rel)
    grad = torch.randn_like(y)
    y.backward(grad)
    dw, db = module.weight.grad.clone(), None if module.bias is None else module.bias.grad.clone()

    module.zero_grad(set_to_none=True)
    x_bp = x.clone().requires_grad_()
    module(x_bp + eps * sign).backward(grad)
    assert_close_scaled(x_asa.grad, x_bp.grad, rel)
    if module.bias is not None:
        assert_close_scaled(db, module.bias.grad, rel)
    else:
        assert db is None
    assert_close_scaled(dw, lr_expansion * eps * reference_weight_grad(module, sign, grad), rel)


@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("dtype, rel", DTYPES)
@pytest.mark.parametrize("shape", LINEAR_INPUT_SHAPES)
def test_asa_linear_forward_and_gradients_match_definition(shape, dtype, rel, options):
    torch.manual_seed(0)
    module = nn.Linear(7, 13, bias=len(shape) != 3).to(dtype)
    check_asa_layer(module, ASALinear, torch.randn(shape).to(dtype), rel, options)


@pytest.mark.parametrize("options", OPTIONS[:2])
@pytest.mark.parametrize("dtype, rel", DTYPES)
@pytest.mark.parametrize("config", CONV2D_CONFIGS)
def test_asa_conv2d_forward_and_gradients_match_definition(config, dtype, rel, options):
    torch.manual_seed(1)
    module = nn.Conv2d(4, 8, **config).to(dtype)
    check_asa_layer(module, ASAConv2d, torch.randn(3, 4, 7, 9).to(dtype), rel, options)


@pytest.mark.parametrize("options", OPTIONS[:2])
@pytest.mark.parametrize("dtype, rel", DTYPES)
@pytest.mark.parametrize("config", CONV1D_CONFIGS)
def test_asa_conv1d_forward_and_gradients_match_definition(config, dtype, rel, options):
    torch.manual_seed(2)
    module = nn.Conv1d(4, 8, **config).to(dtype)
    check_asa_layer(module, ASAConv1d, torch.randn(5, 4, 13).to(dtype), rel, options)


def test_asa_unbatched_conv_input_matches_definition():
    torch.manual_seed(3)
    check_asa_layer(nn.Conv2d(3, 4, 3, padding=1), ASAConv2d, torch.randn(3, 5, 6), 1e-5, {})


def test_asa_forward_is_the_same_in_eval_and_without_grad():
    torch.manual_seed(4)
    module = nn.Linear(9, 4)
    layer = ASALinear.from_module(module, eps=0.1)
    x = torch.randn(3, 9)
    train_out = layer(x)
    layer.eval()
    with torch.no_grad():
        eval_out = layer(x)
        expected = module(x + 0.1 * reference_sign(x, "sign"))
    torch.testing.assert_close(train_out.detach(), expected)
    torch.testing.assert_close(eval_out, expected)


def test_asa_input_and_bias_gradients_pass_gradcheck():
    torch.manual_seed(5)
    for module, shape in [(nn.Linear(5, 3), (2, 3, 5)),
                          (nn.Conv2d(2, 4, (2, 3), padding="same", groups=2), (2, 2, 4, 5))]:
        module = module.double()
        geometry = WeightedGeometry.of(module)
        x = torch.randn(shape, dtype=torch.float64)
        x = (x + 0.5 * x.sign()).requires_grad_()  # |x| >= 0.5: finite differences never flip s
        weight = module.weight.detach()
        bias = module.bias.detach().clone().requires_grad_()

        def asa(x, bias):
            return ASAFunction.apply(x, pack_sign(x), weight, bias, geometry, 0.01, 100.0, "sign", "t")

        assert torch.autograd.gradcheck(asa, (x, bias))


def captured_saved_tensors(forward):
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        forward()
    return saved


@pytest.mark.parametrize("shape", [(513,), (3, 7, 13), (1, 1, 9), (4, 512)])
def test_asa_linear_keeps_ceil_n_over_8_bytes_not_the_input(shape):
    torch.manual_seed(6)
    layer = ASALinear.from_module(nn.Linear(shape[-1], 5))
    x = torch.randn(shape, requires_grad=True)
    saved = measure_saved(lambda: layer(x), exclude=layer.parameters())
    assert saved.nbytes == math.ceil(x.numel() / 8)
    kept = [t for t in captured_saved_tensors(lambda: layer(x)) if t is not layer.weight]
    assert len(kept) == 1 and kept[0].dtype == torch.uint8
    assert torch.equal(kept[0], pack_bits(x.detach()))


def test_asa_conv2d_keeps_ceil_n_over_8_bytes():
    layer = ASAConv2d.from_module(nn.Conv2d(4, 6, 3, padding=1))
    x = torch.randn(3, 4, 7, 9, requires_grad=True)
    assert measure_saved(lambda: layer(x), exclude=layer.parameters()).nbytes == math.ceil(756 / 8)


def test_q_k_v_sharing_one_packed_mask_keep_it_once():
    torch.manual_seed(7)
    projections = [ASALinear.from_module(nn.Linear(16, 16)) for _ in range(3)]
    params = [p for layer in projections for p in layer.parameters()]
    x = torch.randn(2, 5, 16, requires_grad=True)
    mask_bytes = math.ceil(x.numel() / 8)
    sign_pack = ASASignPack()

    def shared():
        packed = sign_pack(x)
        return [layer(x, packed_sign=packed) for layer in projections]

    def unshared():
        return [layer(x) for layer in projections]

    assert measure_saved(shared, exclude=params).nbytes == mask_bytes
    assert measure_saved(unshared, exclude=params).nbytes == 3 * mask_bytes


def test_shared_mask_gives_the_same_gradients_as_own_masks_for_both_variants():
    torch.manual_seed(8)
    q = ASALinear.from_module(nn.Linear(6, 4), variant="sign")
    k = ASALinear.from_module(nn.Linear(6, 4), variant="relu")
    x = torch.randn(3, 6, requires_grad=True)
    packed = pack_sign(x)
    (q(x, packed_sign=packed) + k(x, packed_sign=packed)).sum().backward()
    shared = [t.grad.clone() for t in (x, q.weight, k.weight)]
    for t in (x, q.weight, k.weight):
        t.grad = None
    (q(x) + k(x)).sum().backward()
    assert all(torch.equal(a, t.grad) for a, t in zip(shared, (x, q.weight, k.weight)))


def test_forward_without_grad_does_not_pack(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("pack_bits called during a forward that keeps nothing")

    monkeypatch.setattr(asa_module, "pack_bits", forbidden)
    layer = ASAConv2d.from_module(nn.Conv2d(2, 3, 3))
    x = torch.randn(1, 2, 5, 5)
    with torch.no_grad():
        assert ASASignPack()(x) is None
        y = layer(x, packed_sign=ASASignPack()(x))
    assert y.shape == (1, 3, 3, 3)


def test_conversion_keeps_bias_or_not_and_shares_parameters():
    for module, variant_cls in [(nn.Conv2d(2, 3, 3, bias=False), ASAConv2d),
                                (nn.Conv1d(2, 3, 3), ASAConv1d), (nn.Linear(4, 2), ASALinear),
                                (nn.Linear(4, 2, bias=False), ASALinear)]:
        layer = variant_cls.from_module(module, eps=0.02)
        assert layer.weight is module.weight and layer.bias is module.bias
        assert list(layer.state_dict()) == list(module.state_dict())
        assert "eps=0.02, lr_expansion=100.0, variant='sign'" in layer.extra_repr()
        back = layer.to_module()
        assert type(back) is type(module) and back.weight is module.weight
        assert back.bias is module.bias and not hasattr(back, "eps")
    conv = nn.Conv2d(2, 3, 3, bias=False)
    x = torch.randn(1, 2, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(
            ASAConv2d.from_module(conv)(x), F.conv2d(x + 0.01 * reference_sign(x, "sign"), conv.weight)
        )


@pytest.mark.parametrize(
    "options, message",
    [(dict(eps=0.0), "eps must be a finite number > 0"),
     (dict(eps=-0.1), "eps must be a finite number > 0"),
     (dict(eps=float("nan")), "eps must be a finite number > 0"),
     (dict(eps="0.1"), "eps must be a number"),
     (dict(lr_expansion=0), "lr_expansion must be a finite number > 0"),
     (dict(lr_expansion=float("inf")), "lr_expansion must be a finite number > 0"),
     (dict(variant="tanh"), r"variant must be one of \('sign', 'relu'\)")],
)
def test_bad_options_are_rejected_with_allowed_values(options, message):
    module = nn.Linear(3, 3)
    with pytest.raises(ConversionError, match=message):
        ASALinear.from_module(module, **options)


def test_wrong_packed_sign_is_a_clear_error():
    layer = ASALinear.from_module(nn.Linear(4, 2))
    x = torch.randn(3, 4, requires_grad=True)
    with pytest.raises(ConversionError, match="needs 2 uint8 bytes"):
        layer(x, packed_sign=torch.zeros(3, dtype=torch.uint8))
    with pytest.raises(ConversionError, match="needs 2 uint8 bytes"):
        layer(x, packed_sign=torch.zeros(2))


def test_in_place_change_of_packed_mask_raises_saved_tensor_modified_error():
    layer = ASALinear.from_module(nn.Linear(4, 2))
    x = torch.randn(3, 4, requires_grad=True)
    packed = pack_sign(x)
    y = layer(x, packed_sign=packed)
    packed.bitwise_not_()
    with pytest.raises(SavedTensorModifiedError, match="packed ASA sign mask"):
        y.sum().backward()


def test_asa_under_cpu_autocast_gives_parameter_dtype_gradients_from_the_sign():
    torch.manual_seed(9)
    module = nn.Linear(6, 4)
    layer = ASALinear.from_module(module)
    x = torch.randn(3, 6, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    grad = torch.randn_like(y)
    y.backward(grad)
    assert x.grad.dtype == module.weight.grad.dtype == torch.float32
    expected = layer.lr_expansion * layer.eps * reference_weight_grad(module, reference_sign(x, "sign"), grad)
    assert_close_scaled(module.weight.grad, expected, 3e-2)

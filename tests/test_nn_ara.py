"""ARA layers: forward is torch's, dW comes from the anchor, dx and db are exact, only the anchor is kept."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from aalconvert.errors import ConversionError, SavedTensorModifiedError
from aalconvert.memory import measure_saved
from aalconvert.nn.ara import ARAConv1d, ARAConv2d, ARAFunction, ARALinear, WeightedGeometry
from aalconvert.nn.indicator import learning_indicator, record_learning_indicators

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")



# (dtype, relative tolerance against a float64 reference, scaled by the reference's largest entry)
DTYPES = [(torch.float32, 1e-5), (torch.float16, 5e-3), (torch.bfloat16, 3e-2)]

CONV2D_CONFIGS = [
    dict(kernel_size=3),
    dict(kernel_size=3, stride=2, padding=1, bias=False),
    dict(kernel_size=(2, 3), padding="same"),
    dict(kernel_size=(4, 3), padding="same", dilation=(1, 2)),
    dict(kernel_size=3, padding="valid", dilation=2),
    dict(kernel_size=3, stride=(2, 1), padding=(1, 2), groups=2),
    dict(kernel_size=1, stride=2, groups=4, bias=False),
    dict(kernel_size=5, stride=3, padding=3, dilation=2),
]
CONV1D_CONFIGS = [
    dict(kernel_size=3, stride=2, padding=1),
    dict(kernel_size=2, padding="same"),
    dict(kernel_size=4, padding="same", bias=False),
    dict(kernel_size=3, padding="valid", dilation=2, groups=2),
    dict(kernel_size=1, stride=3, groups=4),
]
LINEAR_INPUT_SHAPES = [(7,), (1, 7), (5, 7), (2, 3, 7), (2, 1, 3, 7)]


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, rel: float) -> None:
    """|actual - expected| <= rel * max|expected| (+ a floor for all-zero references)."""
    error = (actual.double() - expected.double()).abs().max().item()
    scale = expected.double().abs().max().item()
    assert error <= rel * scale + 1e-12, f"max error {error:.3g} vs scale {scale:.3g}"


def make_conv(dims: int, config: dict, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    conv = (nn.Conv1d if dims == 1 else nn.Conv2d)(4, 8, **config)
    return conv.to(dtype)


def conv_input(dims: int, batch: int, dtype: torch.dtype) -> torch.Tensor:
    spatial = (11,) if dims == 1 else (7, 9)
    return torch.randn(batch, 4, *spatial).to(dtype)


def reference_weight_grad(module: nn.Module, source: torch.Tensor, grad: torch.Tensor):
    """dW of ``module`` had its input been ``source``, by float64 autograd through torch's op."""
    weight = module.weight.detach().double().requires_grad_()
    if isinstance(module, nn.Linear):
        out = F.linear(source.double(), weight)
    else:
        conv = F.conv1d if isinstance(module, nn.Conv1d) else F.conv2d
        out = conv(source.double(), weight, None, module.stride, module.padding,
                   module.dilation, module.groups)
    (dw,) = torch.autograd.grad(out, weight, grad.double())
    return dw


def check_ara_layer(module: nn.Module, variant_cls, x: torch.Tensor, rel: float) -> None:
    """Forward bit-identical; dx, db equal torch autograd's; dW equals the anchor formula."""
    anchor = torch.randn_like(x)
    layer = variant_cls.from_module(module)
    x_ara = x.clone().requires_grad_()
    y = layer(x_ara, anchor=anchor)
    with torch.no_grad():
        assert torch.equal(y, module(x)), "forward differs from torch"
    grad = torch.randn_like(y)
    y.backward(grad)
    dw, db = module.weight.grad.clone(), None if module.bias is None else module.bias.grad.clone()

    module.zero_grad(set_to_none=True)
    x_bp = x.clone().requires_grad_()
    module(x_bp).backward(grad)
    assert_close_scaled(x_ara.grad, x_bp.grad, rel)
    if module.bias is not None:
        assert_close_scaled(db, module.bias.grad, rel)
    else:
        assert db is None
    assert_close_scaled(dw, reference_weight_grad(module, anchor, grad), rel)
    assert not torch.allclose(dw.double(), module.weight.grad.double(), rtol=0.1), (
        "dW should come from the anchor, not from the real input"
    )


@pytest.mark.parametrize("dtype, rel", DTYPES)
@pytest.mark.parametrize("config", CONV2D_CONFIGS)
def test_ara_conv2d_forward_exact_and_gradients_match_anchor_formula(config, dtype, rel):
    check_ara_layer(make_conv(2, config, dtype), ARAConv2d, conv_input(2, 3, dtype), rel)


@pytest.mark.parametrize("dtype, rel", DTYPES)
@pytest.mark.parametrize("config", CONV1D_CONFIGS)
def test_ara_conv1d_forward_exact_and_gradients_match_anchor_formula(config, dtype, rel):
    check_ara_layer(make_conv(1, config, dtype), ARAConv1d, conv_input(1, 5, dtype), rel)


@pytest.mark.parametrize("dtype, rel", DTYPES)
@pytest.mark.parametrize("shape", LINEAR_INPUT_SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_ara_linear_forward_exact_and_gradients_match_anchor_formula(shape, bias, dtype, rel):
    torch.manual_seed(0)
    module = nn.Linear(7, 13, bias=bias).to(dtype)
    check_ara_layer(module, ARALinear, torch.randn(shape).to(dtype), rel)


def test_ara_linear_weight_grad_equals_einsum_of_anchor_and_grad():
    torch.manual_seed(1)
    layer = ARALinear.from_module(nn.Linear(6, 5))
    x, anchor = torch.randn(2, 3, 6), torch.randn(2, 3, 6)
    grad = torch.randn(2, 3, 5)
    layer(x, anchor=anchor).backward(grad)
    torch.testing.assert_close(layer.weight.grad, torch.einsum("bto,bti->oi", grad, anchor))


@pytest.mark.parametrize(
    "dims, config",
    [(2, dict(kernel_size=3, stride=2, padding=1, dilation=1, groups=2)),
     (2, dict(kernel_size=(3, 2), stride=(1, 2), padding=(2, 0), dilation=(2, 1), groups=1)),
     (1, dict(kernel_size=3, stride=2, padding=2, dilation=2, groups=4))],
)
def test_ara_conv_weight_grad_matches_torch_nn_grad(dims, config):
    module = make_conv(dims, config, torch.float64)
    layer = ARAConv2d.from_module(module) if dims == 2 else ARAConv1d.from_module(module)
    x, anchor = conv_input(dims, 3, torch.float64), conv_input(dims, 3, torch.float64)
    y = layer(x, anchor=anchor)
    grad = torch.randn_like(y)
    y.backward(grad)
    weight_grad = torch.nn.grad.conv2d_weight if dims == 2 else torch.nn.grad.conv1d_weight
    geometry = {key: value for key, value in config.items() if key != "kernel_size"}
    expected = weight_grad(anchor, module.weight.shape, grad, **geometry)
    torch.testing.assert_close(module.weight.grad, expected)


def test_ara_without_anchor_is_exactly_bp():
    torch.manual_seed(2)
    module = nn.Conv2d(3, 5, 3, padding=1)
    layer = ARAConv2d.from_module(module)
    x = torch.randn(2, 3, 6, 6)
    grad = torch.randn(2, 5, 6, 6)
    x_ara, x_bp = x.clone().requires_grad_(), x.clone().requires_grad_()
    layer(x_ara).backward(grad)
    ara_grads = [p.grad.clone() for p in layer.parameters()]
    module.zero_grad(set_to_none=True)
    module(x_bp).backward(grad)
    assert torch.equal(x_ara.grad, x_bp.grad)
    assert all(torch.equal(a, b.grad) for a, b in zip(ara_grads, module.parameters()))


def test_ara_gradcheck_is_exact_without_anchor_and_with_anchor_equal_to_input():
    torch.manual_seed(3)
    layer = ARAConv2d.from_module(nn.Conv2d(2, 3, 3, stride=2, padding="valid").double())
    x = torch.randn(2, 2, 5, 6, dtype=torch.float64, requires_grad=True)
    weight = layer.weight.detach().clone().requires_grad_()
    bias = layer.bias.detach().clone().requires_grad_()

    def with_params(x, weight, bias, **kwargs):
        return torch.func.functional_call(layer, {"weight": weight, "bias": bias}, (x,), kwargs)

    assert torch.autograd.gradcheck(with_params, (x, weight, bias))
    assert torch.autograd.gradcheck(lambda x, w, b: with_params(x, w, b, anchor=x), (x, weight, bias))


@pytest.mark.parametrize("module", [nn.Conv2d(2, 4, (2, 3), padding="same", groups=2), nn.Linear(5, 3)])
def test_ara_input_and_bias_gradients_pass_gradcheck_with_weight_constant(module):
    torch.manual_seed(4)
    module = module.double()
    geometry = WeightedGeometry.of(module)
    shape = (2, 2, 4, 5) if isinstance(module, nn.Conv2d) else (2, 3, 5)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    anchor = torch.randn(shape, dtype=torch.float64)
    weight = module.weight.detach()
    bias = module.bias.detach().clone().requires_grad_()

    def ara(x, bias):
        return ARAFunction.apply(x, anchor, weight, bias, geometry, "test")

    assert torch.autograd.gradcheck(ara, (x, bias))


def test_anchor_receives_no_gradient_from_ara_layer():
    torch.manual_seed(5)
    layer = ARALinear.from_module(nn.Linear(4, 4))
    source = torch.randn(3, 4, requires_grad=True)
    anchor = source * 2
    x = torch.randn(3, 4, requires_grad=True)
    (layer(x, anchor=anchor).sum() + anchor.sum()).backward()
    assert torch.equal(source.grad, torch.full((3, 4), 2.0))
    leaf_anchor = torch.randn(3, 4, requires_grad=True)
    layer(x, anchor=leaf_anchor).sum().backward()
    assert leaf_anchor.grad is None


def test_unbatched_conv_input_works_with_anchor():
    torch.manual_seed(6)
    module = nn.Conv2d(3, 4, 3, padding=1)
    layer = ARAConv2d.from_module(module)
    x, anchor = torch.randn(3, 5, 5, requires_grad=True), torch.randn(3, 5, 5)
    y = layer(x, anchor=anchor)
    assert torch.equal(y, module(x))
    grad = torch.randn_like(y)
    y.backward(grad)
    expected = reference_weight_grad(module, anchor.unsqueeze(0), grad.unsqueeze(0))
    assert_close_scaled(module.weight.grad, expected, 1e-5)


def test_ara_layer_with_anchor_keeps_only_the_anchor():
    torch.manual_seed(7)
    layer = ARAConv2d.from_module(nn.Conv2d(4, 4, 3, padding=1))
    x = torch.randn(3, 4, 7, 9, requires_grad=True)
    anchor = torch.randn(3, 4, 7, 9)
    saved = measure_saved(lambda: layer(x, anchor=anchor), exclude=layer.parameters())
    assert saved.storages == {anchor.untyped_storage().data_ptr(): anchor.nbytes}


@pytest.mark.parametrize("make", [lambda: nn.Conv2d(4, 4, 3, padding=1), lambda: nn.Linear(9, 9)])
def test_ara_layers_sharing_an_anchor_keep_it_once(make):
    torch.manual_seed(8)
    plain = [make() for _ in range(3)]
    layers = [ARAConv2d.from_module(m) if isinstance(m, nn.Conv2d) else ARALinear.from_module(m)
              for m in plain]
    params = [p for m in plain for p in m.parameters()]
    anchor = torch.randn(3, 4, 7, 9, requires_grad=True)

    def ara_chain():
        h = layers[0](anchor)
        h = layers[1](h, anchor=anchor)
        return layers[2](h, anchor=anchor)

    def bp_chain():
        return plain[2](plain[1](plain[0](anchor)))

    assert measure_saved(ara_chain, exclude=params).nbytes == anchor.nbytes
    assert measure_saved(bp_chain, exclude=params).nbytes == 3 * anchor.nbytes


class Block(nn.Module):
    """Basic residual block; its first conv (reading the block input) is the ARA layer."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = ARAConv2d.from_module(nn.Conv2d(channels, channels, 3, padding=1, bias=False))
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x, anchor=None):
        out = F.relu(self.bn1(self.conv1(x, anchor=anchor)))
        return F.relu(x + self.bn2(self.conv2(out)))


class GroupNet(nn.Module):
    """Stem, one ARA group of three blocks (anchor = first block's input), linear head."""

    def __init__(self, channels: int = 8, classes: int = 4):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU())
        self.blocks = nn.ModuleList(Block(channels) for _ in range(3))
        self.head = nn.Linear(channels, classes)

    def forward(self, x):
        anchor = self.stem(x)
        h = self.blocks[0](anchor)
        for block in self.blocks[1:]:
            h = block(h, anchor=anchor)
        return self.head(h.mean(dim=(2, 3)))


def test_ara_residual_group_trains_and_learning_indicator_is_positive():
    torch.manual_seed(9)
    x = torch.randn(32, 3, 6, 6)
    labels = (x[:, 0].mean((1, 2)) > 0).long() + 2 * (x[:, 1, :3].mean((1, 2)) > 0).long()
    model = GroupNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for _ in range(20):
        loss = F.cross_entropy(model(x), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    layers = {f"blocks.{i}.conv1": model.blocks[i].conv1 for i in range(3)}
    with torch.no_grad(), record_learning_indicators(layers) as indicators:
        model(x)
    assert torch.equal(indicators["blocks.0.conv1"], torch.ones(32))
    for name in ("blocks.1.conv1", "blocks.2.conv1"):
        assert (indicators[name] > 0).all(), (name, indicators[name].min())
    anchor = model.stem(x)
    expected = learning_indicator(model.blocks[0](anchor), anchor)
    torch.testing.assert_close(indicators["blocks.1.conv1"], expected)


def test_wrong_anchor_shape_or_dtype_is_a_clear_error():
    layer = ARAConv2d.from_module(nn.Conv2d(4, 4, 3))
    x = torch.randn(2, 4, 8, 8)
    with pytest.raises(ConversionError, match=r"anchor has shape \(2, 4, 4, 4\).*input has shape \(2, 4, 8, 8\)"):
        layer(x, anchor=torch.randn(2, 4, 4, 4))
    with pytest.raises(ConversionError, match="anchor is torch.float64"):
        layer(x, anchor=torch.randn(2, 4, 8, 8, dtype=torch.float64))


def test_from_module_rejects_mismatched_expected_shapes():
    with pytest.raises(ConversionError, match="ARA anchor has shape"):
        ARAConv2d.from_module(nn.Conv2d(4, 4, 3), input_shape=(2, 4, 8, 8), anchor_shape=(2, 4, 16, 16))
    layer = ARAConv2d.from_module(nn.Conv2d(4, 4, 3), input_shape=(2, 4, 8, 8), anchor_shape=(2, 4, 8, 8))
    assert isinstance(layer, ARAConv2d)


def test_unsupported_modules_are_rejected_at_conversion():
    with pytest.raises(ConversionError, match="padding_mode='reflect'"):
        ARAConv2d.from_module(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(ConversionError, match="expected one of Linear"):
        ARALinear.from_module(nn.Conv2d(4, 4, 3))
    with pytest.raises(ConversionError, match="overrides Conv2d.forward"):
        ARAConv2d.from_module(ARAConv2d.from_module(nn.Conv2d(4, 4, 3)))


def test_in_place_change_of_anchor_raises_saved_tensor_modified_error():
    layer = ARALinear.from_module(nn.Linear(4, 4))
    anchor = torch.randn(3, 4)
    y = layer(torch.randn(3, 4, requires_grad=True), anchor=anchor)
    anchor.add_(1.0)
    with pytest.raises(SavedTensorModifiedError, match=r"ARA anchor .*shape \(3, 4\).*modified in place"):
        y.sum().backward()


@pytest.mark.parametrize(
    "module, variant_cls",
    [(nn.Linear(5, 3), ARALinear), (nn.Linear(5, 3, bias=False), ARALinear),
     (nn.Conv1d(2, 4, 3, bias=False), ARAConv1d), (nn.Conv2d(2, 4, 3, stride=2), ARAConv2d)],
)
def test_conversion_shares_parameters_and_state_dict_keys(module, variant_cls):
    layer = variant_cls.from_module(module)
    assert layer.weight is module.weight and layer.bias is module.bias
    assert list(layer.state_dict()) == list(module.state_dict())
    assert layer.extra_repr() == module.extra_repr()
    assert isinstance(layer, type(module))
    back = layer.to_module()
    assert type(back) is type(module)
    assert back.weight is module.weight and back.bias is module.bias
    assert list(dict(back.named_parameters())) == list(dict(module.named_parameters()))


def test_ara_under_cpu_autocast_gives_parameter_dtype_gradients_from_the_anchor():
    torch.manual_seed(10)
    module = nn.Conv2d(3, 4, 3, padding=1)
    layer = ARAConv2d.from_module(module)
    x, anchor = torch.randn(2, 3, 5, 5, requires_grad=True), torch.randn(2, 3, 5, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x, anchor=anchor)
    assert y.dtype == torch.bfloat16
    grad = torch.randn_like(y)
    y.backward(grad)
    assert x.grad.dtype == module.weight.grad.dtype == module.bias.grad.dtype == torch.float32
    expected = reference_weight_grad(module, anchor.bfloat16(), grad)
    assert_close_scaled(module.weight.grad, expected, 3e-2)

"""SharedCopyReLU: the ReLU's exact mask read from the k-bit copy its readers keep of its output.

Checked against torch's ReLU first (bit-identical input gradient for the gradient
it receives, over awkward shapes, dtypes, tiny and huge values), then the storage
it shares with the layer after it, then the rule on a model copying the
structure of timm's ``repvgg_a0`` (which the CI venv does not have).
"""

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import aalconvert
from aalconvert.kernels import dequantize, quantize, quantized_nbytes
from aalconvert.memory import measure_saved
from aalconvert.nn.approx import ApproxConv2d
from aalconvert.nn.approx_shared_relu import SharedCopyReLU
from aalconvert.nn.lossless import MaskReLU


def cosine(a, b):
    return F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


def awkward_input(shape, dtype, seed=0):
    """Signed values from 1e-30 to 1e3 in magnitude, with exact zeros: tiny positives a nearest
    rounding to the group's step would turn into zeros."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator)
    magnitudes = torch.logspace(-30, 3, x.numel())[torch.randperm(x.numel(), generator=generator)]
    x = x * magnitudes.view(shape)
    x.view(-1)[::7] = 0.0
    return x.to(dtype)


def relu_grad(module, x, g):
    x = x.detach().clone().requires_grad_(True)
    y = module(x * 1)  # an op before, so an in-place ReLU may modify its input
    (dx,) = torch.autograd.grad(y, x, g)
    return y, dx


# ------------------------------------------------------------------ against torch


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("companding", ["sqrt", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1,), (1023,), (5, 13, 33), (2, 3, 17, 19)])
def test_forward_and_input_gradient_bit_identical_to_relu(shape, dtype, companding, inplace):
    variant = SharedCopyReLU.from_module(nn.ReLU(inplace=inplace), bits=4, min_numel=0, companding=companding)
    x = awkward_input(shape, dtype)
    g = torch.randn(shape).to(dtype)
    expected_y, expected_dx = relu_grad(nn.ReLU(inplace=inplace), x, g)
    y, dx = relu_grad(variant, x, g)
    assert torch.equal(y, expected_y) and torch.equal(dx, expected_dx)


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_mask_exact_where_nearest_rounding_alone_would_zero_tiny_positives(bits):
    # A group of 64 with one value of 1e3 and positives down to 1e-20: half a step is far above them.
    x = torch.cat([torch.tensor([1e3]), torch.logspace(-20, -1, 63)]).repeat(70)
    x[1::5] = -x[1::5]
    variant = SharedCopyReLU.from_module(nn.ReLU(), bits=bits, min_numel=0)
    g = torch.rand(x.shape) + 0.5
    _, dx = relu_grad(variant, x, g)
    assert torch.equal(dx, g * (x > 0))


def test_channels_last_input_gives_torchs_values():
    x = awkward_input((2, 8, 9, 11), torch.float32).to(memory_format=torch.channels_last)
    g = torch.randn(x.shape).to(memory_format=torch.channels_last)
    variant = SharedCopyReLU.from_module(nn.ReLU(), min_numel=0)
    assert torch.equal(relu_grad(variant, x, g)[1], relu_grad(nn.ReLU(), x, g)[1])


def test_group_holding_nan_or_inf_passes_the_gradient_as_torch_does_for_nan():
    x = torch.randn(4, 64)
    x[1, 3], x[2, 5] = float("nan"), float("inf")
    g = torch.rand(x.shape) + 0.5
    _, dx = relu_grad(SharedCopyReLU.from_module(nn.ReLU(), min_numel=0), x, g)
    assert torch.equal(dx[[0, 3]], (g * (x > 0))[[0, 3]])  # finite groups: exact
    assert torch.equal(dx[[1, 2]], g[[1, 2]])  # decoded as NaN: every element passes, none is lost


def test_double_backward_reaches_the_input_as_zeros_like_relu():
    def second_order(module):
        w = torch.ones(64, 128, requires_grad=True)
        x = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
        y = module(x @ w)
        (gw,) = torch.autograd.grad(y.pow(2).sum(), w, create_graph=True)
        (ggw,) = torch.autograd.grad(gw.sum(), w)
        return gw, ggw

    expected = second_order(nn.ReLU())
    actual = second_order(SharedCopyReLU.from_module(nn.ReLU(), min_numel=0))
    assert all(torch.equal(a, b) for a, b in zip(actual, expected))


def test_gradient_accumulates_over_two_backwards_like_relu():
    def accumulated(module):
        torch.manual_seed(0)
        linear = nn.Linear(64, 64)
        x = torch.randn(32, 64)
        for _ in range(2):
            module(linear(x)).pow(2).sum().backward()
        return linear.weight.grad

    assert torch.equal(accumulated(SharedCopyReLU.from_module(nn.ReLU(), min_numel=0)), accumulated(nn.ReLU()))


@pytest.mark.parametrize("options", [{"stochastic": True}, {"min_numel": 10**9}])
def test_keeps_the_one_bit_mask_where_no_sign_preserving_copy_is_made(options):
    variant = SharedCopyReLU.from_module(nn.ReLU(), bits=4, **{"min_numel": 0, **options})
    x = torch.randn(4096, requires_grad=True)
    saved = measure_saved(lambda: variant(x * 1))
    assert saved.nbytes == 4096 // 8  # the mask (the probe is empty)


def test_without_grad_is_plain_relu_and_round_trips():
    relu = nn.ReLU(inplace=True)
    variant = SharedCopyReLU.from_module(relu, bits=2)
    x = torch.randn(100)
    with torch.no_grad():
        assert torch.equal(variant(x.clone()), F.relu(x))
    back = variant.to_module()
    assert type(back) is nn.ReLU and back.inplace


def test_forward_hook_replacing_the_output_keeps_gradients_of_relu_and_hook():
    def scaled(module, args, output):
        return output * 3

    def run(relu):
        relu.register_forward_hook(scaled)
        conv = ApproxConv2d.from_module(nn.Conv2d(4, 4, 3, padding=1), bits=4, min_numel=0) if isinstance(
            relu, SharedCopyReLU) else nn.Conv2d(4, 4, 3, padding=1)
        torch.manual_seed(1)
        conv.reset_parameters()
        x = awkward_input((2, 4, 9, 9), torch.float32).requires_grad_(True)
        conv(relu(x * 1)).sum().backward()
        return x.grad

    expected = run(nn.ReLU())
    actual = run(SharedCopyReLU.from_module(nn.ReLU(), min_numel=0))
    assert torch.equal(actual, expected)  # the conv's dx is exact, and so is the ReLU's mask


# ------------------------------------------------------------------ sharing


def test_relu_and_the_conv_reading_it_keep_one_copy():
    """The ReLU keeps the very tensors the convolution keeps: one 4-bit copy, no mask."""
    conv_before, conv_after = nn.Conv2d(8, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)
    x = torch.randn(2, 8, 16, 16)
    after = ApproxConv2d.from_module(conv_after, bits=4, min_numel=0)
    not_activations = [*conv_before.parameters(), *conv_after.parameters(), x]
    copy = quantized_nbytes(2 * 16 * 16 * 16, 4, 64)
    for relu in (SharedCopyReLU.from_module(nn.ReLU(), bits=4, min_numel=0),
                 SharedCopyReLU.from_module(nn.ReLU(inplace=True), bits=4, min_numel=0)):
        assert measure_saved(lambda: after(relu(conv_before(x))), not_activations).nbytes == copy
    masked = measure_saved(lambda: after(MaskReLU()(conv_before(x))), not_activations)
    assert masked.nbytes == copy + 2 * 16 * 16 * 16 // 8


def test_sign_preserving_quantizer_on_a_relu_output():
    y = torch.relu(awkward_input((3, 1000), torch.float32))
    q = quantize(y, 4, group_size=64, companding="sqrt")
    in_domain = dequantize(replace(q, companding="none"))
    assert torch.equal(in_domain > 0, y > 0)


# ------------------------------------------------------------------ the rule, on RepVGG's structure


class ConvNorm(nn.Module):
    """timm's ``ConvNormAct`` without an activation: a convolution, then batch norm."""

    def __init__(self, cin, cout, kernel, stride):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return self.bn(self.conv(x))


class FunctionalBatchNorm(nn.BatchNorm2d):
    """timm's ``BatchNormAct2d``: a BatchNorm2d subclass calling ``F.batch_norm`` itself."""

    def forward(self, x):
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            self.training, self.momentum, self.eps)


class RepVggBlock(nn.Module):
    """timm ``byobnet.RepVggBlock`` in training form: relu(bn(conv3x3(x)) + bn(conv1x1(x)) + bn(x))."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.identity = FunctionalBatchNorm(cin) if cin == cout and stride == 1 else None
        self.conv_kxk = ConvNorm(cin, cout, 3, stride)
        self.conv_1x1 = ConvNorm(cin, cout, 1, stride)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        identity = 0 if self.identity is None else self.identity(x)
        x = self.conv_1x1(x) + self.conv_kxk(x)
        x += identity
        return self.act(x)


class RepVgg(nn.Module):
    """The shape of timm's ``repvgg_a0`` (stem block, stages of blocks, pooled linear head), small."""

    def __init__(self, widths=(8, 16), depth=3, classes=10):
        super().__init__()
        self.stem = RepVggBlock(3, widths[0], 2)
        blocks, cin = [], widths[0]
        for stage, width in enumerate(widths):
            for index in range(depth):
                blocks.append(RepVggBlock(cin, width, 2 if index == 0 and stage else 1))
                cin = width
        self.stages = nn.Sequential(*blocks)
        self.head = nn.Linear(cin, classes)

    def forward(self, x):
        return self.head(self.stages(self.stem(x)).mean((2, 3)))


def _trained_grads(model, x):
    model.zero_grad()
    out = model(x)
    out.pow(2).sum().backward()
    return out, torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.parametrize("rules", ["approx4", ["auto", "approx4"]])
def test_repvgg_block_relus_share_their_readers_copy_and_keep_gradients_close(rules):
    torch.manual_seed(0)
    model = RepVgg().train()
    x = torch.randn(4, 3, 32, 32)
    reference = RepVgg().train()
    reference.load_state_dict(model.state_dict())
    converted = aalconvert.convert(model, example_inputs=(x,), rules=rules, min_numel=0)
    acts = {name: type(m) for name, m in converted.named_modules() if name.endswith(".act")}
    # Every block output feeds the next block's convolutions, except the last one's (the head's mean).
    last = max(acts, key=lambda name: list(acts).index(name))
    assert acts.pop(last) is MaskReLU
    assert set(acts.values()) == {SharedCopyReLU}
    bp_out, bp_grads = _trained_grads(reference, x)
    out, grads = _trained_grads(converted, x)
    assert torch.equal(out, bp_out)
    assert torch.isfinite(grads).all() and cosine(grads, bp_grads) >= 0.99


def test_repvgg_keeps_less_than_with_masks():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    report = aalconvert.inspect(RepVgg().train(), (x,), "approx4")
    rows = {row.name: row for row in report.rows}
    block_output = 2 * 8 * 32 * 32
    assert rows["stem.act"].bytes_converted == quantized_nbytes(block_output, 4, 64)
    readers = [name for name in rows if name.startswith("stages.") and name.endswith(".conv")]
    assert all(rows[name].bytes_converted == 0 for name in readers)  # they share the ReLUs' copies
    masks = sum(math.ceil(row.bytes_bp / 4 / 8) for row in report.rows if row.name.endswith(".act"))
    copies = sum(row.bytes_converted for row in report.rows if row.name.endswith(".act"))
    assert report.totals.converted_bytes < report.totals.bp_bytes * 0.15
    assert copies > masks  # the copies moved to the ReLUs; the readers' rows hold none


def test_relu_keeps_its_mask_when_its_reader_is_frozen_or_stochastic():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    model = RepVgg().train()
    for block in (model.stages[0],):
        for branch in (block.conv_kxk, block.conv_1x1):
            branch.conv.weight.requires_grad_(False)
    converted = aalconvert.convert(model, example_inputs=(x,), rules="approx4", min_numel=0)
    assert type(converted.stem.act) is MaskReLU  # its readers make no copy
    assert type(converted.stages[0].act) is SharedCopyReLU
    stochastic = aalconvert.convert(RepVgg().train(), example_inputs=(x,), rules="approx4", stochastic=True)
    assert not any(isinstance(m, SharedCopyReLU) for m in stochastic.modules())

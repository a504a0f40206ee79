"""Under approx rules, a layer after a norm/activation chain shares the chain start's k-bit copy.

The reference is torch: the layer's weight gradient computed by autograd at
``chain(decoded z)``, where ``decoded z`` comes from the reference quantizer.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import aalconvert
from aalconvert.kernels import dequantize, quantize
from aalconvert.memory import measure_saved
from aalconvert.nn.approx_common import ApproxOptions
from aalconvert.nn.recompute import RecomputedInputConv2d, RecomputedInputLinear


class PreNorm(nn.Module):
    """A transformer MLP as timm writes it: LayerNorm -> fc1 -> GELU -> fc2, on a residual."""

    def __init__(self, dim: int = 64):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x):
        return x + self.fc2(self.act(self.fc1(self.norm(x))))


class ConvBlock(nn.Module):
    """torchvision's BasicBlock order: conv -> BN -> ReLU(inplace) -> conv."""

    def __init__(self, channels: int = 16):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)

    def forward(self, x):
        out = self.conv1(x)
        out = self.bn(out)  # the conv's output dies here: only the BN's k-bit copy of it is kept
        out = self.relu(out)
        return self.conv2(out)


def kept(model, x):
    return measure_saved(lambda: model(x), model.parameters()).nbytes


def decoded(t: torch.Tensor, options: ApproxOptions) -> torch.Tensor:
    return dequantize(quantize(t, options.bits, group_size=options.group_size, companding=options.companding))


def test_layers_after_a_chain_keep_nothing_of_their_own_and_the_report_says_why():
    torch.manual_seed(0)
    model = nn.Sequential(PreNorm(), PreNorm())
    x = torch.randn(8, 32, 64)
    converted = aalconvert.convert(model, "approx4", example_inputs=(x,))
    assert type(converted[0].fc1) is RecomputedInputLinear and type(converted[0].fc2) is RecomputedInputLinear
    report = aalconvert.inspect(model, (x,), "approx4")
    rows = {row.name: row for row in report.rows}
    assert rows["0.fc2"].bytes_converted == 0 and "4-bit copy" in rows["0.fc2"].explanation
    assert rows["0.act"].bytes_converted > 0  # the one copy, kept by the chain start
    assert kept(converted, x) == report.totals.converted_bytes
    plain_approx = aalconvert.convert(model, "approx4", example_inputs=(x,), skip=["0.fc1", "0.fc2"])
    assert kept(converted, x) < kept(plain_approx, x)


def test_weight_gradient_is_torch_at_the_chain_rebuilt_from_the_decoded_copy():
    torch.manual_seed(0)
    model = PreNorm()
    x = torch.randn(8, 32, 64)
    converted = aalconvert.convert(model, "approx4", example_inputs=(x,))
    converted.zero_grad()
    converted(x).sum().backward()
    options = ApproxOptions(bits=4)
    h = model.fc1(model.norm(x)).detach()  # the GELU's input: the chain start keeps its k-bit copy
    rebuilt = F.gelu(decoded(h, options))
    grad_out = torch.ones(8, 32, 64)
    torch.testing.assert_close(converted.fc2.weight.grad, grad_out.reshape(-1, 64).t() @ rebuilt.reshape(-1, 256))


def test_a_conv_after_batch_norm_and_in_place_relu_shares_the_copy_and_lets_go_after_the_layer():
    torch.manual_seed(0)
    model = ConvBlock()
    x = torch.randn(4, 16, 16, 16)
    converted = aalconvert.convert(model, "approx4", example_inputs=(x,))
    assert type(converted.conv2) is RecomputedInputConv2d
    plain_approx = aalconvert.convert(model, "approx4", example_inputs=(x,), skip=["conv2"])
    assert kept(converted, x) < kept(plain_approx, x)
    slot = next(h.__self__ for h in converted.bn._forward_pre_hooks.values())
    assert slot.tensor is None  # the held chain input went after the layer ran
    got = torch.autograd.grad(converted(x).square().mean(), list(converted.parameters()))
    expected = torch.autograd.grad(model(x).square().mean(), list(model.parameters()))
    cos = F.cosine_similarity(torch.cat([g.flatten() for g in got]), torch.cat([g.flatten() for g in expected]), dim=0)
    assert cos > 0.99


@pytest.mark.parametrize("stochastic", [False, True])
def test_stochastic_rounding_keeps_its_own_copy_and_trains(stochastic):
    torch.manual_seed(0)
    model = PreNorm()
    x = torch.randn(8, 32, 64)
    converted = aalconvert.convert(model, "approx4", example_inputs=(x,), stochastic=stochastic)
    converted.zero_grad()
    converted(x).square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in converted.parameters())
    shared = aalconvert.convert(model, "approx4", example_inputs=(x,))
    assert (kept(converted, x) > kept(shared, x)) == stochastic  # a stochastic copy is never shared


def test_zoo_norms_start_chains_and_recompute_stays_bit_identical():
    class Block(nn.Module):
        """timm's pre-norm MLP with its own LayerNorm subclass, and a zoo RMS norm as Llama writes it."""

        def __init__(self, dim: int = 64):
            super().__init__()
            self.norm = type("LayerNorm", (nn.LayerNorm,), {"__module__": "timm.layers.norm"})(dim)
            self.up = nn.Linear(dim, 4 * dim)
            self.act = nn.GELU()
            self.down = nn.Linear(4 * dim, dim)
            self.rms = RMSNorm(dim)
            self.out = nn.Linear(dim, dim)

        def forward(self, x):
            x = x + self.down(self.act(self.up(self.norm(x))))
            return x + self.out(self.rms(x))

    torch.manual_seed(0)
    model = nn.Sequential(Block(), Block())
    x = torch.randn(4, 32, 64)
    converted = aalconvert.convert(model, "recompute", example_inputs=(x,))
    for name in ("up", "down", "out"):
        assert type(getattr(converted[0], name)) is RecomputedInputLinear, name
    got = torch.autograd.grad(converted(x).square().mean(), list(converted.parameters()))
    expected = torch.autograd.grad(model(x).square().mean(), list(model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert kept(converted, x) < kept(model, x)
    plan, _ = aalconvert.api.plan_conversion(model, ["asa", "approx4"], example_inputs=(x,))
    assert plan.sites["0.down"].rule == "approx4"
    assert any(s.rule == "asa" and s.module_name == "0.down" and "left to approx4" in s.reason for s in plan.skips)
    # next to recompute alone, ASA leaves a layer whose chain start (here a GELU) keeps its input
    # itself: the layer then keeps nothing, exactly, where ASA would keep a 1-bit sign
    plan, _ = aalconvert.api.plan_conversion(model, ["asa", "recompute"], example_inputs=(x,))
    assert plan.sites["0.down"].rule == "recompute"
    assert any(s.rule == "asa" and s.module_name == "0.down" and "left to recompute" in s.reason for s in plan.skips)


class RMSNorm(nn.Module):
    """Hugging Face's LlamaRMSNorm, as written there (a zoo norm: no torch class to swap)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        variance = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(variance + self.eps))


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's ``BatchNormAct2d`` (timm/layers/norm_act.py) as its forward computes: the batch
    norm's own formula, then ``drop`` (an identity) and ``act``, fused in one module."""

    def __init__(self, channels: int, act: nn.Module):
        super().__init__(channels)
        self.drop = nn.Identity()
        self.act = act

    def forward(self, x):
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                         self.training, self.momentum, self.eps)
        return self.act(self.drop(x))


class TimmConvBlock(nn.Module):
    """timm's EfficientNet/ResNet order: conv -> BatchNormAct2d -> conv."""

    def __init__(self, act: nn.Module, channels: int = 16):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = BatchNormAct2d(channels, act)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)

    def forward(self, x):
        return x + self.conv2(self.bn1(self.conv1(x)))


@pytest.mark.parametrize("act", [nn.SiLU(inplace=True), nn.ReLU(inplace=True)], ids=["silu", "relu"])
def test_a_fused_batch_norm_activation_starts_a_chain_bit_identical_under_recompute(act):
    torch.manual_seed(0)
    model = nn.Sequential(TimmConvBlock(act), TimmConvBlock(act))
    x = torch.randn(4, 16, 16, 16)
    converted = aalconvert.convert(model, "recompute", example_inputs=(x,))
    assert type(converted[0].conv2) is RecomputedInputConv2d
    running = [b.clone() for b in model.buffers()]
    got = torch.autograd.grad(converted(x).square().mean(), list(converted.parameters()))
    after_one = [b.clone() for b in model.buffers()]
    for buffer, value in zip(model.buffers(), running):
        buffer.copy_(value)
    expected = torch.autograd.grad(model(x).square().mean(), list(model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert all(torch.equal(a, b) for a, b in zip(after_one, model.buffers()))  # updated once, as BP
    # an in-place ReLU inside keeps its output itself: the conv's input then costs BP nothing extra
    assert kept(converted, x) <= kept(model, x)
    approx = aalconvert.convert(model, "approx4", example_inputs=(x,))
    plain_approx = aalconvert.convert(model, "approx4", example_inputs=(x,), skip=["0.conv2", "1.conv2"])
    assert kept(approx, x) < kept(plain_approx, x)  # the conv shares the packed batch-norm input

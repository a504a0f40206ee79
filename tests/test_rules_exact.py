"""The exact rule and repeated conversion (issue 13, items 11 and 13).

- a ReLU whose output a functional op (``h @ w``) or a layer behind a view
  (``nn.Flatten``) keeps anyway takes no mask: the mask would only add to it;
- converting an already converted model with further rules is refused (its variants
  would stay and keep more than one conversion with all rules);
- a gradient penalty through a masked ReLU gives the bias gradients plain torch gives.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import aalconvert
from aalconvert.api import plan_conversion
from aalconvert.errors import ConversionError
from aalconvert.memory import measure_saved
from aalconvert.nn.lossless import MaskReLU
from examples import EXAMPLES


class ReluThenMatmul(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.relu = nn.ReLU()
        self.w = nn.Parameter(torch.randn(16, 16))

    def forward(self, x):
        return self.relu(self.fc(x)) @ self.w


class ReluThenFlattenLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.fc = nn.Linear(4 * 6 * 6, 2)

    def forward(self, x):
        return self.fc(self.flat(self.relu(self.conv(x))))


class ReluThenMaskedMean(nn.Module):
    """The ReLU output is read by a mul with a tensor that needs a gradient, and by a mean."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.relu = nn.ReLU()
        self.gate = nn.Linear(16, 16)

    def forward(self, x):
        h = self.relu(self.fc(x))
        return (h * self.gate(x)).mean(-1) + h.view(-1, 4, 4).sum(-1).mean(-1)


def _kept(model: nn.Module, x: torch.Tensor) -> int:
    return measure_saved(lambda: model(x), model.parameters()).nbytes


@pytest.mark.parametrize(
    ("model", "x"),
    [(ReluThenMatmul(), torch.randn(8, 16)), (ReluThenFlattenLinear(), torch.randn(2, 3, 8, 8)),
     (ReluThenMaskedMean(), torch.randn(8, 16))],
    ids=["matmul", "flatten-linear", "mul"],
)
def test_exact_leaves_a_relu_whose_output_a_functional_or_viewed_reader_keeps(model, x):
    converted = aalconvert.convert(model, "exact", example_inputs=(x,))
    assert not any(isinstance(m, MaskReLU) for m in converted.modules())
    plan, _ = plan_conversion(model, "exact", example_inputs=(x,))
    assert any(s.module_name == "relu" and "keeps this ReLU's output anyway" in s.reason
               for s in plan.skips)
    assert _kept(converted, x) <= _kept(model, x)


def test_exact_still_masks_a_relu_read_only_by_ops_that_keep_nothing():
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 2))
    converted = aalconvert.convert(model, "exact")
    assert isinstance(converted[1], MaskReLU)


def test_converting_a_converted_model_with_further_rules_is_refused_before_any_change():
    torch.manual_seed(0)
    example = EXAMPLES["transformer"]
    model = example.build_model()
    x = example.example_inputs(batch_size=2)
    once = aalconvert.convert(model, "recompute", example_inputs=x)
    types = [type(m) for m in once.modules()]
    with pytest.raises(ConversionError, match=r"already converted with exact, recompute .*"
                       r"convert the original model once with all rules, e.g\. "
                       r"aalconvert.convert\(model, \['recompute', 'approx4'\]\)"):
        aalconvert.convert(once, "approx4", example_inputs=x, inplace=True)
    assert [type(m) for m in once.modules()] == types
    with pytest.raises(ConversionError, match="already converted"):
        aalconvert.inspect(once, x, "approx4")
    # The same rules again change nothing; the plain model converts with all rules in one pass.
    assert [type(m) for m in aalconvert.convert(once, "recompute").modules()] == types
    both = aalconvert.convert(aalconvert.revert(once), ["recompute", "approx4"], example_inputs=x)
    direct = aalconvert.convert(model, ["recompute", "approx4"], example_inputs=x)
    assert [type(m) for m in both.modules()] == [type(m) for m in direct.modules()]


def _penalty_grads(model: nn.Module, x: torch.Tensor) -> list:
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(model(x).sum(), x, create_graph=True)
    g.pow(2).sum().backward()
    return [p.grad for p in model.parameters()]


def test_gradient_penalty_through_a_masked_relu_gives_torch_zero_bias_gradients():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    converted = aalconvert.convert(model, "exact")
    assert isinstance(converted[1], MaskReLU)
    x = torch.randn(3, 4)
    plain, ours = _penalty_grads(model, x), _penalty_grads(converted, x)
    assert plain[1] is not None and torch.equal(plain[1], torch.zeros(4))
    assert all(a is not None and b is not None and torch.equal(a, b) for a, b in zip(plain, ours))


# ------------------------------------------------------ ReLU6 / Hardtanh / LeakyReLU masks

from aalconvert.nn.lossless import MaskHardtanh, MaskLeakyReLU, MaskReLU6  # noqa: E402
from aalconvert.nn.recompute import RecomputedInputConv2d  # noqa: E402


class InvertedResidual(nn.Module):
    """torchvision's MobileNetV2 ``InvertedResidual`` (expand 1x1 conv, BN, ReLU6, depthwise 3x3,
    BN, ReLU6, project 1x1 conv, BN, residual), its layout copied (torchvision does not import here)."""

    def __init__(self, channels: int = 8, expand: int = 4, inplace: bool = True, act=nn.ReLU6) -> None:
        super().__init__()
        hidden = channels * expand
        self.conv = nn.Sequential(
            nn.Conv2d(channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden), act(inplace=inplace),
            nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden), act(inplace=inplace),
            nn.Conv2d(hidden, channels, 1, bias=False), nn.BatchNorm2d(channels),
        )

    def forward(self, x):
        return x + self.conv(x)


def _leaky(inplace: bool) -> nn.Module:
    return nn.LeakyReLU(0.1, inplace=inplace)


def _grads(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    y = model(x)
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(3)))
    return [p.grad for p in model.parameters()]


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("act", [nn.ReLU6, _leaky], ids=["relu6", "leaky"])
def test_mobilenet_v2_block_exact_and_recompute_keep_less_with_bit_identical_gradients(inplace, act):
    torch.manual_seed(0)
    model = nn.Sequential(InvertedResidual(inplace=inplace, act=act),
                          InvertedResidual(inplace=inplace, act=act))
    x = torch.randn(2, 8, 10, 10)
    bp, reference = _kept(model, x), _grads(model, x)
    exact = aalconvert.convert(model, "exact", example_inputs=(x,))
    recompute = aalconvert.convert(model, "recompute", example_inputs=(x,))
    mask = MaskReLU6 if act is nn.ReLU6 else MaskLeakyReLU
    for converted in (exact, recompute):
        assert all(torch.equal(a, b) for a, b in zip(_grads(converted, x), reference))
        assert torch.equal(converted(x), model(x))
    # exact: the activation keeps its input (or, in place, a private copy of it) unless the
    # in-place form keeps its output, which the next conv keeps anyway.
    leaky_inplace = inplace and act is _leaky
    assert _kept(exact, x) == bp if leaky_inplace else _kept(exact, x) < 0.75 * bp
    assert all(isinstance(exact[0].conv[i], nn.LeakyReLU if leaky_inplace else mask) for i in (2, 5))
    # recompute: BN starts the chain, the activation keeps a mask, the conv keeps nothing.
    assert all(isinstance(recompute[0].conv[i], mask) for i in (2, 5))
    assert all(isinstance(recompute[0].conv[i], RecomputedInputConv2d) for i in (3, 6))
    assert _kept(recompute, x) < 0.6 * bp and _kept(recompute, x) < _kept(exact, x)


class LeakyBesideLinear(nn.Module):
    """The LeakyReLU's input is also read by a Linear, which keeps it anyway."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.act = nn.LeakyReLU(0.2)
        self.side = nn.Linear(16, 16)

    def forward(self, x):
        h = self.fc(x)
        return self.act(h) + self.side(h.view(-1, 16))


class SigmoidThenHardtanh(nn.Module):
    """The Hardtanh's input is the output of a sigmoid, which keeps it for its own backward."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.gate = nn.Sigmoid()
        self.act = nn.Hardtanh(0.2, 0.8)

    def forward(self, x):
        return self.act(self.gate(self.fc(x)))


@pytest.mark.parametrize(("model", "kind"), [(LeakyBesideLinear(), "LeakyReLU"),
                                             (SigmoidThenHardtanh(), "Hardtanh")],
                         ids=["other-reader", "producer"])
def test_exact_leaves_an_activation_whose_input_someone_else_keeps(model, kind):
    x = torch.randn(8, 16)
    converted = aalconvert.convert(model, "exact", example_inputs=(x,))
    assert type(converted.act) is type(model.act)
    plan, _ = plan_conversion(model, "exact", example_inputs=(x,))
    assert any(s.module_name == "act" and f"keeps this {kind}'s input anyway" in s.reason
               for s in plan.skips)
    assert _kept(converted, x) <= _kept(model, x)


def test_exact_masks_a_relu_and_the_leaky_relu_it_feeds_together():
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.LeakyReLU(0.1), nn.Hardtanh(), nn.Linear(16, 4))
    x = torch.randn(8, 16)
    converted = aalconvert.convert(model, "exact", example_inputs=(x,))
    assert [type(m) for m in converted][1:4] == [MaskReLU, MaskLeakyReLU, MaskHardtanh]
    assert _kept(converted, x) < _kept(model, x)
    assert all(torch.equal(a, b) for a, b in zip(_grads(converted, x), _grads(model, x)))


def test_exact_leaves_an_in_place_leaky_relu_whose_output_the_next_layer_keeps():
    model = nn.Sequential(nn.Linear(16, 16), nn.LeakyReLU(0.1, inplace=True), nn.Linear(16, 4))
    x = torch.randn(8, 16)
    plan, _ = plan_conversion(model, "exact", example_inputs=(x,))
    assert any(s.module_name == "1" and "in-place LeakyReLU's output anyway" in s.reason
               for s in plan.skips)


class BatchNormAct2d(nn.BatchNorm2d):
    """Copies timm's ``timm.layers.norm_act.BatchNormAct2d``: batch norm and its activation in one
    module, the activation a child called inside the module's own forward (the trace keeps
    the norm whole, so it never sees the activation's readers)."""

    def __init__(self, channels: int):
        super().__init__(channels)
        self.drop = nn.Identity()
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                         self.training, self.momentum, self.eps)
        return self.act(self.drop(x))


def test_an_activation_the_trace_never_sees_gets_no_mask_that_could_add_to_bp():
    # timm's regnetx_002 and dpn68 kept 1.007 of BP under exact: the ReLU inside BatchNormAct2d
    # was masked blindly while the next conv keeps its output anyway.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), BatchNormAct2d(8), nn.Conv2d(8, 8, 3, padding=1),
                          BatchNormAct2d(8), nn.Flatten(), nn.Linear(8 * 8 * 8, 2)).train()
    x = torch.randn(2, 3, 8, 8)
    converted = aalconvert.convert(model, "exact", example_inputs=(x,))
    assert type(converted[1].act) is nn.ReLU
    kept = [measure_saved(lambda m=m: m(x), m.parameters()).nbytes for m in (model, converted)]
    assert kept[1] <= kept[0]
    plan, _ = plan_conversion(model, "exact", example_inputs=(x,))
    assert any("not seen in the traced graphs" in s.reason for s in plan.skips if s.module_name == "1.act")


def test_recompute_masks_the_activation_inside_a_fused_norm_whose_output_a_layer_rebuilds():
    # timm's DenseNet-121, DPN-68, ResNetV2-50, CSPDarkNet-53 and RegNetX run BatchNormAct2d -> conv:
    # the conv rebuilds its input from the norm's, but the fused ReLU kept that very output
    # (auto 0.989, 1.000, 0.952, 0.973, 0.979 of BP until it kept a 1-bit mask).
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), BatchNormAct2d(8), nn.Conv2d(8, 8, 3, padding=1),
                          BatchNormAct2d(8), nn.Conv2d(8, 4, 1)).train()
    x = torch.randn(2, 3, 8, 8)
    reference = copy.deepcopy(model)
    converted = aalconvert.convert(model, ["exact", "recompute"], example_inputs=(x,))
    assert type(converted[1].act) is MaskReLU and type(converted[3].act) is MaskReLU
    kept = [measure_saved(lambda m=m: m(x), m.parameters()).nbytes for m in (reference, converted)]
    # each fused ReLU's 2 x 8 x 8 x 8 fp32 output becomes a 1-bit mask (plus the mask of the
    # in-place ReLU's own backward, which BP keeps as its output)
    assert kept[0] - kept[1] >= 2 * (2 * 8 * 8 * 8 * 4 - 2 * 8 * 8 * 8 // 8)
    assert aalconvert.inspect(reference, (x,), ["exact", "recompute"]).totals.converted_bytes == kept[1]
    assert all(torch.equal(a, b) for a, b in zip(_grads(converted, x), _grads(reference, x)))
    for norm, reference_norm in ((converted[1], reference[1]), (converted[3], reference[3])):
        assert torch.equal(norm.running_mean, reference_norm.running_mean)  # updated once per forward
        assert norm.num_batches_tracked == reference_norm.num_batches_tracked


def test_inspect_estimates_a_relu6_mask_on_fake_tensors():
    # timm's ReXNet (ReLU6): the mask's NaN bookkeeping read values, so inspect failed on fake
    # tensors (and on meta too where a recompute layer ran: no autocast there) until 2026-11-30.
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6(), nn.Conv2d(8, 4, 1),
                          nn.BatchNorm2d(4), nn.ReLU6(inplace=True), nn.Conv2d(4, 2, 1)).train()
    x = torch.randn(2, 3, 8, 8)
    for rules in ("exact", "recompute"):
        report = aalconvert.inspect(model, (x,), rules)
        assert report.estimated_on == "fake tensors"
        converted = aalconvert.convert(copy.deepcopy(model), rules, example_inputs=(x,))
        assert report.totals.converted_bytes == _kept(converted, x)

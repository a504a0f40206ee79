"""The exact rule and repeated conversion (issue 13, items 11 and 13).

- a ReLU whose output a functional op (``h @ w``) or a layer behind a view
  (``nn.Flatten``) keeps anyway takes no mask: the mask would only add to it;
- converting an already converted model with further rules is refused (its variants
  would stay and keep more than one conversion with all rules);
- a gradient penalty through a masked ReLU gives the bias gradients plain torch gives.
"""

import pytest
import torch
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

"""Learning indicator: the formula, ASA's positivity, and recording it for ARA/ASA layers."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from aalconvert.nn.ara import ARAConv2d, ARALinear
from aalconvert.nn.asa import ASAConv2d, ASALinear
from aalconvert.nn.indicator import (
    ara_learning_indicator,
    asa_learning_indicator,
    auxiliary_layers,
    learning_indicator,
    record_learning_indicators,
)


finite_values = st.floats(-1e6, 1e6, allow_nan=False, width=32)
samples = st.lists(st.lists(finite_values, min_size=9, max_size=9), min_size=1, max_size=3)
epsilons = st.floats(1e-4, 1.0)


def test_learning_indicator_equals_one_minus_relative_squared_distance():
    torch.manual_seed(0)
    h, a = torch.randn(5, 3, 4, 7), torch.randn(5, 3, 4, 7)
    expected = torch.stack(
        [1 - (hi.double() - ai.double()).pow(2).sum() / hi.double().pow(2).sum() for hi, ai in zip(h, a)]
    )
    result = learning_indicator(h, a)
    assert result.shape == (5,) and result.dtype == torch.float32
    torch.testing.assert_close(result.double(), expected, rtol=1e-6, atol=1e-6)


def test_learning_indicator_is_one_for_bp_and_negative_for_opposed_directions():
    h = torch.randn(3, 8)
    assert torch.equal(learning_indicator(h, h), torch.ones(3))
    torch.testing.assert_close(learning_indicator(h, 3 * h), torch.full((3,), -3.0))
    assert (learning_indicator(h, -h) < 0).all()


def test_learning_indicator_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"real input has shape \(2, 3\) but the auxiliary has \(2, 4\)"):
        learning_indicator(torch.randn(2, 3), torch.randn(2, 4))


@settings(max_examples=150, deadline=None)
@given(values=samples, eps=epsilons)
def test_asa_sign_learning_indicator_is_always_positive(values, eps):
    layer = ASALinear.from_module(nn.Linear(9, 2), eps=eps)
    assert (asa_learning_indicator(layer, torch.tensor(values)) > 0).all()


@settings(max_examples=150, deadline=None)
@given(values=samples, eps=epsilons)
def test_asa_relu_learning_indicator_is_positive_where_a_sample_has_a_positive_input(values, eps):
    layer = ASALinear.from_module(nn.Linear(9, 2), eps=eps, variant="relu")
    x = torch.tensor(values)
    indicator = asa_learning_indicator(layer, x)
    has_positive = (x > 0).any(dim=1)
    all_zero = (x == 0).all(dim=1)
    assert (indicator[has_positive] > 0).all()
    assert (indicator[~has_positive & ~all_zero] == 0).all()


def test_asa_indicator_matches_formula_with_perturbed_input():
    layer = ASAConv2d.from_module(nn.Conv2d(2, 3, 3), eps=0.2)
    x = torch.randn(4, 2, 5, 5)
    s = torch.where(x > 0, 1.0, -1.0)
    torch.testing.assert_close(asa_learning_indicator(layer, x), learning_indicator(x + 0.2 * s, 0.2 * s))


def test_ara_indicator_is_one_without_anchor():
    assert torch.equal(ara_learning_indicator(torch.randn(6, 4), None), torch.ones(6))


class TwoKinds(nn.Module):
    def __init__(self):
        super().__init__()
        self.ara = ARALinear.from_module(nn.Linear(6, 6))
        self.conv = ARAConv2d.from_module(nn.Conv2d(2, 2, 3, padding=1))
        self.asa = ASALinear.from_module(nn.Linear(6, 3), variant="relu")
        self.plain = nn.Linear(3, 3)

    def forward(self, x, anchor):
        h = self.ara(x, anchor)
        return self.plain(self.asa(torch.relu(h)))


def test_recording_gives_per_sample_indicators_of_each_layer_and_removes_hooks():
    torch.manual_seed(1)
    model = TwoKinds()
    layers = auxiliary_layers(model)
    assert list(layers) == ["ara", "conv", "asa"]
    x, anchor = torch.randn(5, 6), torch.randn(5, 6)
    image = torch.randn(2, 2, 4, 4)
    with record_learning_indicators(layers) as indicators:
        model(x, anchor)
        model.conv(image, anchor=image + 0.1)
    torch.testing.assert_close(indicators["ara"], learning_indicator(x, anchor))
    h = torch.relu(model.ara(x, anchor)).detach()
    torch.testing.assert_close(indicators["asa"], asa_learning_indicator(model.asa, h))
    torch.testing.assert_close(indicators["conv"], learning_indicator(image, image + 0.1))
    assert all(not t.requires_grad for t in indicators.values())
    assert all(not layer._forward_pre_hooks for layer in layers.values())
    with record_learning_indicators({"ara": model.ara}) as indicators:
        model.ara(x)
    assert torch.equal(indicators["ara"], torch.ones(5))


def test_recording_rejects_layers_without_auxiliary_activation():
    with pytest.raises(TypeError, match="'head' is a Linear, not an ARA or ASA layer"):
        with record_learning_indicators({"head": nn.Linear(2, 2)}):
            pass

"""convert() never fails because one site cannot be converted (issue 11, part 2).

A site a rule cannot take is left as it is, with its reason in the plan and the
report; only bad user input raises, and then before anything changes (also with
``inplace=True``). The blocks below copy the module structure of torchvision's
``efficientnet_b0`` (MBConv: conv, BN, in-place SiLU, depthwise conv, BN,
in-place SiLU, 1x1 conv) and ``mobilenet_v3_large`` (InvertedResidual with
in-place Hardswish), whose in-place activations once raised ConversionError
under ``auto`` and ``recompute``.
"""

import pytest
import torch
from torch import nn

import aalconvert
from aalconvert.api import plan_conversion
from aalconvert.errors import ConversionError
from aalconvert.memory import measure_saved
from aalconvert.nn import recompute


def mbconv_like(activation: type[nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), activation(inplace=True),
        nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), nn.BatchNorm2d(16), activation(inplace=True),
        nn.Conv2d(16, 8, 1, bias=False), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8 * 8 * 8, 10),
    ).train()


def gradients(model: nn.Module, x: torch.Tensor):
    return torch.autograd.grad(model(x).square().sum(), list(model.parameters()))


def kept(model: nn.Module, x: torch.Tensor) -> int:
    return measure_saved(lambda: model(x), model.parameters()).nbytes


@pytest.mark.parametrize("activation", [nn.SiLU, nn.Hardswish])
@pytest.mark.parametrize("rules", ["auto", "recompute", ["auto", "approx4"]])
def test_in_place_activations_after_a_norm_convert_with_the_norm_as_chain_start(activation, rules):
    model, x = mbconv_like(activation), torch.randn(2, 3, 8, 8)
    converted = aalconvert.convert(model, rules, example_inputs=(x,))
    assert kept(converted, x) < kept(model, x)
    if rules == "recompute":
        layer = converted[3]
        assert isinstance(layer, recompute.RecomputedInputConv2d)
        assert type(layer.chain[0]) is nn.BatchNorm2d and layer.chain[1] is converted[2]
        assert isinstance(converted[2], activation)  # itself keeping the norm's input (recompute_activation)
        assert all(torch.equal(a, b) for a, b in zip(gradients(converted, x), gradients(model, x)))


def reflect_padded() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect"), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(8 * 4 * 4, 4)).train()


@pytest.mark.parametrize("inplace", [False, True])
def test_a_site_whose_rewrite_fails_is_left_as_is_with_its_reason_and_what_served_it(inplace):
    # The recompute finder proposes conv 3 (input = ReLU(BN(z))), but its variant refuses
    # padding_mode='reflect': conv 3 stays a Conv2d, and the ReLU mask that only served it goes too.
    model, x = reflect_padded(), torch.randn(2, 3, 8, 8)
    plan, _ = plan_conversion(model, "recompute", example_inputs=(x,))
    skips = {skip.module_name: skip.reason for skip in plan.skips}
    assert "3" not in plan.sites and "padding_mode='reflect'" in skips["3"]
    assert "2" not in plan.sites and skips["2"].startswith("3: converting it failed")
    expected = gradients(model, x)
    bp_kept = kept(model, x)
    converted = aalconvert.convert(model, "recompute", example_inputs=(x,), inplace=inplace)
    assert [type(m) for m in converted][2:4] == [nn.ReLU, nn.Conv2d]
    assert all(torch.equal(a, b) for a, b in zip(gradients(converted, x), expected))
    assert kept(converted, x) <= bp_kept
    report = aalconvert.inspect(reflect_padded(), (x,), "recompute")
    row = next(r for r in report.to_dict()["rows"] if r["name"] == "3")
    assert "converting it failed" in row["explanation"]


def test_an_unexpected_error_in_one_variant_only_skips_that_site(monkeypatch):
    model, x = mbconv_like(nn.SiLU), torch.randn(2, 3, 8, 8)

    def broken(cls, module, chain=()):
        raise RuntimeError("a bug in one variant")

    monkeypatch.setattr(recompute.RecomputedInputConv2d, "from_module", classmethod(broken))
    converted = aalconvert.convert(model, "auto", example_inputs=(x,))
    assert not any(isinstance(m, recompute.RecomputedInputConv2d) for m in converted.modules())
    assert all(torch.equal(a, b) for a, b in zip(gradients(converted, x), gradients(model, x)))


def test_bad_user_input_raises_before_anything_changes_even_in_place():
    model, x = mbconv_like(nn.SiLU), torch.randn(2, 3, 8, 8)
    before = [(name, type(m)) for name, m in model.named_modules()]
    hooks = [dict(m._forward_hooks) for m in model.modules()]
    for rules, options in [("no_such_rule", {}), ("auto", {"asa_eps": "large"}), ("approx4", {"bits": 3})]:
        with pytest.raises(ConversionError):
            aalconvert.convert(model, rules, example_inputs=(x,), inplace=True, **options)
        assert [(name, type(m)) for name, m in model.named_modules()] == before
        assert [dict(m._forward_hooks) for m in model.modules()] == hooks

"""Planning: nothing modified, one rule per module by precedence, skip= recorded, rule registry."""


import torch
from torch import nn

from aalconvert.api import plan_conversion
from aalconvert.rules.registry import NAMES, PRECEDENCE, available
from examples import EXAMPLES


def resnet() -> nn.Module:
    torch.manual_seed(0)
    return EXAMPLES["resnet_basic"].build_model()


def test_available_lists_every_rule_name_with_a_description():
    described = available()
    assert set(described) == set(NAMES)
    assert all(isinstance(text, str) and text.strip() for text in described.values())


def test_planning_modifies_nothing():
    model = resnet()
    before = {name: type(m) for name, m in model.named_modules()}
    plan, _ = plan_conversion(model, "auto")
    assert plan.sites
    assert {name: type(m) for name, m in model.named_modules()} == before
    assert sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()) == 0


def test_each_module_gets_at_most_one_rule_and_precedence_decides():
    plan, _ = plan_conversion(resnet(), ["exact", "recompute", "ara"])
    assert all(site.module_name == name for name, site in plan.sites.items())
    order = [rule.name for rule in plan.rules]
    assert order == sorted(order, key=PRECEDENCE.index)
    assert plan.sites["maxpool"].rule == "exact"
    refused = [s for s in plan.skips if "precedence" in s.reason]
    for skip in refused:
        assert plan.sites[skip.module_name].rule != skip.rule


def test_skip_by_name_is_recorded_with_its_reason():
    plan, _ = plan_conversion(resnet(), "exact", skip=["maxpool", "layer1"])
    assert "maxpool" not in plan.sites
    assert not [name for name in plan.sites if name.startswith("layer1")]
    reasons = {s.module_name: s.reason for s in plan.skips}
    assert "skip=" in reasons["maxpool"]
    unskipped, _ = plan_conversion(resnet(), "exact")
    assert "maxpool" in unskipped.sites and any(n.startswith("layer1") for n in unskipped.sites)


def test_skip_predicate_gets_module_and_name():
    calls = []

    def predicate(module: nn.Module, name: str) -> bool:
        calls.append((type(module), name))
        return isinstance(module, nn.MaxPool2d)

    plan, _ = plan_conversion(resnet(), "exact", skip=predicate)
    assert "maxpool" not in plan.sites
    assert (nn.MaxPool2d, "maxpool") in calls


def test_exact_leaves_a_relu_whose_output_a_conv_keeps_anyway():
    # The transformer's FFN ReLU feeds a zero-probability dropout, then linear2, which keeps it.
    torch.manual_seed(0)
    model = EXAMPLES["transformer"].build_model(dropout=0.0)
    plan, _ = plan_conversion(model, "exact")
    relus = [n for n, m in model.named_modules() if type(m) is nn.ReLU]
    assert relus and not [n for n in relus if n in plan.sites]
    assert all("keeps this ReLU's output anyway" in s.reason for s in plan.skips if s.module_name in relus)
    active, _ = plan_conversion(EXAMPLES["transformer"].build_model(dropout=0.1), "exact")
    assert all(n in active.sites for n in relus)  # a real dropout keeps only its mask


def test_approx_masks_every_relu_since_its_readers_keep_k_bits():
    torch.manual_seed(0)
    model = EXAMPLES["transformer"].build_model(dropout=0.0)
    plan, _ = plan_conversion(model, ["exact", "approx4"])
    relus = [n for n, m in model.named_modules() if type(m) is nn.ReLU]
    assert relus and all(plan.sites[n].rule == "approx4" for n in relus)

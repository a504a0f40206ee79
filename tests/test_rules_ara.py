"""The ara rule on torchvision-shaped ResNets: groups stay inside one stage (issue 13, item 12).

Wrapping each ``layerN`` in ``torch.utils.checkpoint`` is the usual pattern; a group
spanning two stages ([layer2.1, layer3.0]) made it raise WiringError.
"""

import pytest
import torch
from torch import nn

import aalconvert
from aalconvert.api import plan_conversion
from examples import EXAMPLES
from checkpointed import Checkpointed

SMALL = dict(width=4, image_size=16)  # ResNet-18 block layout (2, 2, 2, 2), small width


def _resnet18(seed: int = 0) -> tuple[nn.Module, tuple]:
    torch.manual_seed(seed)
    example = EXAMPLES["resnet_basic"]
    return example.build_model(**SMALL), example.example_inputs(batch_size=2, **SMALL)


def _gradients(model: nn.Module, inputs: tuple) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model(*inputs).square().mean().backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("ara_group", [2, "stage"])
def test_ara_sites_of_one_group_share_the_parent_module(ara_group):
    model, inputs = _resnet18()
    plan, _ = plan_conversion(model, "ara", example_inputs=inputs, ara_group=ara_group)
    ara = [site for site in plan.sites.values() if site.rule == "ara"]
    assert ara
    for site in ara:
        stage = site.module_name.split(".")[0]
        assert stage == "layer1", site  # ResNet-18: only layer1 has two blocks of one input shape
        for layer in site.payload.get("layers", ()):
            assert layer.split(".")[0] == stage, site


@pytest.mark.parametrize("rules", ["ara", "auto"])
def test_checkpointing_each_stage_of_a_converted_resnet18_gives_its_gradients_and_trains(rules):
    model, inputs = _resnet18()
    converted = aalconvert.convert(model, rules, example_inputs=inputs)
    assert any(type(m).__name__.startswith("ARA") for m in converted.modules())
    unchecked = _gradients(converted, inputs)
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        setattr(converted, stage, Checkpointed(getattr(converted, stage)))
    checked = _gradients(converted, inputs)
    assert all(torch.equal(a, b) for a, b in zip(checked, unchecked))

    optimizer = torch.optim.SGD(converted.parameters(), lr=0.05)
    labels = torch.arange(2) % 10
    losses = []
    for _ in range(5):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(converted(*inputs), labels)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]

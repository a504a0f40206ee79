"""Tests for aalconvert.analysis: residual blocks, chains, ARA groups and why blocks stay out."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from aalconvert.analysis import (find_residual_blocks, group_blocks, shared_input_consumers,
                                 ungrouped_blocks)
from aalconvert.errors import ConversionError
from aalconvert.trace import trace_model
from examples import EXAMPLES


def blocks_of(model, example_inputs=None):
    result = trace_model(model, example_inputs)
    return [b for region in result.regions for b in find_residual_blocks(region)], result


class ResidualMlp(nn.Module):
    """Post-activation residual MLP block; ``add`` picks how the sum is written."""

    def __init__(self, width: int, add: str = "plus", relu: str = "module"):
        super().__init__()
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)
        self.act = nn.ReLU()
        self.add, self.relu = add, relu

    def forward(self, x):
        out = self.fc2(self.act(self.fc1(x)))
        if self.add == "plus":
            out = x + out
        elif self.add == "iadd":
            out += x
        elif self.add == "torch_add":
            out = torch.add(out, x)
        else:
            out = out.add_(x)
        return self.act(out) if self.relu == "module" else F.relu(out)


def chain(count: int, width: int = 7, **options) -> nn.Sequential:
    return nn.Sequential(*[ResidualMlp(width, **options) for _ in range(count)])


@pytest.mark.parametrize("add", ["plus", "iadd", "torch_add", "add_"])
def test_every_way_of_writing_the_sum_is_a_residual_block(add):
    blocks, _ = blocks_of(chain(3, add=add))
    assert [b.name for b in blocks] == ["0", "1", "2"]
    assert [b.consumers for b in blocks] == [("0.fc1",), ("1.fc1",), ("2.fc1",)]
    assert blocks[1].branch_weighted == ("1.fc1", "1.fc2")
    assert [b.input_producer for b in blocks] == ["input", "relu", "relu"]
    assert blocks[1].input_producer_module == "0.act"
    assert all(b.shortcut == "identity" and not b.prenorm for b in blocks)
    assert blocks[1].input is blocks[0].output


def test_adds_without_a_weighted_branch_are_not_residual_blocks():
    class NotResidual(nn.Module):
        def __init__(self):
            super().__init__()
            self.pos = nn.Parameter(torch.zeros(7))
            self.fc = nn.Linear(7, 7)

        def forward(self, x):
            x = self.fc(x) + self.pos          # position embedding
            y = self.fc(x)
            x = y + 0.044715 * y ** 3           # tanh-GELU polynomial after a Linear
            x = x + self.fc(torch.ones_like(x))  # depends on x's shape only
            return x + self.fc(x.new_zeros(x.size()))

    blocks, _ = blocks_of(NotResidual())
    assert blocks == []


def test_mlp_chain_groups_with_anchor_ara_layers_and_mask_relus():
    blocks, _ = blocks_of(chain(5), (torch.randn(2, 7),))
    groups = group_blocks(blocks, 2)
    assert [[b.name for b in g.blocks] for g in groups] == [["0", "1"], ["2", "3"]]
    assert groups[0].anchor is blocks[0].input
    assert groups[1].anchor_consumers == ("2.fc1",)
    assert groups[1].ara_layers == ("3.fc1",)
    assert groups[1].mask_relus == ("2.act",)
    left = ungrouped_blocks(blocks, 2)
    assert [u.block.name for u in left] == ["4"] and "group of 1" in left[0].reason
    assert [len(g.blocks) for g in group_blocks(blocks, "stage")] == [5]
    assert group_blocks(blocks, 1) == []


def test_relu_function_or_reused_consumer_keeps_blocks_out_of_groups():
    blocks, _ = blocks_of(chain(2, relu="function"))
    assert group_blocks(blocks, 2) == []
    assert "not a module" in ungrouped_blocks(blocks, 2)[0].reason

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(7, 7)
            self.act = nn.ReLU()

        def forward(self, x):
            x = self.act(x + self.fc(x))
            return self.act(x + self.fc(x))

    blocks, _ = blocks_of(Shared())
    assert len(blocks) == 2 and group_blocks(blocks, 2) == []
    assert all("called 2 times" in u.reason for u in ungrouped_blocks(blocks, 2))


def test_invalid_group_size_is_rejected_with_the_allowed_values():
    blocks, _ = blocks_of(chain(3))
    for bad in (0, -1, True, 2.5, "all", [2, 0]):
        with pytest.raises(ConversionError, match="ara_group"):
            group_blocks(blocks, bad)
    with pytest.raises(ConversionError, match=r"ara_group=\[2, 2\] gives 2 group sizes .* found 1 runs"):
        group_blocks(blocks, (2, 2))


@pytest.fixture(scope="module")
def resnet_basic():
    example = EXAMPLES["resnet_basic"]
    model = example.build_model()
    return model, example.example_inputs(batch_size=2)


def test_resnet_basic_blocks_and_groups_per_stage(resnet_basic):
    model, inputs = resnet_basic
    blocks, result = blocks_of(model, inputs)
    assert [r.name for r in result.regions] == [""]
    assert [b.name for b in blocks] == [f"layer{s}.{i}" for s in range(1, 5) for i in range(2)]
    assert [b.shortcut for b in blocks] == ["identity", "identity", "projection", "identity"] + \
        ["projection", "identity"] * 2
    assert blocks[2].consumers == ("layer2.0.conv1", "layer2.0.downsample.0")
    assert blocks[1].input_producer == "relu" and blocks[1].input_producer_module == "layer1.0.relu"
    assert blocks[0].input_producer == "MaxPool2d"

    groups = group_blocks(blocks, 2)
    # A group stays inside one stage: a stage's projection block opens it with a new shape,
    # so in ResNet-18 only layer1 holds two blocks of equal input shape.
    assert [[b.name for b in g.blocks] for g in groups] == [["layer1.0", "layer1.1"]]
    first = groups[0]
    assert first.anchor_consumers == ("layer1.0.conv1",)
    assert first.ara_layers == ("layer1.1.conv1",)
    assert first.mask_relus == ("layer1.0.relu",)
    reasons = {u.block.name: u.reason for u in ungrouped_blocks(blocks, 2)}
    assert set(reasons) == {f"layer{s}.{i}" for s in range(2, 5) for i in range(2)}
    assert "differs from the anchor shape" in reasons["layer2.0"]
    assert "never spans two parent modules" in reasons["layer2.1"]

    stage = group_blocks(blocks, "stage")
    assert [[b.name for b in g.blocks] for g in stage] == [["layer1.0", "layer1.1"]]
    assert [len(g.blocks) for g in group_blocks(blocks, (2,))] == [2]


@pytest.mark.parametrize("name", ["resnet_basic", "resnet_bottleneck"])
def test_ara_groups_never_span_two_parent_modules(name):
    # Before: ResNet-18 grouped [layer2.1, layer3.0], so checkpointing each layerN failed.
    example = EXAMPLES[name]
    blocks, _ = blocks_of(example.build_model(), example.example_inputs(batch_size=2))
    for k in (2, 3, "stage"):
        groups = group_blocks(blocks, k)
        assert groups
        for group in groups:
            parents = {block.name.rpartition(".")[0] for block in group.blocks}
            assert parents == {group.blocks[0].parent}, [b.name for b in group.blocks]


def test_structure_alone_gives_the_same_groups_as_shapes(resnet_basic):
    model, inputs = resnet_basic
    with_shapes, _ = blocks_of(model, inputs)
    without, _ = blocks_of(model)
    assert all(b.input_shape is None for b in without)
    for k in (2, 3, "stage"):
        assert [[b.name for b in g.blocks] for g in group_blocks(with_shapes, k)] == \
            [[b.name for b in g.blocks] for g in group_blocks(without, k)]


def test_resnet_bottleneck_takes_one_group_size_per_run():
    example = EXAMPLES["resnet_bottleneck"]
    blocks, _ = blocks_of(example.build_model(), example.example_inputs(batch_size=2))
    # Each stage's first block changes the shape and stays alone; the rest of the stage is a run.
    groups = group_blocks(blocks, (2, 3, 5, 2))
    assert [[b.name for b in g.blocks] for g in groups] == [
        [f"layer{s}.{i}" for i in range(1, n)] for s, n in zip(range(1, 5), (3, 4, 6, 3))]
    assert groups[2].mask_relus == tuple(f"layer3.{i}.relu" for i in range(1, 5))
    with pytest.raises(ConversionError, match="4 runs"):
        group_blocks(blocks, (2, 2, 2, 2, 2))


@pytest.mark.parametrize("name", ["vit", "gpt", "mixer"])
def test_prenorm_models_have_prenorm_blocks_and_no_groups(name):
    example = EXAMPLES[name]
    blocks, _ = blocks_of(example.build_model(), example.example_inputs(batch_size=2))
    assert len(blocks) >= 4 and all(b.prenorm for b in blocks)
    assert all(b.shortcut == "identity" for b in blocks)
    assert all(b.input is a.output for a, b in zip(blocks, blocks[1:]))
    assert group_blocks(blocks, "stage") == []
    assert all("pre-norm" in u.reason for u in ungrouped_blocks(blocks, "stage"))


def test_bert_post_norm_blocks_report_a_norm_producer_and_shared_qkv():
    example = EXAMPLES["bert"]
    blocks, result = blocks_of(example.build_model(), example.example_inputs(batch_size=2))
    assert len(blocks) == 4 and not any(b.prenorm for b in blocks)
    assert [b.input_producer for b in blocks[1:]] == ["norm"] * 3
    assert blocks[1].input_producer_module == "encoder.layer.0.attention.output.LayerNorm"
    assert all(b.input is a.output for a, b in zip(blocks, blocks[1:]))
    assert group_blocks(blocks, 2) == []
    assert any("post-norm" in u.reason for u in ungrouped_blocks(blocks, 2))
    shared = dict((node.name, names) for node, names in shared_input_consumers(result.regions[0]))
    assert blocks[0].consumers in shared.values()
    assert len(blocks[0].consumers) == 3  # query, key, value


def test_zoo_norm_module_before_the_branch_makes_a_pre_norm_block():
    class RMSNorm(nn.Module):  # a model zoo's norm: not a torch.nn class
        def __init__(self, width: int):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(width))

        def forward(self, x):
            return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)

    class PreNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = RMSNorm(7)
            self.fc = nn.Linear(7, 7)

        def forward(self, x):
            return x + self.fc(self.norm(x))

    blocks, _ = blocks_of(nn.Sequential(PreNorm(), PreNorm()), (torch.randn(2, 7),))
    assert len(blocks) == 2 and all(b.prenorm for b in blocks)
    assert blocks[1].input_producer == "add"
    assert all("pre-norm" in u.reason for u in ungrouped_blocks(blocks, 2))


def test_identity_module_on_the_shortcut_is_an_identity_shortcut():
    class IdentityShortcut(ResidualMlp):
        def __init__(self, width: int):
            super().__init__(width)
            self.shortcut = nn.Identity()

        def forward(self, x):
            return self.act(self.fc2(self.act(self.fc1(x))) + self.shortcut(x))

    blocks, _ = blocks_of(nn.Sequential(*[IdentityShortcut(7) for _ in range(3)]), (torch.randn(2, 7),))
    assert [b.name for b in blocks] == ["0", "1", "2"]
    assert all(b.shortcut == "identity" for b in blocks)
    assert blocks[1].consumers == ("1.fc1",) and blocks[1].input_producer_module == "0.act"
    assert [[b.name for b in g.blocks] for g in group_blocks(blocks, "stage")] == [["0", "1", "2"]]

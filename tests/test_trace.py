"""Tests for aalconvert.trace: regions, untraced reasons, module facts and shapes."""

import pytest
import torch
from torch import nn

from aalconvert.errors import ConversionError
from aalconvert.trace import META_KEY, NodeFacts, is_linear_like, trace_model


class Block(nn.Module):
    """Linear + ReLU with the ReLU module used twice."""

    def __init__(self, width: int):
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.fc(self.act(x)))


class Traceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = Block(7)
        self.bn = nn.BatchNorm1d(7)
        self.head = nn.Linear(7, 3)

    def forward(self, x):
        return self.head(self.bn(self.block(x)))


class Masked(nn.Module):
    """Hugging Face style optional arguments: traces only with them fixed to their defaults."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(7, 7)

    def forward(self, hidden, mask=None, output_attentions=False):
        out = self.proj(hidden)
        if mask is not None:
            out = out + mask
        if output_attentions:
            return out, out
        return out


class DataDependent(nn.Module):
    """Root control flow on a tensor value: neither fx nor fake tensors can follow it."""

    def __init__(self):
        super().__init__()
        self.first = Masked()
        self.second = nn.Sequential(nn.Linear(7, 5), nn.ReLU())
        self.loose = nn.Linear(5, 5)

    def forward(self, x):
        x = self.first(x)
        if x.sum().item() > -1e30:
            x = self.second(x)
        return self.loose(x)


def call_modules(region):
    return [n for n in region.graph_module.graph.nodes if n.op == "call_module"]


def test_traceable_model_is_one_root_region_with_module_facts_on_every_call():
    result = trace_model(Traceable())
    assert [r.name for r in result.regions] == [""]
    assert result.untraced == []
    facts = {n.meta[META_KEY].qualified_name: n.meta[META_KEY] for n in call_modules(result.regions[0])}
    assert set(facts) == {"block.fc", "block.act", "bn", "head"}
    assert facts["block.fc"].module_type is nn.Linear
    assert facts["block.act"].calls_in_region == 2
    assert facts["head"].calls_in_region == 1
    assert all(f.shape is None for f in facts.values())  # no example inputs, no shapes


def test_example_inputs_give_output_shape_and_dtype_of_every_node():
    result = trace_model(Traceable(), (torch.randn(5, 7, dtype=torch.float64),))
    assert result.shape_errors == {}
    nodes = {n.name: n.meta[META_KEY] for n in result.regions[0].graph_module.graph.nodes}
    assert nodes["x"].shape == (5, 7)
    assert nodes["head"].shape == (5, 3)
    assert nodes["head"].dtype == torch.float64
    assert isinstance(nodes["head"], NodeFacts)


def test_shape_run_leaves_buffers_and_training_flags_unchanged():
    model = Traceable().train()
    model.bn.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trace_model(model, (torch.randn(4, 7),))
    assert model.training and model.block.training and not model.bn.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_untraceable_root_descends_to_children_with_model_relative_names():
    model = DataDependent()
    result = trace_model(model, (torch.randn(3, 7),))
    assert [r.name for r in result.regions] == ["first", "second"]
    untraced = {u.name: u for u in result.untraced}
    assert untraced[""].type_name == "DataDependent"
    assert untraced[""].reason.startswith("TraceError")
    assert "\n" not in untraced[""].reason
    assert "loose" in untraced and "leaf" in untraced["loose"].reason
    names = [n.meta[META_KEY].qualified_name for r in result.regions for n in call_modules(r)]
    assert names == ["first.proj", "second.0", "second.1"]
    # Shapes came from a real run (fake tensors cannot follow .item()).
    second = result.regions[1].graph_module.graph
    assert [n.meta[META_KEY].shape for n in second.nodes if n.op == "call_module"] == [(3, 5), (3, 5)]


def test_optional_arguments_are_fixed_to_their_defaults_so_the_module_traces():
    without_inputs = trace_model(DataDependent())
    assert "first" in [r.name for r in without_inputs.regions]
    with_inputs = trace_model(DataDependent(), (torch.randn(2, 7),))
    first = next(r for r in with_inputs.regions if r.name == "first")
    assert first.graph_module(torch.ones(2, 7)).shape == (2, 7)  # graph still runs


def test_model_that_cannot_run_on_example_inputs_raises_conversion_error():
    with pytest.raises(ConversionError, match="example_inputs"):
        trace_model(Traceable(), (torch.randn(2, 9),))
    with pytest.raises(ConversionError, match="tuple"):
        trace_model(Traceable(), torch.randn(2, 7))


def test_leaf_types_and_zoo_linears_stay_call_module_leaves():
    Conv1D = type("Conv1D", (nn.Module,), {
        "__module__": "transformers.pytorch_utils",
        "__init__": lambda self: (nn.Module.__init__(self), setattr(self, "weight", nn.Parameter(torch.ones(7, 7))))[0],
        "forward": lambda self, x: x @ self.weight,
    })
    assert is_linear_like(Conv1D()) and is_linear_like(nn.Conv2d(1, 1, 1)) and not is_linear_like(nn.ReLU())

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.zoo = Conv1D()
            self.block = Block(7)

        def forward(self, x):
            return self.block(self.zoo(x))

    plain = trace_model(Model())
    assert [n.target for n in call_modules(plain.regions[0])] == ["zoo", "block.act", "block.fc", "block.act"]
    with_leaf = trace_model(Model(), leaf_types=(Block,))
    assert [n.target for n in call_modules(with_leaf.regions[0])] == ["zoo", "block"]


HF_CONFIGS = {
    "bert": ("BertConfig", "BertModel", dict(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                            num_attention_heads=2, intermediate_size=64,
                                            max_position_embeddings=64)),
    "gpt2": ("GPT2Config", "GPT2Model", dict(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                            bos_token_id=0, eos_token_id=0)),
    "vit": ("ViTConfig", "ViTModel", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=64, image_size=32, patch_size=8)),
}


@pytest.mark.parametrize("name", sorted(HF_CONFIGS))
def test_hugging_face_models_trace_in_parts_and_reach_every_linear(name):
    transformers = pytest.importorskip("transformers")
    config_name, model_name, options = HF_CONFIGS[name]
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(getattr(transformers, config_name)(**options))
    inputs = (torch.randn(2, 3, 32, 32),) if name == "vit" else (torch.randint(0, 100, (2, 7)),)
    for example_inputs in (inputs, None):
        result = trace_model(model, example_inputs)
        untraced = {u.name: u for u in result.untraced}
        assert "" in untraced and untraced[""].reason  # the root does not trace
        assert result.regions, "some submodules trace"
        assert all(u.reason and "\n" not in u.reason for u in result.untraced)
        assert result.shape_errors == {}
        in_regions = {n.meta[META_KEY].qualified_name for r in result.regions for n in call_modules(r)}
        linears = {n for n, m in model.named_modules() if is_linear_like(m)}
        assert linears and linears <= in_regions | set(untraced)
        assert not in_regions & set(untraced)

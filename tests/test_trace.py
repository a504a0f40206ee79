"""Tests for aalconvert.trace: regions, untraced reasons, module facts and shapes."""

import copy
import operator

import pytest
import torch
from torch import nn

import aalconvert
from aalconvert.errors import ConversionError
from aalconvert.trace import META_KEY, NodeFacts, is_linear_like, is_norm_like, trace_model


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


class TypeChecked(DataDependent):
    """Also refuses anything but a tensor: a proxy fails that check even when it carries a value."""

    def forward(self, x):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"TypeChecked expects a tensor, got {type(x).__name__}")
        return super().forward(x)


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
    model = TypeChecked()
    result = trace_model(model, (torch.randn(3, 7),))
    assert [r.name for r in result.regions] == ["first", "second"]
    untraced = {u.name: u for u in result.untraced}
    assert untraced[""].type_name == "TypeChecked"
    assert untraced[""].reason.startswith("TypeError")
    assert "traced on its example inputs: TypeError" in untraced[""].reason
    assert "\n" not in untraced[""].reason
    assert "loose" in untraced and "leaf" in untraced["loose"].reason
    names = [n.meta[META_KEY].qualified_name for r in result.regions for n in call_modules(r)]
    assert names == ["first.proj", "second.0", "second.1"]
    # Shapes came from a real run (fake tensors cannot follow .item()).
    second = result.regions[1].graph_module.graph
    assert [n.meta[META_KEY].shape for n in second.nodes if n.op == "call_module"] == [(3, 5), (3, 5)]


def test_data_dependent_root_traces_whole_on_example_values_and_in_parts_without():
    without_inputs = trace_model(DataDependent())
    assert [r.name for r in without_inputs.regions] == ["first", "second"]
    assert next(u for u in without_inputs.untraced if u.name == "").reason.startswith("TraceError")
    result = trace_model(DataDependent(), (torch.randn(3, 7),))
    assert [r.name for r in result.regions] == [""] and result.untraced == []
    shapes = {n.meta[META_KEY].qualified_name: n.meta[META_KEY].shape for n in call_modules(result.regions[0])}
    assert shapes == {"first.proj": (3, 7), "second.0": (3, 5), "second.1": (3, 5), "loose": (3, 5)}


def test_optional_arguments_are_fixed_to_their_defaults_so_the_module_traces():
    without_inputs = trace_model(TypeChecked())
    assert "first" in [r.name for r in without_inputs.regions]
    with_inputs = trace_model(TypeChecked(), (torch.randn(2, 7),))
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


class ZooRMSNorm(nn.Module):
    """A norm from a model zoo: not a torch.nn class, no children, name ends in 'Norm'."""

    def __init__(self, width: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


class GatedNorm(nn.Module):
    """Named like a norm but holds a Linear: traced through so the Linear stays visible."""

    def __init__(self, width: int):
        super().__init__()
        self.gate = nn.Linear(width, width)
        self.norm = ZooRMSNorm(width)

    def forward(self, x):
        return self.norm(x) * self.gate(x)


def test_zoo_norms_without_children_are_leaves_and_norms_with_children_are_traced_through():
    model = nn.Sequential(ZooRMSNorm(7), GatedNorm(7))
    region = trace_model(model).regions[0]
    assert [n.target for n in call_modules(region)] == ["0", "1.norm", "1.gate"]
    assert is_norm_like(ZooRMSNorm(3)) and is_norm_like(nn.LayerNorm(3)) and not is_norm_like(GatedNorm(3))


class ShapeUnpackingLayer(nn.Module):
    """Hugging Face style layer: unpacks ``x.shape``, takes **kwargs, a (cos, sin) tuple and an optional mask."""

    def __init__(self, width: int = 8, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.norm = ZooRMSNorm(width)
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(width, width)
        self.out = nn.Linear(width, width)

    def forward(self, hidden, position=None, mask=None, **kwargs):
        shape = (*hidden.shape[:-1], self.heads, -1)
        cos, sin = position
        normed = self.norm(hidden)
        query = self.query(normed).view(shape) * cos
        key = self.key(normed).view(shape) * sin
        scores = torch.einsum("blhd,bmhd->bhlm", query, key) * kwargs["scale"]
        if mask is not None:
            scores = scores + mask
        mixed = torch.einsum("bhlm,bmhd->blhd", scores.softmax(-1), query)
        for _ in range(len(hidden) - len(hidden)):  # len() of a proxy: answered from the value
            mixed = mixed * 2
        return hidden + self.out(mixed.reshape(hidden.size(0), hidden.size(1), -1))


class CallsLayerWithKeywords(nn.Module):
    """Root that no tracer can follow (type check); calls its layer with keyword arguments."""

    def __init__(self):
        super().__init__()
        self.layer = ShapeUnpackingLayer()

    def forward(self, x):
        if not isinstance(x, torch.Tensor):
            raise TypeError("a tensor is needed")
        cos, sin = torch.ones(x.shape[1], 2, 4), torch.zeros(x.shape[1], 2, 4)
        mask = torch.zeros(x.shape[1], x.shape[1])
        return self.layer(x, position=(cos, sin), mask=mask, scale=0.5)


def test_layer_that_unpacks_shapes_and_takes_kwargs_traces_on_its_example_values():
    model = CallsLayerWithKeywords()
    plain = trace_model(model)
    assert "layer" in {u.name for u in plain.untraced}  # plain fx cannot unpack a proxy's shape

    result = trace_model(model, (torch.randn(3, 5, 8),))
    assert [r.name for r in result.regions] == ["layer"]
    assert "" in {u.name for u in result.untraced} and "layer" not in {u.name for u in result.untraced}
    nodes = list(result.regions[0].graph_module.graph.nodes)
    facts = {n.meta[META_KEY].qualified_name: n.meta[META_KEY] for n in nodes if n.op == "call_module"}
    assert list(facts) == ["layer.norm", "layer.query", "layer.key", "layer.out"]
    assert facts["layer.query"].shape == (3, 5, 8) and facts["layer.out"].module_type is nn.Linear
    assert all(f.calls_in_region == 1 for f in facts.values())
    placeholders = [n.target for n in nodes if n.op == "placeholder"]
    assert placeholders == ["hidden", "position_0", "position_1", "mask"]
    assert all(isinstance(n.meta[META_KEY], NodeFacts) for n in nodes)
    assert result.shape_errors == {}
    # The mask branch was taken (the mask is a tensor, not None): the scores read it.
    mask = next(n for n in nodes if n.target == "mask")
    assert [u.target for u in mask.users] == [operator.add]


class LeavesTraces(nn.Module):
    """Forward that caches on self, makes a tensor constant, adds in place and runs dropout."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(7, 7)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        if x.sum().item() > -1e30:  # fake tensors cannot follow: the example values are real
            self.last_length = x.shape[0]
        x.add_(torch.tensor([1.0]))
        return self.drop(self.fc(x))


def test_tracing_on_values_leaves_model_inputs_and_random_state_unchanged():
    model = LeavesTraces().train()
    model.drop.eval()
    inputs = (torch.randn(4, 7),)
    before_inputs = inputs[0].clone()
    before_attributes = {name: sorted(vars(m)) for name, m in model.named_modules()}
    model.drop.train()
    rng = torch.get_rng_state()
    result = trace_model(model, inputs)
    assert [r.name for r in result.regions] == [""]
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.equal(inputs[0], before_inputs)
    model.drop.eval()
    assert {name: sorted(vars(m)) for name, m in model.named_modules()} == before_attributes
    assert not hasattr(model, "last_length") and not hasattr(model, "_tensor_constant0")
    assert model.training and not model.drop.training


@pytest.mark.parametrize("width", [1, 7])
def test_tensor_results_of_python_functions_on_values_stay_nodes(width):
    class SplitAndStack(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(width, width)

        def forward(self, x):
            parts = [self.fc(part) for part in x]  # iterates the batch: one fc call per row
            if len(parts) == 0:
                raise ValueError("empty batch")
            return torch.stack(parts) + x

    result = trace_model(SplitAndStack(), (torch.randn(3, width),))
    region = result.regions[0]
    calls = call_modules(region)
    assert [r.name for r in result.regions] == [""] and len(calls) == 3
    assert {c.meta[META_KEY].calls_in_region for c in calls} == {3}
    assert all(c.meta[META_KEY].shape == (width,) for c in calls)


class _CachingAttentionBias(nn.Module):
    """Copies timm's ``tiny_vit``/``levit`` attention: an eval-mode forward caches a tensor
    in a dict the module already holds (``attention_bias_cache``)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.biases = nn.Parameter(torch.randn(8))
        self.attention_bias_cache = {}

    def forward(self, x):
        if self.training:
            bias = self.biases * 1.0
        else:
            if "bias" not in self.attention_bias_cache:
                self.attention_bias_cache["bias"] = self.biases * 1.0
            bias = self.attention_bias_cache["bias"]
        return self.proj(x) + bias


def test_tracing_leaves_no_fake_tensor_in_containers_the_model_already_had():
    # The example run (eval mode, fake tensors) filled timm's cache with a FakeTensor; it stayed
    # on the model, and a later eval forward or a deepcopy of the model crashed the process.
    model = nn.Sequential(_CachingAttentionBias(), nn.LayerNorm(8), nn.Linear(8, 2)).train()
    x = torch.randn(3, 8)
    converted = aalconvert.convert(model, "auto", example_inputs=(x,))
    for m in (model, converted):
        assert m[0].attention_bias_cache == {}
    copy.deepcopy(converted)
    converted.eval()
    assert torch.equal(converted(x), model.eval()(x))


_MODULE_LEVEL_GELU = nn.GELU()  # held by no model: Hugging Face's RobertaLMHead calls such a ``gelu``


class HeadWithLooseActivation(nn.Module):
    """Mirrors transformers' RobertaLMHead: dense -> a module-level gelu -> layer_norm -> decoder."""

    def __init__(self):
        super().__init__()
        self.dense = nn.Linear(8, 8)
        self.layer_norm = nn.LayerNorm(8)
        self.decoder = nn.Linear(8, 5)

    def forward(self, features):
        return self.decoder(self.layer_norm(_MODULE_LEVEL_GELU(self.dense(features))))


@pytest.mark.parametrize("with_inputs", [False, True])
def test_a_module_called_but_not_installed_is_traced_through_as_the_callers_ops(with_inputs):
    inputs = (torch.randn(3, 8),)
    result = trace_model(HeadWithLooseActivation(), *([inputs] if with_inputs else []))
    assert [r.name for r in result.regions] == [""] and result.untraced == []
    graph = result.regions[0].graph_module.graph
    assert [n.meta[META_KEY].qualified_name for n in call_modules(result.regions[0])] == \
        ["dense", "layer_norm", "decoder"]
    assert any(n.op == "call_function" and "gelu" in str(n.target) for n in graph.nodes)


def test_a_model_calling_a_loose_module_converts_with_bp_gradients():
    torch.manual_seed(0)
    model = HeadWithLooseActivation()
    reference = copy.deepcopy(model)
    x = torch.randn(3, 8)
    converted = aalconvert.convert(model, "exact", example_inputs=(x,))
    converted(x).square().sum().backward()
    reference(x).square().sum().backward()
    for (name, p), q in zip(converted.named_parameters(), reference.parameters()):
        assert torch.equal(p.grad, q.grad), name

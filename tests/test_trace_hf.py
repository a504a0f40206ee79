"""Tests for aalconvert.trace + aalconvert.analysis on Hugging Face models (small random-init configs).

Their layers unpack ``x.shape`` and take ``**kwargs``, which plain torch.fx cannot
follow; with example inputs they trace on their example values.
"""

import warnings

import pytest
import torch

from aalconvert.analysis import find_residual_blocks, group_blocks, shared_input_consumers, ungrouped_blocks
from aalconvert.trace import META_KEY, is_linear_like, trace_model

transformers = pytest.importorskip("transformers")

COMMON = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
CONFIGS = {
    "bert": ("BertConfig", "BertModel", dict(vocab_size=100, max_position_embeddings=64, **COMMON)),
    "vit": ("ViTConfig", "ViTModel", dict(image_size=32, patch_size=8, **COMMON)),
    "gpt2": ("GPT2Config", "GPT2Model", dict(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_inner=64,
                                            n_positions=64, bos_token_id=0, eos_token_id=0)),
    "llama": ("LlamaConfig", "LlamaModel", dict(vocab_size=100, num_key_value_heads=2,
                                               max_position_embeddings=64, **COMMON)),
}
# The weighted modules of each residual branch, per layer i, in graph order.
BRANCHES = {
    "bert": [["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"],
             ["intermediate.dense", "output.dense"]],
    "vit": [["attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj"],
            ["mlp.fc1", "mlp.fc2"]],
    "gpt2": [["attn.c_attn", "attn.c_proj"], ["mlp.c_fc", "mlp.c_proj"]],
    "llama": [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"],
              ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]],
}
LAYERS = {"bert": "encoder.layer", "vit": "layers", "gpt2": "h", "llama": "layers"}


@pytest.fixture(scope="module")
def models():
    built = {}
    for name, (config_name, model_name, options) in CONFIGS.items():
        torch.manual_seed(0)
        model = getattr(transformers, model_name)(getattr(transformers, config_name)(**options))
        inputs = (torch.randn(2, 3, 32, 32),) if name == "vit" else (torch.randint(0, 100, (2, 7)),)
        built[name] = (model, inputs)
    return built


@pytest.fixture(scope="module")
def traced(models):
    return {name: trace_model(model, inputs) for name, (model, inputs) in models.items()}


def call_modules(region):
    return [n for n in region.graph_module.graph.nodes if n.op == "call_module"]


def blocks_of(result):
    return [block for region in result.regions for block in find_residual_blocks(region)]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_with_example_inputs_the_whole_model_is_one_region_with_every_linear_and_its_shape(models, traced, name):
    model, _ = models[name]
    result = traced[name]
    assert [r.name for r in result.regions] == [""]
    assert result.untraced == [] and result.shape_errors == {}
    facts = {n.meta[META_KEY].qualified_name: n.meta[META_KEY] for n in call_modules(result.regions[0])}
    linears = {n for n, m in model.named_modules() if is_linear_like(m)}
    assert linears <= set(facts)
    assert all(facts[n].shape is not None and facts[n].shape[-1] > 0 for n in linears)
    assert all(facts[n].calls_in_region == 1 for n in linears)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_tracing_leaves_the_model_as_it_was(models, name):
    model, inputs = models[name]
    attributes = {n: sorted(vars(m)) for n, m in model.named_modules()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    trace_model(model, inputs)
    assert {n: sorted(vars(m)) for n, m in model.named_modules()} == attributes
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_without_example_inputs_they_trace_in_parts_and_reach_every_linear(models, name):
    model, _ = models[name]
    result = trace_model(model)
    untraced = {u.name: u for u in result.untraced}
    assert "" in untraced and untraced[""].reason
    assert result.regions and all(u.reason and "\n" not in u.reason for u in result.untraced)
    in_regions = {n.meta[META_KEY].qualified_name for r in result.regions for n in call_modules(r)}
    linears = {n for n, m in model.named_modules() if is_linear_like(m)}
    assert linears <= in_regions | set(untraced)
    assert not in_regions & set(untraced)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_layer_has_an_attention_and_an_mlp_residual_block_with_its_linears(traced, name):
    blocks = blocks_of(traced[name])
    layer = LAYERS[name]
    expected = [tuple(f"{layer}.{i}.{w}" for w in branch) for i in range(2) for branch in BRANCHES[name]]
    assert [b.branch_weighted for b in blocks] == expected
    assert all(b.shortcut == "identity" for b in blocks)
    assert all(b.input is a.output for a, b in zip(blocks, blocks[1:]))  # chained layer to layer
    assert all(b.input_shape == blocks[0].input_shape for b in blocks)


@pytest.mark.parametrize("name", ["vit", "gpt2", "llama"])
def test_pre_norm_layers_give_pre_norm_blocks_that_ara_leaves_out(traced, name):
    blocks = blocks_of(traced[name])
    assert len(blocks) == 4 and all(b.prenorm for b in blocks)
    assert all(b.consumers == () for b in blocks)  # the norm, not a linear, reads the block input
    assert [b.input_producer for b in blocks[1:]] == ["add"] * 3
    assert group_blocks(blocks, "stage") == []
    assert all("pre-norm" in u.reason for u in ungrouped_blocks(blocks, "stage"))


def test_bert_post_norm_blocks_start_at_layer_norms_and_feed_query_key_value(traced):
    result = traced["bert"]
    blocks = blocks_of(result)
    assert len(blocks) == 4 and not any(b.prenorm for b in blocks)
    assert [b.input_producer_module for b in blocks[1:]] == [
        "encoder.layer.0.attention.output.LayerNorm", "encoder.layer.0.output.LayerNorm",
        "encoder.layer.1.attention.output.LayerNorm"]
    assert [b.input_producer for b in blocks[1:]] == ["norm"] * 3
    assert blocks[2].consumers == tuple(f"encoder.layer.1.attention.self.{w}" for w in ("query", "key", "value"))
    assert blocks[3].consumers == ("encoder.layer.1.intermediate.dense",)
    assert group_blocks(blocks, 2) == []
    assert any("post-norm" in u.reason for u in ungrouped_blocks(blocks, 2))


@pytest.mark.parametrize("name", ["bert", "vit", "llama"])
def test_query_key_value_show_as_consumers_of_one_shared_tensor(traced, name):
    shared = [names for region in traced[name].regions for _, names in shared_input_consumers(region)]
    layer = LAYERS[name]
    for i in range(2):
        query, key, value = (f"{layer}.{i}.{w}" for w in BRANCHES[name][0][:3])
        assert (query, key, value) in shared


@pytest.mark.parametrize("name", ["bert", "vit", "gpt2"])
def test_a_layer_traced_alone_on_its_hidden_states_keeps_both_blocks(models, name):
    model, _ = models[name]
    layer = model.get_submodule(f"{LAYERS[name]}.0")
    length = 17 if name == "vit" else 7
    result = trace_model(layer, (torch.randn(2, length, 32),))
    assert [r.name for r in result.regions] == [""] and result.shape_errors == {}
    blocks = blocks_of(result)
    assert [b.branch_weighted for b in blocks] == [tuple(BRANCHES[name][0]), tuple(BRANCHES[name][1])]
    assert blocks[0].input_producer == "input" and blocks[0].input_shape == (2, length, 32)


def test_a_users_backward_hook_makes_no_warning_about_our_proxies(models):
    # Tracing on example values runs modules on proxies; torch warns that a full backward hook
    # cannot wrap one, naming aalconvert's proxy type: the trace is ours, the warning is noise.
    model, inputs = models["llama"]
    handle = model.layers[0].mlp.register_full_backward_hook(lambda module, grad_in, grad_out: None)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = trace_model(model, inputs)
    finally:
        handle.remove()
    assert [r.name for r in result.regions] == [""]
    assert not [w for w in caught if "backward hooks" in str(w.message)], [str(w.message) for w in caught]

"""Gated MLPs of real Hugging Face models (Llama, Qwen2, Mistral, Gemma; tiny random-init configs).

``recompute`` turns each ``down_proj(act_fn(gate_proj(x)) * up_proj(x))`` into
a ``RecomputedGatedMLP`` that keeps gate and up only: gradients bit-identical
to BP's and at least two intermediate-width tensors per layer fewer kept;
``approx4`` keeps 4-bit gate and up (gradient cosine >= 0.99); ``auto`` leaves
down_proj to ASA and fuses the product alone. The MLP stays an instance of its
class, reverts to it, and its rewritten forward compiles in one graph.
"""

import copy

import pytest
import torch
import transformers
from torch import nn

import aalconvert
from aalconvert.memory import measure_saved
from aalconvert.nn.asa import ASALinear
from aalconvert.nn.gated_mlp import ApproxGatedMLP, RecomputedGatedMLP
from root_packer import without_root_packer

BATCH, TOKENS, INTERMEDIATE, LAYERS = 2, 16, 96, 2
DECODER = {"vocab_size": 100, "hidden_size": 64, "num_hidden_layers": LAYERS, "num_attention_heads": 4,
           "num_key_value_heads": 2, "intermediate_size": INTERMEDIATE, "bos_token_id": 0, "eos_token_id": 0}
ARCHITECTURES = {
    "llama": (transformers.LlamaForCausalLM, transformers.LlamaConfig, {}),
    "qwen2": (transformers.Qwen2ForCausalLM, transformers.Qwen2Config, {}),
    "mistral": (transformers.MistralForCausalLM, transformers.MistralConfig, {}),
    "gemma": (transformers.GemmaForCausalLM, transformers.GemmaConfig, {"head_dim": 16}),
}
NAMES = sorted(ARCHITECTURES)


def build(name: str) -> tuple[nn.Module, torch.Tensor]:
    model_class, config_class, extra = ARCHITECTURES[name]
    torch.manual_seed(0)
    model = model_class(config_class(**DECODER, **extra)).train()
    return model, torch.randint(1, 100, (BATCH, TOKENS))


def convert(model: nn.Module, rules, ids: torch.Tensor) -> nn.Module:
    return aalconvert.convert(copy.deepcopy(model), rules, example_inputs=(ids,))


def gradients(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    logits = model(input_ids=ids).logits
    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(7))
    return torch.autograd.grad((logits * weights).sum(), list(model.parameters()))


def kept(model: nn.Module, ids: torch.Tensor) -> int:
    return measure_saved(lambda: model(input_ids=ids).logits, model.parameters()).nbytes


def mlps(model: nn.Module) -> list[nn.Module]:
    return [layer.mlp for layer in model.model.layers]


def plain_mlps(converted: nn.Module) -> nn.Module:
    """A copy of ``converted`` whose MLPs run their own forward again (every other site kept)."""
    copied = copy.deepcopy(converted)
    for layer in copied.model.layers:
        layer.mlp = layer.mlp.to_module()
    return copied


def cosine(actual, expected) -> float:
    a = torch.cat([g.flatten().double() for g in actual])
    e = torch.cat([g.flatten().double() for g in expected])
    return torch.nn.functional.cosine_similarity(a, e, dim=0).item()


@pytest.mark.parametrize("name", NAMES)
def test_recompute_keeps_gate_and_up_only_with_bit_identical_gradients(name):
    model, ids = build(name)
    mlp_class = type(mlps(model)[0])
    converted = convert(model, "recompute", ids)
    for mlp in mlps(converted):
        assert isinstance(mlp, RecomputedGatedMLP) and isinstance(mlp, mlp_class)
    for actual, expected in zip(gradients(converted, ids), gradients(model, ids), strict=True):
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    width = BATCH * TOKENS * INTERMEDIATE * 4  # one fp32 intermediate-width tensor, bytes
    assert kept(plain_mlps(converted), ids) - kept(converted, ids) >= 2 * width * LAYERS


@pytest.mark.parametrize("name", NAMES)
def test_recompute_is_bit_identical_under_bf16_autocast(name):
    model, ids = build(name)
    converted = convert(model, "recompute", ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        actual, expected = gradients(converted, ids), gradients(model, ids)
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_approx4_keeps_4_bit_gate_and_up_with_gradient_cosine_above_099(name):
    model, ids = build(name)
    converted = convert(model, "approx4", ids)
    assert all(isinstance(mlp, ApproxGatedMLP) for mlp in mlps(converted))
    assert cosine(gradients(converted, ids), gradients(model, ids)) >= 0.99
    assert kept(converted, ids) < kept(model, ids)


def test_the_gated_mlp_sites_drop_two_intermediate_tensors_per_layer_under_recompute_and_approx4():
    model, ids = build("llama")
    width = BATCH * TOKENS * INTERMEDIATE * 4
    for rules in ("recompute", "approx4"):
        converted = without_root_packer(convert(model, rules, ids))  # it would pack plain MLPs too
        assert kept(plain_mlps(converted), ids) - kept(converted, ids) >= 2 * width * LAYERS * 0.95, rules


def test_auto_fuses_the_product_and_leaves_down_proj_to_asa():
    model, ids = build("llama")
    converted = convert(model, "auto", ids)
    for mlp in mlps(converted):
        assert isinstance(mlp, RecomputedGatedMLP)
        assert isinstance(mlp.down_proj, ASALinear)
    width = BATCH * TOKENS * INTERMEDIATE * 4
    assert kept(plain_mlps(converted), ids) - kept(converted, ids) >= width * LAYERS  # act(gate) no longer kept
    assert all(torch.isfinite(g).all() for g in gradients(converted, ids))


def test_revert_restores_the_mlp_class():
    model, ids = build("llama")
    mlp_class = type(mlps(model)[0])
    reverted = aalconvert.revert(convert(model, "recompute", ids))
    assert all(type(mlp) is mlp_class for mlp in mlps(reverted))
    assert sorted(reverted.state_dict()) == sorted(model.state_dict())


def _scale_output(module, args, output):
    return output * 1.5


@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("child", ["gate_proj", "up_proj", "down_proj", "act_fn"])
def test_value_changing_hooks_on_the_mlp_children_keep_gradients_bit_identical(child, when):
    model, ids = build("llama")
    hooked = lambda m: [getattr(mlp, child).register_forward_hook(_scale_output) for mlp in mlps(m)]
    if when == "before":
        hooked(model)
        converted = convert(model, "recompute", ids)
        assert all(isinstance(mlp, RecomputedGatedMLP) for mlp in mlps(converted))
    else:
        converted = convert(model, "recompute", ids)
        hooked(model)
        hooked(converted)
    for actual, expected in zip(gradients(converted, ids), gradients(model, ids), strict=True):
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)


@pytest.mark.parametrize("rules", ["recompute", "approx4"])
def test_a_converted_hugging_face_mlp_compiles_in_one_graph(rules):
    model, ids = build("llama")
    converted = convert(model, rules, ids)
    mlp, reference = mlps(converted)[0], mlps(model)[0]
    x = torch.randn(BATCH, TOKENS, 64, requires_grad=True)
    expected = torch.autograd.grad(reference(x).square().sum(), [x, *reference.parameters()])
    torch._dynamo.reset()
    compiled = torch.compile(mlp, backend="aot_eager", fullgraph=True)
    actual = torch.autograd.grad(compiled(x).square().sum(), [x, *mlp.parameters()])
    if rules == "recompute":
        for a, e in zip(actual, expected, strict=True):
            torch.testing.assert_close(a, e, rtol=0, atol=0)
    else:
        assert cosine(actual, expected) >= 0.99


def test_eval_and_no_grad_forwards_equal_bp():
    model, ids = build("qwen2")
    converted = convert(model, "recompute", ids)
    with torch.no_grad():
        torch.testing.assert_close(converted(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)
    converted.eval(), model.eval()
    for actual, expected in zip(gradients(converted, ids), gradients(model, ids), strict=True):
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_inspect_counts_the_intermediate_tensors_no_longer_kept():
    # inspect attributes saved tensors through global observer hooks, which the fused op may skip
    model, ids = build("llama")
    width = BATCH * TOKENS * INTERMEDIATE * 4
    plain = aalconvert.inspect(model, (ids,), "exact", labels=None).totals
    report = aalconvert.inspect(model, (ids,), "recompute", labels=None)
    assert plain.converted_bytes - report.totals.converted_bytes >= 2 * width * LAYERS
    rows = {row.name: row for row in report.rows}
    assert rows["model.layers.0.mlp"].rule == "recompute"


@pytest.mark.parametrize("replacement", ["PReLU", "Dropout", "Sequential"])
def test_an_activation_replaced_after_conversion_runs_as_written(replacement):
    # The fused product reran act_fn in backward: a PReLU's weight got no gradient, a dropout
    # drew a new mask. An activation the fused form cannot take now runs the plain ops.
    model, ids = build("llama")
    converted = convert(model, "recompute", ids)
    for m in (model, converted):
        for mlp in mlps(m):
            mlp.act_fn = {"PReLU": lambda: nn.PReLU(), "Dropout": lambda: nn.Dropout(0.5),
                          "Sequential": lambda: nn.Sequential(nn.SiLU(), nn.Dropout(0.5))}[replacement]()
    converted.load_state_dict(model.state_dict())
    results = []
    for m in (model, converted):
        torch.manual_seed(3)
        results.append(gradients(m, ids))
    assert all(torch.equal(a, b) for a, b in zip(*results))

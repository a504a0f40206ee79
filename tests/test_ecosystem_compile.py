"""torch.compile around converted models: one graph, eager's gradients (issue 7).

``fullgraph=True`` makes any graph break an error, so a passing compile proves
Dynamo traced the whole converted model (variants, custom ops and the wiring
hooks) in one graph. Gradients are compared with the same converted model run
eagerly; the ``eager`` and ``aot_eager`` backends run on CPU.
"""

import re
from pathlib import Path

import pytest
import torch

import aalconvert
from aalconvert.rules.wiring import ChainSlot, TensorSlot, wiring_of
from examples import EXAMPLES

MODELS = {
    "resnet_basic": dict(width=4, layers=(1, 1, 1, 1), image_size=16),
    "vit": dict(dropout=0.0, depth=2, dim=16, num_heads=2, image_size=16),
}
# Each rule on the model it rewrites most (ara: post-activation ResNet; asa: pre-norm ViT).
# aot_eager (Dynamo, then AOTAutograd's joint graph) for every rule; Dynamo alone
# ("eager") for the rules whose wiring hooks Dynamo must inline.
CASES = [
    ("resnet_basic", "exact", "aot_eager"),
    ("resnet_basic", "ara", "aot_eager"),
    ("resnet_basic", "ara", "eager"),
    ("vit", "approx4", "aot_eager"),
    ("vit", "recompute", "aot_eager"),
    ("vit", "recompute", "eager"),
    ("vit", "asa", "aot_eager"),
    ("vit", "asa", "eager"),
    ("vit", "auto", "aot_eager"),
]
README = Path(__file__).resolve().parents[1] / "README.md"


def _converted(name: str, rules: str, **extra) -> tuple[torch.nn.Module, tuple]:
    torch.manual_seed(0)
    overrides = {**MODELS[name], **extra}
    example = EXAMPLES[name]
    model = example.build_model(**overrides)
    inputs = example.example_inputs(batch_size=2, **overrides)
    # min_numel=0: approx quantizes even these small activations (runs the custom ops).
    options = {"min_numel": 0} if rules.startswith("approx") else {}
    converted = aalconvert.convert(model, rules, example_inputs=inputs, **options)
    assert any(type(m).__module__.startswith("aalconvert") for m in converted.modules())
    return converted, inputs


def _gradients(run, model: torch.nn.Module, inputs: tuple) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    run(*inputs).square().mean().backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("name, rules, backend", CASES)
def test_compiled_converted_model_is_one_graph_with_eager_gradients_bit_for_bit(name, rules, backend):
    torch._dynamo.reset()
    model, inputs = _converted(name, rules)
    eager = _gradients(model, model, inputs)
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    assert [torch.equal(a, b) for a, b in zip(_gradients(compiled, model, inputs), eager)] == [True] * len(eager)


def test_compiled_asa_bert_with_separate_qkv_is_one_graph():
    # Query, key and value share one packed mask; the cache hit must not break the graph.
    torch._dynamo.reset()
    torch.manual_seed(0)
    overrides = dict(hidden_size=16, num_attention_heads=2, seq_len=8, dropout=0.0)
    model = aalconvert.convert(EXAMPLES["bert"].build_model(**overrides), "asa")
    inputs = EXAMPLES["bert"].example_inputs(batch_size=2, **overrides)
    eager = _gradients(model, model, inputs)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    assert [torch.equal(a, b) for a, b in zip(_gradients(compiled, model, inputs), eager)] == [True] * len(eager)


def test_compiled_dropout_draws_the_masks_eager_draws():
    torch._dynamo.reset()
    model, inputs = _converted("vit", "exact", dropout=0.2)
    assert any(type(m).__name__ == "MaskDropout" for m in model.modules())
    eager = _gradients(model, model, inputs)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    assert [torch.equal(a, b) for a, b in zip(_gradients(compiled, model, inputs), eager)] == [True] * len(eager)


def test_recompute_backward_does_not_refire_the_wiring_hooks():
    # Rebuilding a chain in backward once called the chain modules with their hooks:
    # each slot captured again and held the rebuilt input after backward (and Dynamo
    # broke the graph on that side effect).
    model, inputs = _converted("vit", "recompute")
    slots = {s for m in model.modules() for s in wiring_of(m) if isinstance(s, (TensorSlot, ChainSlot))}
    assert slots
    model(*inputs).sum().backward()
    assert [slot.tensor for slot in slots] == [None] * len(slots)


def test_readme_torch_compile_block_runs():
    torch._dynamo.reset()
    section = README.read_text().split("\n## torch.compile\n", 1)[1].split("\n## ", 1)[0]
    namespace: dict = {}
    exec(re.search(r"```python\n(.*?)```", section, re.S).group(1), namespace)
    assert torch.isfinite(namespace["loss"])
    assert all(p.grad is not None for p in namespace["model"].parameters() if p.requires_grad)

"""A training step of a converted model leaves no memory behind: step N+1 starts where step N did.

Saved-tensor hooks and reruns can tie a graph's tensors into reference cycles
through autograd's C++ nodes (a hook closure held by the saves it made), which
no garbage collection frees: every step then leaks what the forward kept. A
per-variant weakref test sees only the variant it names; this one runs whole
converted models, every example and Hugging Face Llama, GPT-2 and BERT with labels, under
the rule sets users call, and counts the allocator's bytes over whole steps.

The profiler's first session also counts the previous step's gradients, so
the steps compared are later ones: each must allocate exactly what it frees.
"""

import gc

import pytest
import torch
from transformers import (BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                          LlamaForCausalLM)

import aalconvert
from aalconvert.step_memory import FORWARD, allocations
from examples import EXAMPLES

RULE_SETS = {"exact": "exact", "recompute": "recompute", "auto": "auto", "auto+approx4": ("auto", "approx4")}


def net_bytes_of(step) -> int:
    """Bytes allocated minus bytes freed while ``step()`` runs (CPU allocator events).

    Garbage is collected before and not during the step: a collection inside it
    would free what earlier tests left (negative), never what a C++ cycle holds.
    """
    gc.collect()
    gc.disable()
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            with torch.profiler.record_function(FORWARD):
                pass
            step()
    finally:
        gc.enable()
    events, _ = allocations(prof)
    return sum(event.nbytes for event in events)


def assert_steps_leave_nothing(model: torch.nn.Module, inputs: tuple, rules, **call_kwargs) -> None:
    converted = aalconvert.convert(model, rules, example_inputs=inputs)

    def step() -> None:
        converted.zero_grad(set_to_none=True)
        output = converted(*inputs, **call_kwargs)
        loss = output.loss if "labels" in call_kwargs else output.float().square().mean()
        loss.backward()

    for _ in range(2):  # first calls fill caches (lazy imports, shared records)
        step()
    net_bytes_of(step)
    assert [net_bytes_of(step) for _ in range(2)] == [0, 0]


@pytest.mark.parametrize("rules", RULE_SETS.values(), ids=RULE_SETS)
@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_steps_leave_no_memory_behind(name, rules):
    torch.manual_seed(0)
    model = EXAMPLES[name].build_model().train()
    assert_steps_leave_nothing(model, EXAMPLES[name].example_inputs(batch_size=2), rules)


HF_MODELS = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(
        hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
        vocab_size=50)),
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=2)),
    "bert": lambda: BertForMaskedLM(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
                                               num_attention_heads=2, intermediate_size=48)),
}


@pytest.mark.parametrize("rules", RULE_SETS.values(), ids=RULE_SETS)
@pytest.mark.parametrize("family", HF_MODELS)
def test_hf_model_with_labels_steps_leave_no_memory_behind(family, rules):
    """Llama's RMSNorms read the residual stream (the rerun-graph variant); each loss head is fused."""
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(1))
    assert_steps_leave_nothing(HF_MODELS[family]().train(), (ids,), rules, labels=ids)

"""Gated MLPs: the sites where a rule rewrites ``down(act(gate) * up)`` in a module's own forward.

Hugging Face's Llama/Mistral/Qwen2/Gemma MLPs multiply an activation of one
projection by another projection in their own forward (a functional ``*`` no
leaf-module swap reaches), so BP keeps four tensors of the intermediate width
(methods.md section 6). The module that makes the product (the innermost module
on the traced ``mul`` node's ``nn_module_stack``, whose activation operand is
computed by one of its child modules) becomes a traced-forward variant
(``aalconvert.nn.gated_mlp``): ``RecomputedGatedMLP`` for ``recompute`` (gate
and up kept, the rest rebuilt in backward; exact), ``ApproxGatedMLP`` for
``approx*`` (k-bit gate and up). Sites carry the variant under the attention
payload key, so ``rules.attention.apply_attention_site`` applies them.

A module whose forward also holds an attention core is left to the attention
variants (one traced-forward variant per module).
"""

import operator
from typing import Any

import torch
from torch import fx

from aalconvert.facts import ModelFacts
from aalconvert.nn.gated_mlp import activation_problem
from aalconvert.nn.traced_forward import TracedForwardVariant
from aalconvert.rules.attention import _owner, core_modules, traced_forward_sites
from aalconvert.rules.base import Site, Skip

_MULS = (operator.mul, torch.mul)


def _is_mul(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in _MULS) or (
        node.op == "call_method" and node.target in ("mul", "__mul__")
    )


def gated_modules(facts: ModelFacts) -> list[str]:
    """Modules whose own forward multiplies the output of an activation child by another tensor."""
    found: dict[str, None] = {}
    for region in facts.trace.regions:
        for node in region.graph_module.graph.nodes:
            if not _is_mul(node) or len(node.args) != 2:
                continue
            owner = _owner(region.name, node)
            for operand in node.args:
                if not isinstance(operand, fx.Node):
                    continue
                producer = _owner(region.name, operand)
                parent, _, child = producer.rpartition(".")
                module = facts.modules.get(producer)
                if parent == owner and child and module is not None and activation_problem(module) is None:
                    found[owner] = None
    return list(found)


def gated_mlp_sites(
    facts: ModelFacts,
    rule: str,
    variant: type[TracedForwardVariant],
    options: dict[str, Any],
    reason: str,
) -> tuple[list[Site], list[Skip]]:
    """A site per module whose forward holds an ``act(gate) * up`` ``variant`` converts, or why not."""
    attention = dict.fromkeys(
        core_modules(facts), "its forward also holds an attention core; converted as attention only"
    )
    return traced_forward_sites(facts, rule, variant, options, reason, gated_modules(facts), attention)

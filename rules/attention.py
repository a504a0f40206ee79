"""Attention cores for the ``approx*`` rules: functional softmax and activation products in k bits.

q, k, v, the attention probabilities and the operands of ``q @ k^T`` and
``probs @ v`` are kept by functional calls inside an attention module's
forward, where no leaf-module swap reaches. The module that makes those calls
(the innermost module on the traced node's ``nn_module_stack``) becomes an
``ApproxAttention`` variant (aalconvert.nn.approx_attention). Its children
stay the same objects, so the leaf swaps of the same rule (e.g. the qkv
Linear, the dropout on the probabilities) apply inside it whatever the order.
"""

from typing import Any

from torch import fx

from aalconvert.errors import ConversionError
from aalconvert.facts import ModelFacts
from aalconvert.nn.approx_attention import ApproxAttention, depends_on_input, matmul_replacement, softmax_dim
from aalconvert.rules.base import Site, Skip

PAYLOAD_KEY = "attention_core"


def _owner(region_name: str, node: fx.Node) -> str:
    """The qualified name of the module whose own forward made the call ``node``."""
    stack = node.meta.get("nn_module_stack") or {}
    inner = next(reversed(stack), "") if stack else ""
    return ".".join(part for part in (region_name, inner) if part)


def _is_core_op(node: fx.Node) -> bool:
    if softmax_dim(node) is not None:
        return True
    return matmul_replacement(node) is not None and all(
        isinstance(a, fx.Node) and depends_on_input(a) for a in node.args
    )


def core_modules(facts: ModelFacts) -> dict[str, int]:
    """Module name -> number of functional softmax / activation-product calls in its own forward."""
    found: dict[str, int] = {}
    for region in facts.trace.regions:
        for node in region.graph_module.graph.nodes:
            if _is_core_op(node):
                owner = _owner(region.name, node)
                found[owner] = found.get(owner, 0) + 1
    return found


def attention_sites(
    facts: ModelFacts, rule: str, options: dict[str, Any]
) -> tuple[list[Site], list[Skip]]:
    """A site per module whose forward holds an attention core, or the reason it stays exact."""
    sites, skips = [], []
    bits = options.get("bits", 4)
    for name, count in core_modules(facts).items():
        module = facts.modules.get(name)
        if module is None or isinstance(module, ApproxAttention):
            continue
        try:  # building the variant traces and checks; it shares tensors and copies nothing
            ApproxAttention.from_module(module, **options)
        except ConversionError as error:
            skips.append(Skip(rule, name, str(error)))
            continue
        sites.append(
            Site(
                rule,
                name,
                f"keeps {bits}-bit copies of its functional softmax outputs and matmul operands "
                f"({count} calls in its forward)",
                payload={PAYLOAD_KEY: True},
            )
        )
    return sites, skips

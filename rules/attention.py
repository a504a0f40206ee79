"""Attention cores: the sites where a rule rewrites a module's own functional softmax / matmul.

q, k, v, the attention probabilities and the operands of ``q @ k^T`` and
``probs @ v`` are kept by functional calls inside an attention module's
forward, where no leaf-module swap reaches. The module that makes those calls
(the innermost module on the traced node's ``nn_module_stack``) becomes a
traced-forward variant (aalconvert.nn.traced_forward): ``ApproxAttention``
for the ``approx*`` rules (k-bit softmax outputs and matmul operands),
``RecomputedAttention`` for ``recompute`` (dropped probabilities rebuilt from
the softmax output and a 1-bit mask, exact). The variant's children stay the
same objects, so leaf swaps (the qkv Linear, the dropout) apply inside it
whatever the order in which sites are applied.
"""

from typing import Any

from torch import fx, nn

from aalconvert.errors import ConversionError
from aalconvert.facts import ModelFacts
from aalconvert.nn.approx_attention import is_rewritable
from aalconvert.nn.traced_forward import TracedForwardVariant
from aalconvert.rules.base import Site, Skip
from aalconvert.rules.wiring import swap_module

PAYLOAD_KEY = "attention_core"


def _owner(region_name: str, node: fx.Node) -> str:
    """The qualified name of the module whose own forward made the call ``node``."""
    stack = node.meta.get("nn_module_stack") or {}
    inner = next(reversed(stack), "") if stack else ""
    return ".".join(part for part in (region_name, inner) if part)


def core_modules(facts: ModelFacts) -> list[str]:
    """Modules whose own forward calls a functional softmax or multiplies two activations."""
    found: dict[str, None] = {}
    for region in facts.trace.regions:
        for node in region.graph_module.graph.nodes:
            if is_rewritable(node):
                found[_owner(region.name, node)] = None
    return list(found)


def attention_sites(
    facts: ModelFacts,
    rule: str,
    variant: type[TracedForwardVariant],
    options: dict[str, Any],
    reason: str,
) -> tuple[list[Site], list[Skip]]:
    """A site per module whose forward holds an attention core ``variant`` converts, or why not."""
    return traced_forward_sites(facts, rule, variant, options, reason, core_modules(facts))


def traced_forward_sites(
    facts: ModelFacts,
    rule: str,
    variant: type[TracedForwardVariant],
    options: dict[str, Any],
    reason: str,
    names: list[str],
    refused: dict[str, str] | None = None,
) -> tuple[list[Site], list[Skip]]:
    """A site per module of ``names`` whose forward ``variant`` rewrites, or why not.

    ``refused`` maps module names to the reason they are left as they are.
    """
    sites, skips = [], []
    for name in names:
        module = facts.modules.get(name)
        if module is None or isinstance(module, TracedForwardVariant):
            continue
        if refused and name in refused:
            skips.append(Skip(rule, name, refused[name]))
            continue
        try:  # building the variant traces and checks; it shares tensors and copies nothing
            variant.from_module(module, **options)
        except ConversionError as error:
            skips.append(Skip(rule, name, str(error)))
            continue
        sites.append(Site(rule, name, reason, payload={PAYLOAD_KEY: variant}))
    return sites, skips


def apply_attention_site(model: nn.Module, site: Site, options: dict[str, Any]) -> nn.Module:
    """Swap the site's module for its traced-forward variant (built from the module as it is now)."""
    module = model.get_submodule(site.module_name)
    return swap_module(model, site.module_name, site.payload[PAYLOAD_KEY].from_module(module, **options))

"""``recompute``: weighted layers rebuild their input from a norm/activation chain.

When a Linear/Conv's (or a zoo ``Conv1D``'s) input is ``chain(z)`` and the
chain's first module keeps ``z`` anyway (a norm, GELU, SiLU...), the layer
keeps nothing of its own and rebuilds its input in backward (methods.md section 4; exact gradients). ReLUs
inside such chains keep a 1-bit mask, else they would keep the very tensor the
layer stopped keeping. ReLU6 / Hardtanh / LeakyReLU keep their input, so they
could start a chain themselves; a norm before them starts it instead
(MobileNetV2's BN -> ReLU6 -> conv) and they keep a 1-bit mask, so their input
(the norm's output) is kept by nobody. Without such a norm the activation
nearest the chain's far end starts it. A dropout of probability 0 between them
(torchvision's ``MLPBlock``, timm's ``Mlp``) hands on its input unchanged, so
chains run through it (as a member that is run again, drawing nothing).

``nn.MultiheadAttention`` called as self-attention on a chain's output
(torchvision's ViT: ``ln_1`` then ``self_attention(x, x, x)``) keeps no input
for its functional in-projection: ``aalconvert.nn.recompute_mha`` rebuilds it
from the chain in backward (exact).

Zoo activations and norms (Hugging Face ``NewGELUActivation``, ``LlamaRMSNorm``)
whose BP keeps more than their input keep only the input and run their forward
again in backward (``aalconvert.nn.zoo_pointwise``; exact); those whose input also
feeds a residual keep autograd's own graph (``aalconvert.nn.zoo_pointwise_graph``).

An in-place SiLU, Hardswish or Mish whose input a norm chain makes (EfficientNet's
BN -> SiLU) keeps that chain's input instead of the copy of its own input torch
keeps for an in-place op (``aalconvert.nn.recompute_activation``; exact). A ReLU
fused into a batch norm (timm's ``BatchNormAct2d``) keeps a 1-bit mask when the
layer after the norm rebuilds its input, as a chain's ReLU does; a fused in-place
SiLU, Hardswish or Mish keeps the norm's input instead of its copy
(``recompute_activation.RecomputedNormAct``; not next to an approx rule, whose
packer keeps both in k bits).

Attention cores too (``aalconvert.rules.attention``): a module whose own forward
computes ``matmul(dropout(softmax(s)), v)`` becomes a ``RecomputedAttention``
that rebuilds the dropped probabilities in backward from the softmax output
(kept by softmax anyway) and a 1-bit mask, instead of keeping them. Gated MLPs
(``down(act(gate) * up)``, ``aalconvert.rules.gated_mlp``) keep gate and up only
and rebuild the activation and the product in backward.
"""

from dataclasses import dataclass
from typing import Any

from torch import fx, nn

from aalconvert.facts import KEEPS_INPUT, ModelFacts, keeps_input, qualified_name
from aalconvert.nn.approx_common import ApproxOptions
from aalconvert.nn.lossless import MASK_ACTIVATIONS, MaskHardtanh, MaskLeakyReLU, MaskReLU, MaskReLU6
from aalconvert.nn.recompute_activation import (
    RECOMPUTED_INPUT_ACTIVATIONS,
    RecomputedNormAct,
    fused_activation_problem,
)
from aalconvert.nn.recompute import (
    CHAIN_MODULE_TYPES,
    RecomputedInputConv1d,
    is_norm_act,
    RecomputedInputConv2d,
    RecomputedInputLinear,
    RecomputedInputTransposedLinear,
)
from aalconvert.nn.gated_mlp import RecomputedGatedMLP
from aalconvert.nn.recompute_attention import RecomputedAttention
from aalconvert.nn.recompute_mha import RecomputedInputMultiheadAttention
from aalconvert.nn.zoo_linear import is_transposed_linear
from aalconvert.trace import is_norm_like, writes_in_place
from aalconvert.nn.zoo_pointwise import (
    PointwiseVariant,
    bp_keeps_input,
    bp_keeps_more_than_input,
    pointwise_problem,
)
from aalconvert.nn.zoo_pointwise_graph import GraphPointwiseVariant
from aalconvert.rules.attention import PAYLOAD_KEY, apply_attention_site, attention_sites
from aalconvert.rules.gated_mlp import gated_mlp_sites
from aalconvert.rules.base import SERVES, Rule, Site, Skip
from aalconvert.rules.wiring import ChainSlot, swap_module

_RECOMPUTE_VARIANTS: dict[type[nn.Module], type[nn.Module]] = {
    nn.Linear: RecomputedInputLinear,
    nn.Conv1d: RecomputedInputConv1d,
    nn.Conv2d: RecomputedInputConv2d,
}


def _recompute_variant(module: nn.Module) -> type[nn.Module] | None:
    """The variant for ``module``: a plain Linear/Conv1d/Conv2d or a zoo transposed linear (GPT-2 Conv1D)."""
    if is_transposed_linear(module):
        return RecomputedInputTransposedLinear
    return _RECOMPUTE_VARIANTS.get(type(module))


@dataclass(frozen=True)
class RecomputeOptions:
    """The recompute rule has no options."""


@dataclass(frozen=True)
class Chain:
    """``modules`` turn ``start``'s input z into the layer's input; ``start`` keeps z."""

    start: str
    modules: tuple[str, ...]


def input_chain(facts: ModelFacts, node: fx.Node) -> Chain | str:
    """The chain feeding ``node``'s input, or why there is none (in words)."""
    names: list[str] = []
    fallback: Chain | None = None  # a chain starting at a maskable activation that keeps its input
    current = node.args[0] if node.args else None
    while isinstance(current, fx.Node):
        inlined = _inlined_call(facts, current)
        if inlined is not None:
            name, source, calls = inlined
        elif current.op == "call_module":
            name = qualified_name(current)
            source, calls = (current.args[0] if current.args else None), facts.call_count(name)
        else:
            break
        module = facts.modules[name]
        writer = _written_in_place_before(current, node)
        if writer is not None:
            return (f"{name}'s output is changed in place by {writer} before this layer reads it, so "
                    "running the chain again would not give the layer's input")
        if _passes_on_input(module):
            # A zero-probability dropout returns its very input (torchvision's MLPBlock,
            # timm's Mlp): a chain member that never starts the chain.
            names.insert(0, name)
            current = source
            continue
        maskable = type(module) in MASK_ACTIVATIONS or isinstance(module, _MASK_VARIANTS)
        zoo = pointwise_problem(module) is None or isinstance(module, PointwiseVariant)
        if type(module) not in CHAIN_MODULE_TYPES and not maskable and not zoo and not is_norm_act(module):
            break
        names.insert(0, name)
        inplace = getattr(module, "inplace", False)
        if maskable and type(module) is not nn.ReLU:
            # Keeps its input, so it could start the chain; a norm further back is better
            # (this one then keeps a 1-bit mask, and its input is kept by nobody).
            if not inplace and type(module) in MASK_ACTIVATIONS and calls == 1:
                fallback = Chain(start=name, modules=tuple(names))
        # An in-place activation overwrites its input, so it cannot start the chain: the module
        # before it (a norm keeping its own input) can.
        elif (keeps_input(module) or (zoo and bp_keeps_input(module))) and not inplace:
            if calls != 1:
                return fallback or f"{name} starts the input chain but is called {calls} times"
            return Chain(start=name, modules=tuple(names))
        current = source
    if fallback is not None:
        return fallback
    if not names:
        return "input does not come from a norm or activation module"
    return f"input chain {' -> '.join(names)} starts at no module that keeps its input"


_MASK_VARIANTS = (MaskReLU, MaskHardtanh, MaskReLU6, MaskLeakyReLU)


def _written_in_place_before(value: fx.Node, consumer: fx.Node) -> str | None:
    """The name of a functional in-place op on ``value`` (``h.mul_(2)``, ``torch.relu_(h)``,
    ``F.dropout(h, inplace=True)``) that runs before ``consumer``: the graph still shows
    ``consumer`` reading ``value``, but it reads other numbers. (A chain wiring also refuses,
    at run time, a chain tensor whose version counter moved.)"""
    for user in value.users:
        if user.op not in ("call_method", "call_function") or not user.args or user.args[0] is not value:
            continue
        name = user.target if isinstance(user.target, str) else getattr(user.target, "__name__", "")
        if not (writes_in_place(name) or user.kwargs.get("inplace") is True):
            continue
        later = user.next
        while later.op != "root" and later is not consumer:
            later = later.next
        if later is consumer:
            return name
    return None


def _inlined_call(facts: ModelFacts, node: fx.Node) -> tuple[str, fx.Node, int] | None:
    """``(name, input, calls)`` when ``node`` returns a call of zoo activation ``name`` that fx
    traced through (Hugging Face's ``NewGELUActivation`` and ``GELUActivation`` are no graph
    leaves: GPT-2's ``c_proj`` reads ``mul_3`` of ``act``), ``input`` being the one node from
    outside that call it reads and ``calls`` how many calls of ``name`` the graph inlines;
    None otherwise."""
    stack = node.meta.get("nn_module_stack") or {}
    if node.op not in ("call_function", "call_method") or not stack:
        return None
    key = next(reversed(stack))  # one call: "act", its next call "act@1"
    path = stack[key][0]
    region = next((r.name for r in facts.trace.regions if r.graph_module.graph is node.graph), None)
    name = ".".join(part for part in (region, path) if part)
    module = facts.modules.get(name)
    if region is None or module is None or (pointwise_problem(module) is not None
                                            and not isinstance(module, PointwiseVariant)):
        return None
    stacks = [n.meta.get("nn_module_stack") or {} for n in node.graph.nodes]
    inside = {n for n, s in zip(node.graph.nodes, stacks) if key in s}
    outside_inputs = {a for n in inside for a in n.all_input_nodes if a not in inside}
    outputs = {n for n in inside if any(user not in inside for user in n.users)}
    if outputs != {node} or len(outside_inputs) != 1:
        return None
    calls = len({k for s in stacks for k, value in s.items() if value[0] == path})
    return name, outside_inputs.pop(), calls


def _fused_mask_activation(facts: ModelFacts, name: str) -> bool:
    """Whether ``name`` is a batch norm fused with a ReLU, ReLU6, Hardtanh or LeakyReLU (timm's
    ``BatchNormAct2d``) registered as its own ``act``: that activation, run by the norm's own
    forward, keeps the tensor the layer stops keeping (a ReLU its output, the others the
    norm's output) unless it keeps a 1-bit mask. (An activation module shared with another
    norm is registered under its first name only, and masked there only.)"""
    module = facts.modules[name]
    return (is_norm_act(module) and type(module.act) in MASK_ACTIVATIONS
            and facts.modules.get(f"{name}.act") is module.act)


def _passes_on_input(module: nn.Module) -> bool:
    """A dropout of probability 0: torch returns its input unchanged (in training too, drawing
    no random numbers), so running it again in backward gives the same tensor. Should ``p``
    change after conversion, the layer keeps its input as BP does (``recompute.chain_rebuildable``)."""
    return isinstance(module, nn.Dropout) and module.p == 0


class RecomputeRule(Rule):
    name = "recompute"
    description = (
        "exact: layers after a norm/activation, in-place activations after a norm, and attention products "
        "after softmax+dropout rebuild their input in backward instead of keeping it; zoo activations/norms "
        "keep only their input"
    )
    forward_exact = True
    gradient_exact = True

    def __init__(self, options: RecomputeOptions | None = None) -> None:
        self.options = options or RecomputeOptions()
        self.beside_approx = False  # set by ``registry.coordinate``

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> "RecomputeRule":
        return cls()

    def find(self, facts: ModelFacts) -> tuple[list[Site], list[Skip]]:
        sites, skips = pointwise_sites(self.name, facts, None)
        chains, chain_skips = layer_chains(facts, self.name)
        skips += chain_skips
        if not self.beside_approx:
            sites += [
                Site(self.name, name, f"keeps only its input: its in-place {type(facts.modules[name].act).__name__} "
                     "keeps no copy of the normalized output, which is rebuilt in backward from the input the "
                     "batch norm keeps anyway (exact)", payload={FUSED_KEY: True})
                for name, nodes in facts.call_nodes.items()
                if len(nodes) == 1 and fused_activation_problem(facts.modules[name]) is None
            ]
        for name, chain in activation_chains(facts).items():
            sites.append(Site(
                self.name, name,
                f"no copy of its input kept (torch keeps one for an in-place {type(facts.modules[name]).__name__}): "
                f"rebuilt in backward as {' -> '.join(chain.modules)} of the input "
                f"{type(facts.modules[chain.start]).__name__} {chain.start} keeps anyway",
                payload={CHAIN_KEY: chain}, requires=(chain.start,),
            ))
        for name, chain in chains.items():
            start_module = facts.modules[chain.start]
            sites += [
                Site(self.name, activation, f"keeps a 1-bit mask: its output is rebuilt for {name}",
                     payload={SERVES: name})
                for activation in chain.modules
                if activation != chain.start and type(facts.modules[activation]) in MASK_ACTIVATIONS
            ]
            sites += [
                Site(self.name, f"{member}.act", f"keeps a 1-bit mask: the output of {member} (a batch norm "
                     f"fused with this activation) is rebuilt for {name}", payload={SERVES: name})
                for member in chain.modules if _fused_mask_activation(facts, member)
            ]
            sites.append(
                Site(
                    self.name,
                    name,
                    f"input not kept: rebuilt in backward as {' -> '.join(chain.modules)} of the "
                    f"input {type(start_module).__name__} {chain.start} keeps anyway",
                    payload={CHAIN_KEY: chain},
                    requires=(chain.start,),
                )
            )
        core_sites, core_skips = attention_sites(
            facts, self.name, RecomputedAttention, {},
            "dropped attention probabilities not kept: rebuilt in backward from the softmax "
            "output and a 1-bit mask (exact)",
        )
        gated_sites, gated_skips = gated_mlp_sites(
            facts, self.name, RecomputedGatedMLP, {},
            "act(gate) * up not kept: only gate and up are, the activation and the product are "
            "rebuilt in backward for the product's and down_proj's gradients (exact)",
        )
        mha_sites, mha_skips = multihead_attention_sites(facts, self.name)
        return sites + core_sites + gated_sites + mha_sites, skips + core_skips + gated_skips + mha_skips

    def apply(self, model: nn.Module, site: Site, facts: ModelFacts) -> nn.Module:
        if PAYLOAD_KEY in site.payload:
            return apply_attention_site(model, site, {})
        module = model.get_submodule(site.module_name)
        if POINTWISE_KEY in site.payload:
            variant = GraphPointwiseVariant if site.payload[POINTWISE_KEY] == GRAPH else PointwiseVariant
            return swap_module(model, site.module_name, variant.from_module(module))
        if MHA_KEY in site.payload:
            chain: Chain = site.payload[MHA_KEY]
            variant = RecomputedInputMultiheadAttention.from_module(
                module, chain=tuple(model.get_submodule(name) for name in chain.modules))
            model = swap_module(model, site.module_name, variant)
            ChainSlot().wire(variant.chain, variant, model)
            return model
        if FUSED_KEY in site.payload:
            return swap_module(model, site.module_name, RecomputedNormAct.from_module(module))
        if CHAIN_KEY not in site.payload:  # a ReLU (ReLU6, Hardtanh, LeakyReLU) of a chain
            return swap_module(model, site.module_name, MASK_ACTIVATIONS[type(module)].from_module(module))
        return apply_chain_site(model, site)


CHAIN_KEY = "chain"
FUSED_KEY = "fused_activation"
MHA_KEY = "multihead_attention_chain"


def multihead_attention_sites(facts: ModelFacts, rule: str) -> tuple[list[Site], list[Skip]]:
    """``nn.MultiheadAttention`` modules called as self-attention on a chain's output (torchvision's
    ViT: ``self_attention(x, x, x)`` with ``x = ln_1(input)``): their in-projection's input is
    rebuilt from the chain in backward (``aalconvert.nn.recompute_mha``)."""
    sites, skips = [], []
    for name, nodes in facts.call_nodes.items():
        if type(facts.modules[name]) is not nn.MultiheadAttention:
            continue
        if len(nodes) != 1:
            skips.append(Skip(rule, name, f"called {len(nodes)} times; recompute needs one call"))
            continue
        node = nodes[0]
        operands = [*node.args[:3], *(node.kwargs[k] for k in ("query", "key", "value") if k in node.kwargs)]
        if len(operands) != 3 or not all(operand is operands[0] for operand in operands):
            skips.append(Skip(rule, name, "not self-attention on one tensor (query, key and value differ)"))
            continue
        chain = input_chain(facts, node)
        if isinstance(chain, str):
            skips.append(Skip(rule, name, chain))
            continue
        sites.append(Site(
            rule, name,
            f"in-projection's input not kept: rebuilt in backward as {' -> '.join(chain.modules)} of the "
            f"input {type(facts.modules[chain.start]).__name__} {chain.start} keeps anyway (exact)",
            payload={MHA_KEY: chain}, requires=(chain.start,),
        ))
    return sites, skips


def layer_chains(facts: ModelFacts, rule: str) -> tuple[dict[str, Chain], list[Skip]]:
    """Each weighted layer whose input its chain can rebuild, with the chain; why not for the others."""
    chains, skips = {}, []
    for name, nodes in facts.call_nodes.items():
        if _recompute_variant(facts.modules[name]) is None:
            continue
        if len(nodes) != 1:
            skips.append(Skip(rule, name, f"called {len(nodes)} times; recompute needs one call"))
            continue
        chain = input_chain(facts, nodes[0])
        if isinstance(chain, str):
            skips.append(Skip(rule, name, chain))
        else:
            chains[name] = chain
    return chains, skips


def activation_chains(facts: ModelFacts) -> dict[str, Chain]:
    """In-place activations (``RECOMPUTED_INPUT_ACTIVATIONS``) called once on a chain that
    starts at a module keeping its input (a norm: EfficientNet's BN -> SiLU), with the chain."""
    chains = {}
    for name, nodes in facts.call_nodes.items():
        module = facts.modules[name]
        if type(module) not in RECOMPUTED_INPUT_ACTIVATIONS or not module.inplace or len(nodes) != 1:
            continue
        chain = input_chain(facts, nodes[0])
        if isinstance(chain, Chain):
            chains[name] = chain
    return chains


def apply_chain_site(model: nn.Module, site: Site, kept_copy: ApproxOptions | None = None) -> nn.Module:
    """Swap the site's layer (or in-place activation) for its recompute variant fed by its chain
    (the chain's modules as they are now in ``model``), keeping ``z`` or, with ``kept_copy``,
    a k-bit copy of it."""
    chain: Chain = site.payload[CHAIN_KEY]
    module = model.get_submodule(site.module_name)
    variant_class = RECOMPUTED_INPUT_ACTIVATIONS.get(type(module)) or _recompute_variant(module)
    variant = variant_class.from_module(
        module, chain=tuple(model.get_submodule(name) for name in chain.modules), kept_copy=kept_copy
    )
    model = swap_module(model, site.module_name, variant)
    ChainSlot().wire(variant.chain, variant, model)
    return model


POINTWISE_KEY = "pointwise"
GRAPH = "graph"  # POINTWISE_KEY's value for a site whose variant keeps BP's autograd graph


def _input_shared(facts: ModelFacts, name: str) -> bool:
    """Whether zoo module ``name``'s input may also feed other ops (a pre-norm block's residual).

    Autograd adds the gradient contributions at such an input in the order they
    arrive; one recomputing node (``PointwiseVariant``) sums the module's own
    contributions first, so the rounding can differ from BP's. A norm's input is
    usually such a residual stream, so a norm not seen as one traced call counts
    as shared; an activation's input (a layer's output) does not.
    """
    nodes = facts.call_nodes.get(name, ())
    if len(nodes) != 1:
        return is_norm_like(facts.modules[name])
    source = nodes[0].args[0] if nodes[0].args else None
    return isinstance(source, fx.Node) and len(source.users) > 1


def pointwise_sites(rule: str, facts: ModelFacts, bits: int | None) -> tuple[list[Site], list[Skip]]:
    """Sites for zoo activations/norms: keep the exact input (``bits`` None) or a k-bit copy of it.

    An exact site whose input also feeds other ops (``_input_shared``) keeps autograd's own
    graph (``GraphPointwiseVariant``), so the input's gradient is summed in BP's order."""
    sites, skips = [], []
    for name, module in facts.modules.items():
        if pointwise_problem(module) is not None:
            continue
        if bits is None and not bp_keeps_more_than_input(module):
            skips.append(Skip(rule, name, f"{type(module).__name__} keeps only its input under BP already"))
            continue
        kept = "only its input" if bits is None else f"a {bits}-bit copy of its input"
        reason = f"keeps {kept}; its forward runs again in backward"
        if bits is None and _input_shared(facts, name):
            reason += " to rebuild the other tensors its ops save, autograd's graph as BP's (exact)"
            sites.append(Site(rule, name, reason, payload={POINTWISE_KEY: GRAPH}))
            continue
        reason += " (exact)" if bits is None else ""
        sites.append(Site(rule, name, reason, payload={POINTWISE_KEY: True}))
    return sites, skips

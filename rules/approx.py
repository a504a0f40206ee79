"""``approx8`` / ``approx4`` / ``approx2``: keep a k-bit copy of what is saved for backward.

Forward stays exact (methods.md section 3). Zoo transposed linears (GPT-2's
``Conv1D``), which no type table can list, take ``ApproxTransposedLinear``.
ReLU, dropout and max-pool take their lossless variants here too: a 1-bit mask is smaller than any k-bit copy
and exact, so the approximate rule never quantizes what a mask can hold.

Zoo activations and norms (``NewGELUActivation``, ``LlamaRMSNorm``, which no
type table can list either) keep a k-bit copy of their input and run their
forward again in backward (``aalconvert.nn.zoo_pointwise``).

Attention cores written with functional ops (``softmax``, ``q @ k^T``,
``probs @ v`` inside a module's forward) are part of this rule too
(``aalconvert.rules.attention``): the module making those calls becomes an
``ApproxAttention`` keeping k-bit softmax outputs and matmul operands. They
belong to the approx family rather than a rule of their own because they
quantize the same kind of tensors with the same options. Gated MLPs
(``down(act(gate) * up)``, ``aalconvert.rules.gated_mlp``) keep k-bit gate and up only.

A ReLU whose output a converted layer keeps a k-bit copy of (RepVGG's branch
convolutions, VGG's next convolution) keeps no mask of its own: it reads its exact
mask from that very copy (``aalconvert.nn.approx_shared_relu``). Its site needs
the reader left to this rule; when a rule before it takes the reader, the plan
falls back to the ReLU's mask site listed next.

A language model's output projection takes the loss head
(``aalconvert.rules.loss_head``): like the masks, it is lossless and keeps less
than any k-bit copy of the logits' log-softmax would.

What no site above reaches (``F.scaled_dot_product_attention``,
``nn.MultiheadAttention``, norms and functional ops written in a module's
forward) is packed by saved-tensor hooks on the root (``aalconvert.rules.saved_pack``).
"""

from dataclasses import fields
from typing import Any

from torch import nn

from aalconvert.errors import ConversionError
from aalconvert.facts import ModelFacts, qualified_name
from aalconvert.nn import approx
from aalconvert.nn.approx_attention import ApproxAttention
from aalconvert.nn.approx_common import ApproxOptions
from aalconvert.nn.approx_shared_relu import SharedCopyReLU
from aalconvert.nn.gated_mlp import ApproxGatedMLP
from aalconvert.nn.approx_weighted import ApproxTransposedLinear
from aalconvert.nn.zoo_linear import is_transposed_linear, transposed_linear_problem
from aalconvert.nn.zoo_pointwise import PointwiseVariant
from aalconvert.rules.attention import PAYLOAD_KEY, apply_attention_site, attention_sites
from aalconvert.rules.base import Site, Skip
from aalconvert.rules.gated_mlp import gated_mlp_sites
from aalconvert.rules.loss_head import LossHeadRule
from aalconvert.rules.exact import ExactRule
from aalconvert.rules.recompute import CHAIN_KEY, POINTWISE_KEY, apply_chain_site, layer_chains, pointwise_sites
from aalconvert.rules.saved_pack import PAYLOAD_KEY as SAVED_PACK_KEY
from aalconvert.rules.saved_pack import apply_saved_pack_site, saved_pack_site
from aalconvert.rules.swap import TypeSwapRule
from aalconvert.rules.wiring import swap_module

_APPROX_VARIANTS: dict[type[nn.Module], type[nn.Module]] = {
    nn.Linear: approx.ApproxLinear,
    nn.Conv1d: approx.ApproxConv1d,
    nn.Conv2d: approx.ApproxConv2d,
    nn.BatchNorm1d: approx.ApproxBatchNorm1d,
    nn.BatchNorm2d: approx.ApproxBatchNorm2d,
    nn.LayerNorm: approx.ApproxLayerNorm,
    nn.GELU: approx.ApproxGELU,
    nn.SiLU: approx.ApproxSiLU,
    nn.Softmax: approx.ApproxSoftmax,
}


LOSS_HEAD_KEY = "loss_head"
SHARED_RELU_KEY = "shared_relu"
# Torch types whose variant under this rule keeps a k-bit copy of its input (not softmax: its output).
_INPUT_COPYING = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GELU, nn.SiLU)


class ApproxRule(ExactRule):
    name = "approx4"
    description = "k-bit copies of saved inputs (linear, conv, norms, GELU/SiLU, softmax, attention matmuls)"
    forward_exact = True
    gradient_exact = False

    def __init__(self, options: ApproxOptions | None = None) -> None:
        self.options = options or ApproxOptions()
        self.name = f"approx{self.options.bits}"
        self.description = (
            f"{self.options.bits}-bit copies of what is saved for backward (linear, conv, norms, "
            "activations, attention, functional ops); layers after a norm/activation share its copy; "
            "ReLU/dropout/max-pool masked as in exact; a language model's loss head as in loss_head"
        )

    @classmethod
    def from_options(cls, options: dict[str, Any], *, bits: int) -> "ApproxRule":
        if "bits" in options and options["bits"] != bits:
            raise ConversionError(
                f"bits={options['bits']!r} contradicts rule 'approx{bits}'; "
                f"drop bits= or choose the rule 'approx{options['bits']}'"
            )
        known = ("stochastic", "group_size", "min_numel", "scale_dtype", "companding")
        return cls(ApproxOptions(bits=bits, **{k: options[k] for k in known if k in options}))

    def find(self, facts: ModelFacts) -> tuple[list[Site], list[Skip]]:
        # Every ReLU takes its mask: the layers reading it keep a k-bit copy, not the output.
        sites, skips = TypeSwapRule.find(self, facts)
        zoo_sites, zoo_skips = self._transposed_linear_sites(facts)
        pointwise, pointwise_skips = pointwise_sites(self.name, facts, self.options.bits)
        sites, skips = sites + zoo_sites + pointwise, skips + zoo_skips + pointwise_skips
        core_sites, core_skips = attention_sites(
            facts, self.name, ApproxAttention, self.option_values(),
            f"keeps {self.options.bits}-bit copies of its functional softmax outputs and matmul operands",
        )
        gated_sites, gated_skips = gated_mlp_sites(
            facts, self.name, ApproxGatedMLP, self.option_values(),
            f"act(gate) * up keeps {self.options.bits}-bit copies of gate and up only",
        )
        sites, skips = sites + core_sites + gated_sites, skips + core_skips + gated_skips
        # The loss head's site wins over a chain rebuilding the output projection's input
        # (RoBERTa's lm_head.decoder after lm_head.layer_norm): it drops the log-softmax of
        # tokens x vocabulary, far more than that input.
        loss_heads = self._loss_head_sites(facts)
        heads = {site.module_name for site in loss_heads}
        chain_sites = [site for site in self._chain_sites(facts) if site.module_name not in heads] + loss_heads
        rebuilt = {site.module_name for site in chain_sites}
        sites = [site for site in sites if site.module_name not in rebuilt] + chain_sites
        sites = self._with_shared_copy_relus(facts, sites)
        root_sites, root_skips = saved_pack_site(
            facts, self.name, self.options.bits, {site.module_name for site in sites})
        return sites + root_sites, skips + root_skips

    def _with_shared_copy_relus(self, facts: ModelFacts, sites: list[Site]) -> list[Site]:
        """``sites`` with a ``SharedCopyReLU`` site for each ReLU whose output a plain variant
        site of this rule reads directly (and so keeps a k-bit copy of that very tensor).

        Listed last, so the readers' own sites are accepted first (their claims satisfy
        ``requires``); each ReLU's mask site stays in the list after it as the fallback.
        Stochastic rounding is not sign preserving: its ReLUs keep their masks.
        """
        if self.options.stochastic:
            return sites
        copying = {site.module_name for site in sites
                   if not site.payload and type(facts.modules[site.module_name]) in _INPUT_COPYING}
        shared = []
        for site in sites:
            if site.payload or type(facts.modules[site.module_name]) is not nn.ReLU:
                continue
            reader = _copying_reader(facts, site.module_name, copying)
            if reader is not None:
                shared.append(Site(
                    self.name, site.module_name,
                    f"keeps no mask: reads its exact mask from the {self.options.bits}-bit copy of its "
                    f"output that {reader} keeps (sign-preserving rounding)",
                    payload={SHARED_RELU_KEY: True}, requires=(reader,)))
        fallbacks = {site.module_name for site in shared}
        return ([site for site in sites if site.module_name not in fallbacks] + shared
                + [site for site in sites if site.module_name in fallbacks])

    def _chain_sites(self, facts: ModelFacts) -> list[Site]:
        """Layers whose input a norm/activation chain rebuilds from the chain start's k-bit copy.

        The chain start (LayerNorm, GELU, batch norm...) keeps a k-bit copy of
        its input under this rule anyway; the layer shares that copy instead of
        keeping a second one of its own input. Listed after every other site, so
        the chain's modules are this rule's variants by the time it is applied.
        """
        chains, _ = layer_chains(facts, self.name)  # a layer without a chain keeps its own copy
        return [
            Site(self.name, name,
                 f"input not kept: rebuilt in backward as {' -> '.join(chain.modules)} of the "
                 f"{self.options.bits}-bit copy of its input {chain.start} keeps",
                 payload={CHAIN_KEY: chain})
            for name, chain in chains.items()
        ]

    def _loss_head_sites(self, facts: ModelFacts) -> list[Site]:
        """A language model's output projection, as the ``loss_head`` rule converts it."""
        sites, _ = LossHeadRule().find(facts)  # a model without one is no news under approx
        return [Site(self.name, site.module_name, site.reason, payload={LOSS_HEAD_KEY: True}) for site in sites]

    def _transposed_linear_sites(self, facts: ModelFacts) -> tuple[list[Site], list[Skip]]:
        """Zoo ``Conv1D`` modules (GPT-2's linears, weight stored (in, out)), which no type table lists."""
        sites, skips = [], []
        for name, module in facts.modules.items():
            if type(module).__name__ != "Conv1D" or isinstance(module, ApproxTransposedLinear):
                continue
            problem = transposed_linear_problem(module)
            if problem is not None:
                skips.append(Skip(self.name, name, f"{type(module).__name__} not converted: {problem}"))
                continue
            sites.append(Site(self.name, name, f"keeps a {self.options.bits}-bit copy of what {type(module).__name__} saves"))
        return sites, skips

    def apply(self, model: nn.Module, site: Site, facts: ModelFacts) -> nn.Module:
        if SAVED_PACK_KEY in site.payload:
            return apply_saved_pack_site(model, site, self.options)
        if CHAIN_KEY in site.payload:
            return apply_chain_site(model, site, self.options)
        if LOSS_HEAD_KEY in site.payload:
            return LossHeadRule().apply(model, site, facts)
        if SHARED_RELU_KEY in site.payload:
            module = model.get_submodule(site.module_name)
            return swap_module(model, site.module_name, SharedCopyReLU.from_module(module, **self.option_values()))
        if PAYLOAD_KEY in site.payload:
            return apply_attention_site(model, site, self.option_values())
        module = model.get_submodule(site.module_name)
        if POINTWISE_KEY in site.payload:
            return swap_module(model, site.module_name, PointwiseVariant.from_module(module, **self.option_values()))
        if is_transposed_linear(module):
            variant = ApproxTransposedLinear.from_module(module, **self.option_values())
            return swap_module(model, site.module_name, variant)
        return super().apply(model, site, facts)

    def option_values(self) -> dict[str, Any]:
        """The rule's ApproxOptions as keyword arguments of a variant's from_module."""
        return {field.name: getattr(self.options, field.name) for field in fields(self.options)}

    def variants(self) -> dict[type[nn.Module], type[nn.Module]]:
        return {**super().variants(), **_APPROX_VARIANTS}

    def variant_options(self, module: nn.Module) -> dict[str, Any]:
        return self.option_values() if type(module) in _APPROX_VARIANTS else {}

    def site_reason(self, module: nn.Module, variant: type[nn.Module]) -> str:
        if type(module) in _APPROX_VARIANTS:
            return f"keeps a {self.options.bits}-bit copy of what {type(module).__name__} saves"
        return super().site_reason(module, variant)


def _copying_reader(facts: ModelFacts, relu: str, copying: set[str]) -> str | None:
    """The first module in ``copying`` that reads ``relu``'s output tensor itself (its first
    argument, no view between: ``compress`` shares a copy of the same tensor object only),
    with a weight that needs a gradient if it has one; None when there is none."""
    readers = facts.output_readers(relu)
    node = facts.call_nodes[relu][0] if readers is not None else None
    for reader in readers or ():
        if reader.op != "call_module" or not reader.args or reader.args[0] is not node:
            continue
        name = qualified_name(reader)
        weight = getattr(facts.modules[name], "weight", None)
        if name in copying and (weight is None or weight.requires_grad):
            return name
    return None

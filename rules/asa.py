"""``asa``: auxiliary sign activations for the linear layers of residual branches.

The paper's recipe (methods.md section 2): every linear layer (``nn.Linear``
or a zoo transposed linear such as GPT-2's ``Conv1D``) inside a
transformer / MLP residual branch ``x + F(x)`` (Q, K, V, output projection,
both MLP layers) keeps a 1-bit sign of its input instead of the input.
Embeddings, stems, heads, norms and the attention core stay as they are.
Layers reading the same tensor in one forward share one packed mask. A ReLU
feeding such a layer keeps a 1-bit mask, else it would keep the very input the
layer stopped keeping.
"""

from dataclasses import dataclass
from typing import Any

from torch import fx, nn

from aalconvert.errors import ConversionError
from aalconvert.facts import ModelFacts, qualified_name
from aalconvert.nn.asa import ASAConv2d, ASALinear, ASATransposedLinear, pack_sign, validate_options
from aalconvert.nn.lossless import MASK_ACTIVATIONS, MaskReLU
from aalconvert.nn.routed_linear import RoutedLinears
from aalconvert.nn.zoo_pointwise import PointwiseVariant, pointwise_problem
from aalconvert.nn.zoo_linear import is_transposed_linear, transposed_linear_problem
from aalconvert.rules.recompute import layer_chains
from aalconvert.rules.base import ROUTED_BY, Rule, Site, Skip
from aalconvert.rules.wiring import SharedPack, swap_module

_ASA_VARIANTS: dict[type[nn.Module], type[nn.Module]] = {nn.Linear: ASALinear}
_NONNEGATIVE_PRODUCERS = (nn.ReLU, nn.ReLU6)
VARIANT_CHOICES = ("auto", "sign", "relu")


@dataclass(frozen=True)
class ASAOptions:
    """eps: perturbation size; lr_expansion: weight-gradient scale; variant: "auto" picks
    "relu" for inputs straight from a ReLU and "sign" otherwise."""

    eps: float = 0.01
    lr_expansion: float = 100.0
    variant: str = "auto"

    def __post_init__(self) -> None:
        if self.variant not in VARIANT_CHOICES:
            raise ConversionError(f"asa_variant must be one of {VARIANT_CHOICES}, got {self.variant!r}")
        validate_options(self.eps, self.lr_expansion, "sign", "asa options")


def _asa_variant(module: nn.Module) -> type[nn.Module] | None:
    """The ASA class for ``module``: a plain nn.Linear, a zoo transposed linear (GPT-2 Conv1D),
    or a 1x1 nn.Conv2d used as an MLP layer (PoolFormer, MetaFormer and ConvNeXt-style blocks)."""
    if is_transposed_linear(module):
        return ASATransposedLinear
    if type(module) is nn.Conv2d and _pointwise_conv(module):
        return ASAConv2d
    return _ASA_VARIANTS.get(type(module))


def _pointwise_conv(conv: nn.Conv2d) -> bool:
    """A 1x1 convolution over all channels: a linear layer applied at every position."""
    return (
        conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.groups == 1
        and conv.dilation == (1, 1) and conv.padding in ((0, 0), "valid")
    )


def _routed_owner(facts: ModelFacts, name: str) -> str | None:
    """The parent whose forward hands plain linear ``name``'s weight to one function call
    (``analysis.functional_linears``: torchvision's Swin attention), if ``name`` is never called itself."""
    if type(facts.modules[name]) is not nn.Linear or facts.call_count(name) or len(facts.functional_nodes.get(name, ())) != 1:
        return None
    return name.rpartition(".")[0]


def _unconvertible_reason(module: nn.Module) -> str:
    kind = type(module).__name__
    if kind == "Conv1D":
        return f"{kind} in a residual branch: not converted, {transposed_linear_problem(module)}"
    return (
        f"{kind} in a residual branch: ASA converts nn.Linear, zoo transposed linears "
        "(transformers Conv1D) and 1x1 convolutions only"
    )


def _feeding_relu(facts: ModelFacts, name: str) -> str | None:
    """The plain ReLU whose output is ``name``'s input (through zero-probability dropouts)."""
    nodes = facts.call_nodes.get(name, ())
    source = nodes[0].args[0] if len(nodes) == 1 and nodes[0].args else None
    while isinstance(source, fx.Node) and source.op == "call_module":
        producer = qualified_name(source)
        module = facts.modules[producer]
        if type(module) is nn.ReLU and facts.call_count(producer) == 1:
            return producer
        if not (isinstance(module, nn.Dropout) and module.p == 0) or not source.args:
            return None
        source = source.args[0]
    return None


# Chain starts that keep their very input under BP and that no rule of higher precedence
# than recompute converts: next to ``recompute`` (no approx rule) a layer fed by such a chain
# keeps nothing at all, exactly, where ASA would keep a 1-bit sign.
_RECOMPUTE_STARTS: tuple[type[nn.Module], ...] = (
    nn.LayerNorm, nn.RMSNorm, nn.GroupNorm, nn.GELU, nn.SiLU, nn.Hardswish,
)


def _start_keeps_input_for_recompute(facts: ModelFacts, start: str) -> bool:
    """Whether the recompute rule's layer fed by a chain from ``start`` keeps nothing of its own.

    True for torch's norms and activations that save their input object itself
    (``_RECOMPUTE_STARTS``, exact types: a subclass may compute otherwise) and for
    zoo norms and activations (``input_chain`` takes them as starts only when BP
    keeps their input, and recompute's own variant keeps exactly that). Batch
    norms are left out: on CNNs the paper's recipe (ASA on the 1x1 convolutions)
    stays as measured; so are ReLU6 / Hardtanh / LeakyReLU starts, which ``exact``
    converts to 1-bit masks before recompute could use them.
    """
    module = facts.modules[start]
    if type(module) in _RECOMPUTE_STARTS:
        return True
    if isinstance(module, nn.modules.batchnorm._BatchNorm) or type(module) in MASK_ACTIVATIONS:
        return False
    return isinstance(module, PointwiseVariant) or pointwise_problem(module) is None


def _calls_problem(facts: ModelFacts, name: str) -> str | None:
    """Why ASA cannot take every call of ``name``, or None. A layer called more than once (ALBERT's
    shared layer, a weight-tied block) takes ASA when each call is in a residual branch: each
    call keeps the sign of its own input, and the weight gradient sums the calls' as BP's does."""
    calls = facts.call_nodes.get(name, ())
    if not calls:
        return "not called in the traced forward; ASA needs a traced call"
    outside = [node for node in calls if not any(node in block.branch_calls for block in facts.blocks)]
    if len(calls) > 1 and outside:
        return (f"called {len(calls)} times, {len(outside)} of them outside a residual branch; ASA takes a "
                "layer whose every call is in one")
    return None


class ASARule(Rule):
    name = "asa"
    description = "ASA: linear layers in residual branches keep a 1-bit sign of their input"
    forward_exact = False
    gradient_exact = False

    def __init__(self, options: ASAOptions | None = None) -> None:
        self.options = options or ASAOptions()
        self.shared = SharedPack("packed_sign", pack_sign)
        # A layer whose input its norm/activation chain rebuilds keeps nothing under recompute
        # (exactly, when the chain start keeps its input itself) or approx (sharing the chain
        # start's copy): less than a 1-bit sign, so next to one of them ASA leaves it
        # (``registry.resolve`` sets this to the rule's name).
        self.leave_chains: str | None = None

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> "ASARule":
        names = {"asa_eps": "eps", "asa_lr_expansion": "lr_expansion", "asa_variant": "variant"}
        return cls(ASAOptions(**{field: options[key] for key, field in names.items() if key in options}))

    def find(self, facts: ModelFacts) -> tuple[list[Site], list[Skip]]:
        sites, skips, seen = [], [], set()
        if self.leave_chains:
            chains, _ = layer_chains(facts, self.name)
            for name, chain in chains.items():
                if self.leave_chains == "recompute" and not _start_keeps_input_for_recompute(facts, chain.start):
                    continue
                seen.add(name)
                skips.append(Skip(self.name, name, (
                    f"left to {self.leave_chains}: its input is rebuilt from {' -> '.join(chain.modules)}, "
                    "keeping less than a 1-bit sign")))
        for block in facts.blocks:
            for name in block.branch_weighted:
                if name in seen:
                    continue
                seen.add(name)
                module = facts.modules[name]
                if isinstance(module, (ASALinear, ASAConv2d, ASATransposedLinear)):
                    continue
                if _asa_variant(module) is None:
                    skips.append(Skip(self.name, name, _unconvertible_reason(module)))
                    continue
                routed = _routed_owner(facts, name)
                if routed is not None:
                    sites.append(Site(self.name, name, (
                        f"input kept as a 1-bit sign mask (ASA, eps={self.options.eps}); the F.linear call on "
                        f"this layer's weight in {routed}'s own forward is routed to it"),
                        payload={"variant": self._variant(facts, name), ROUTED_BY: routed}))
                    continue
                problem = _calls_problem(facts, name)
                if problem is not None:
                    skips.append(Skip(self.name, name, problem))
                    continue
                variant = self._variant(facts, name)
                relu = _feeding_relu(facts, name)
                if relu is not None and relu not in seen:
                    seen.add(relu)
                    sites.append(Site(self.name, relu, f"keeps a 1-bit mask: its output feeds ASA layer {name}"))
                sites.append(
                    Site(
                        self.name,
                        name,
                        f"input kept as a 1-bit {variant} mask (ASA, eps={self.options.eps}) in a residual branch",
                        payload={"variant": variant},
                    )
                )
        return sites, skips

    def _variant(self, facts: ModelFacts, name: str) -> str:
        if self.options.variant != "auto":
            return self.options.variant
        producer = facts.input_producer(name)
        return "relu" if isinstance(producer, _NONNEGATIVE_PRODUCERS) else "sign"

    def apply(self, model: nn.Module, site: Site, facts: ModelFacts) -> nn.Module:
        module = model.get_submodule(site.module_name)
        if "variant" not in site.payload:
            return swap_module(model, site.module_name, MaskReLU.from_module(module))
        variant = _asa_variant(module).from_module(
            module,
            eps=self.options.eps,
            lr_expansion=self.options.lr_expansion,
            variant=site.payload["variant"],
        )
        owner = site.payload.get(ROUTED_BY)
        if owner is None:
            self.shared.wire([variant])
            return swap_module(model, site.module_name, variant)
        model = swap_module(model, site.module_name, variant)
        return swap_module(model, owner, RoutedLinears.from_module(model.get_submodule(owner)))

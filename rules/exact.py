"""``exact``: lossless 1-bit masks for ReLU, ReLU6, Hardtanh, LeakyReLU and dropout,
1-byte argmax for max-pool; masks torch's ops save elsewhere (functional dropout,
``masked_fill``, SDPA's dropout mask on CPU) in 1 bit (``rules/saved_pack.py``).

Forward and gradients are bit-identical to ordinary backprop (methods.md section 4).
A mask replaces the tensor torch keeps for the activation's backward; where
someone else keeps that very tensor anyway, the mask would only add to it, and
the activation is left as is:

- ReLU keeps its output: left when a following layer keeps it (a conv, linear or
  norm module, or a functional op such as ``x @ w``, reading it directly or
  through views such as ``flatten``);
- Hardtanh / ReLU6 / LeakyReLU keep their input: left when another reader of
  that input keeps it, or its producer keeps its output (a plain ReLU, sigmoid,
  softmax, ...). In place, torch keeps a private copy of the input
  (``hardtanh_``, torch >= 2.13) -- the mask always pays -- or the output
  (``leaky_relu_``), the same storage as the input: both sides are looked at.

Activations that take a mask keep nothing full-size, so they count as keeping
nothing when their neighbours are decided (settled by repeating until no
decision changes).
"""

import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from aalconvert.facts import ModelFacts, keeps_input, qualified_name
from aalconvert.nn.lossless import MASK_ACTIVATIONS, CompactMaxPool2d, MaskDropout, inplace_keeps
from aalconvert.rules.base import Site, Skip
from aalconvert.rules.saved_pack import PAYLOAD_KEY as SAVED_PACK_KEY
from aalconvert.rules.saved_pack import apply_saved_pack_site, saved_pack_site
from aalconvert.rules.swap import TypeSwapRule
from aalconvert.trace import is_linear_like


# Functional ops whose backward keeps a tensor operand (as torch saves it: the same storage).
_KEEPING_FUNCTIONS = (
    operator.matmul, torch.matmul, torch.mm, torch.bmm, torch.einsum, torch.addmm,
    F.linear, F.bilinear, F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d,
    F.conv_transpose3d, F.layer_norm, F.batch_norm, F.group_norm, F.instance_norm, F.rms_norm,
    F.gelu, F.silu, F.mish, F.leaky_relu, F.elu, F.hardswish, F.hardtanh, F.softplus, F.logsigmoid,
    operator.mul, torch.mul, F.scaled_dot_product_attention,
)
_KEEPING_METHODS = ("matmul", "__matmul__", "mm", "bmm", "mul", "__mul__", "mul_")
# Ops whose output is a view of their input: whoever keeps the view keeps the very storage.
_VIEW_METHODS = ("view", "reshape", "flatten", "unflatten", "permute", "transpose", "unsqueeze",
                 "squeeze", "expand", "t", "view_as", "reshape_as", "unfold", "__getitem__", "chunk",
                 "split", "narrow")
_VIEW_FUNCTIONS = (torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.unsqueeze,
                   torch.squeeze, operator.getitem, torch.chunk, torch.split, torch.narrow)
_VIEW_MODULES = (nn.Flatten, nn.Unflatten, nn.Identity)


def _keeps_operand(node) -> bool:
    """True when ``node``'s backward keeps its tensor operands (a mul only with another tensor)."""
    if node.op == "call_function":
        if node.target in (operator.mul, torch.mul):
            return sum(isinstance(a, fx.Node) for a in node.args[:2]) == 2
        return node.target in _KEEPING_FUNCTIONS
    if node.op == "call_method":
        if node.target in ("mul", "__mul__", "mul_"):
            return sum(isinstance(a, fx.Node) for a in node.args[:2]) == 2
        return node.target in _KEEPING_METHODS
    return False


def _is_view(facts: ModelFacts, node) -> bool:
    if node.op == "call_module":
        return isinstance(facts.modules.get(qualified_name(node)), _VIEW_MODULES)
    if node.op == "call_method":
        return node.target in _VIEW_METHODS
    return node.op == "call_function" and node.target in _VIEW_FUNCTIONS


def _describe(facts: ModelFacts, node) -> str:
    if node.op == "call_module":
        return qualified_name(node)
    target = node.target if isinstance(node.target, str) else getattr(
        node.target, "__name__", str(node.target))
    return f"the functional {target} ({node.name})"


def _reader_keeps(facts: ModelFacts, node, masked: frozenset[str]) -> bool:
    """Whether ``node`` keeps the tensor it reads for its own backward."""
    if node.op == "call_module":
        name = qualified_name(node)
        if name in masked:
            return False
        module = facts.modules[name]
        return is_linear_like(module) or keeps_input(module)
    return _keeps_operand(node)


def _first_keeper(facts: ModelFacts, readers, masked: frozenset[str], skip=None) -> str | None:
    """The first of ``readers``, or of the readers of their views, that keeps the tensor (described)."""
    pending = [reader for reader in readers if reader is not skip]
    seen = set()
    while pending:
        node = pending.pop()
        if node in seen:
            continue
        seen.add(node)
        if _reader_keeps(facts, node, masked):
            return _describe(facts, node)
        if _is_view(facts, node):
            pending.extend(user for user in node.users if user is not skip)
    return None


def _keeping_reader(facts: ModelFacts, start, skip, masked: frozenset[str]) -> str | None:
    """A node reading ``start``'s tensor (directly or through views) that keeps it, other than ``skip``."""
    return _first_keeper(facts, start.users, masked, skip)


def kept_by_reader(facts: ModelFacts, name: str, masked: frozenset[str] = frozenset()) -> str | None:
    """What keeps ``name``'s output for its own backward anyway, if anything.

    A module (conv, linear, norm, ...) or a functional op (``x @ w``, ``F.linear``,
    ``a * b``, ...) reading the output, directly or through views (``flatten``,
    ``nn.Flatten``, ``reshape``, ``x[...]``), which alias the same storage.
    Activations named in ``masked`` keep a mask only and count as keeping nothing.
    """
    nodes = facts.call_nodes.get(name, ())
    readers = facts.output_readers(name)
    if readers is None or len(nodes) != 1:
        return None
    return _first_keeper(facts, readers, masked)


# Modules and functional ops whose backward keeps their output.
_OUTPUT_KEEPING_MODULES = (nn.ReLU, nn.Sigmoid, nn.Tanh, nn.Softmax, nn.LogSoftmax)
_OUTPUT_KEEPING_FUNCTIONS = (torch.relu, F.relu, torch.sigmoid, torch.tanh, torch.exp, F.softmax,
                             torch.softmax, F.log_softmax, torch.log_softmax, torch.sqrt, torch.rsqrt)
_OUTPUT_KEEPING_METHODS = ("relu", "sigmoid", "tanh", "exp", "softmax", "log_softmax", "sqrt", "rsqrt")


def _producer_keeps(facts: ModelFacts, node, masked: frozenset[str]) -> str | None:
    """What keeps ``node``'s value because it produced it (its backward keeps its output)."""
    if node.op == "call_module":
        name = qualified_name(node)
        module = facts.modules.get(name)
        if name in masked or module is None:
            return None
        if isinstance(module, _OUTPUT_KEEPING_MODULES) or getattr(module, "inplace", False) is True:
            return name
        return None
    if node.op == "call_function" and node.target in _OUTPUT_KEEPING_FUNCTIONS:
        return _describe(facts, node)
    if node.op == "call_method" and node.target in _OUTPUT_KEEPING_METHODS:
        return _describe(facts, node)
    return None


def kept_input_elsewhere(facts: ModelFacts, name: str, masked: frozenset[str] = frozenset()) -> str | None:
    """What keeps the tensor module ``name`` reads (its only call), apart from ``name`` itself.

    Walks back through views to the tensor that owns the storage; then its producer
    (if its backward keeps its output) and every reader, through views, count.
    """
    nodes = facts.call_nodes.get(name, ())
    if len(nodes) != 1 or not nodes[0].args or not isinstance(nodes[0].args[0], fx.Node):
        return None  # untraced or called several times: as for a ReLU, the mask is taken
    call = nodes[0]
    base = call.args[0]
    while _is_view(facts, base) and base.args and isinstance(base.args[0], fx.Node):
        base = base.args[0]
    producer = _producer_keeps(facts, base, masked)
    if producer is not None:
        return producer
    return _keeping_reader(facts, base, call, masked)


def _kept_anyway(facts: ModelFacts, name: str, masked: frozenset[str]) -> str | None:
    """Why the tensor ``name``'s backward keeps is kept by someone else anyway (None: the mask pays)."""
    module = facts.modules[name]
    if facts.call_count(name) == 0:  # e.g. the act of timm's BatchNormAct2d, a leaf of the trace
        return (
            "not seen in the traced graphs (called inside a module traced as a whole): whether "
            "its tensor is kept anyway is unknown, and a mask could add to it"
        )
    if type(module) is nn.ReLU:
        reader = kept_by_reader(facts, name, masked)
        return None if reader is None else f"{reader} keeps this ReLU's output anyway; a mask would add to it"
    kind = type(module).__name__
    inplace = bool(getattr(module, "inplace", False))
    if inplace and isinstance(module, nn.Hardtanh) and inplace_keeps("hardtanh_") == "input":
        return None  # torch keeps a private copy of the input: nobody else can keep it
    keeper = kept_input_elsewhere(facts, name, masked)
    if keeper is not None:
        return f"{keeper} keeps this {kind}'s input anyway; a mask would add to it"
    if inplace:  # torch keeps the output: the same storage as the input
        reader = kept_by_reader(facts, name, masked)
        if reader is not None:
            return f"{reader} keeps this in-place {kind}'s output anyway; a mask would add to it"
    return None


@dataclass(frozen=True)
class ExactOptions:
    """The exact rule has no options."""


class ExactRule(TypeSwapRule):
    name = "exact"
    description = (
        "lossless: ReLU, ReLU6, Hardtanh, LeakyReLU and dropout keep a 1-bit mask, "
        "max-pool a 1-byte argmax, and masks functional ops save are kept in 1 bit"
    )
    forward_exact = True
    gradient_exact = True

    def __init__(self, options: ExactOptions | None = None) -> None:
        self.options = options or ExactOptions()
        # Masks torch's ops save, packed in 1 bit on the root; an approx rule's packer does it
        # too (with k-bit activations), so next to one this is off (``registry.resolve``).
        self.pack_masks = True

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> "ExactRule":
        return cls()

    def variants(self) -> dict[type[nn.Module], type[nn.Module]]:
        return {**MASK_ACTIVATIONS, nn.Dropout: MaskDropout, nn.MaxPool2d: CompactMaxPool2d}

    def find(self, facts: ModelFacts) -> tuple[list[Site], list[Skip]]:
        sites, skips = super().find(facts)
        activations = {site.module_name for site in sites
                       if type(facts.modules[site.module_name]) in MASK_ACTIVATIONS}
        # Start with every activation masked; drop those whose tensor someone else keeps
        # until nothing changes (dropping one can only make its neighbours keep more).
        masked = frozenset(activations)
        reasons: dict[str, str] = {}
        changed = True
        while changed:
            changed = False
            for name in sorted(masked):
                reason = _kept_anyway(facts, name, masked)
                if reason is not None:
                    reasons[name] = reason
                    masked = masked - {name}
                    changed = True
        kept = [site for site in sites if site.module_name not in reasons]
        skips += [Skip(self.name, name, reason) for name, reason in reasons.items()]
        if self.pack_masks:
            root_sites, root_skips = saved_pack_site(facts, self.name, None, {s.module_name for s in kept})
            kept, skips = kept + root_sites, skips + root_skips
        return kept, skips

    def apply(self, model: nn.Module, site: Site, facts: ModelFacts) -> nn.Module:
        if SAVED_PACK_KEY in site.payload:
            return apply_saved_pack_site(model, site, None)
        return super().apply(model, site, facts)

    def site_reason(self, module: nn.Module, variant: type[nn.Module]) -> str:
        if isinstance(module, nn.MaxPool2d):
            return "keeps a 1-byte in-window argmax instead of int64 indices (exact)"
        return "keeps a 1-bit mask instead of a full tensor (exact)"

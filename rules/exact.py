"""``exact``: lossless 1-bit masks for ReLU and dropout, 1-byte argmax for max-pool.

Forward and gradients are bit-identical to ordinary backprop (methods.md section 4).
A ReLU whose output a following layer keeps anyway (a conv, linear or norm
module, or a functional op such as ``x @ w``, reading it directly or through
views such as ``flatten``) is left as is: its mask would be kept on top of that
very tensor.
"""

import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from aalconvert.facts import ModelFacts, keeps_input, qualified_name
from aalconvert.nn.lossless import CompactMaxPool2d, MaskDropout, MaskReLU
from aalconvert.rules.base import Site, Skip
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


def kept_by_reader(facts: ModelFacts, name: str) -> str | None:
    """What keeps ``name``'s output for its own backward anyway, if anything.

    A module (conv, linear, norm, ...) or a functional op (``x @ w``, ``F.linear``,
    ``a * b``, ...) reading the output, directly or through views (``flatten``,
    ``nn.Flatten``, ``reshape``, ``x[...]``), which alias the same storage.
    """
    pending = list(facts.output_readers(name) or ())
    seen = set()
    while pending:
        node = pending.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.op == "call_module":
            reader = qualified_name(node)
            module = facts.modules[reader]
            if is_linear_like(module) or keeps_input(module):
                return reader
        elif _keeps_operand(node):
            target = node.target if isinstance(node.target, str) else getattr(
                node.target, "__name__", str(node.target))
            return f"the functional {target} ({node.name})"
        if _is_view(facts, node):
            pending.extend(node.users)
    return None


@dataclass(frozen=True)
class ExactOptions:
    """The exact rule has no options."""


class ExactRule(TypeSwapRule):
    name = "exact"
    description = "lossless: ReLU and dropout keep a 1-bit mask, max-pool a 1-byte argmax"
    forward_exact = True
    gradient_exact = True

    def __init__(self, options: ExactOptions | None = None) -> None:
        self.options = options or ExactOptions()

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> "ExactRule":
        return cls()

    def variants(self) -> dict[type[nn.Module], type[nn.Module]]:
        return {nn.ReLU: MaskReLU, nn.Dropout: MaskDropout, nn.MaxPool2d: CompactMaxPool2d}

    def find(self, facts: ModelFacts) -> tuple[list[Site], list[Skip]]:
        sites, skips = super().find(facts)
        kept = []
        for site in sites:
            reader = None
            if type(facts.modules[site.module_name]) is nn.ReLU:
                reader = kept_by_reader(facts, site.module_name)
            if reader is None:
                kept.append(site)
            else:
                skips.append(Skip(self.name, site.module_name,
                                  f"{reader} keeps this ReLU's output anyway; a mask would add to it"))
        return kept, skips

    def site_reason(self, module: nn.Module, variant: type[nn.Module]) -> str:
        if isinstance(module, nn.MaxPool2d):
            return "keeps a 1-byte in-window argmax instead of int64 indices (exact)"
        return "keeps a 1-bit mask instead of a full tensor (exact)"

"""``exact``: lossless 1-bit masks for ReLU and dropout, 1-byte argmax for max-pool.

Forward and gradients are bit-identical to ordinary backprop (methods.md section 4).
A ReLU whose output a following layer keeps anyway (a conv or linear reading it
directly) is left as is: its mask would be kept on top of that very tensor.
"""

from dataclasses import dataclass
from typing import Any

from torch import nn

from aalconvert.facts import ModelFacts, keeps_input, qualified_name
from aalconvert.nn.lossless import CompactMaxPool2d, MaskDropout, MaskReLU
from aalconvert.rules.base import Site, Skip
from aalconvert.rules.swap import TypeSwapRule
from aalconvert.trace import is_linear_like


def kept_by_reader(facts: ModelFacts, name: str) -> str | None:
    """The module that keeps ``name``'s output for its own backward anyway, if any."""
    for node in facts.output_readers(name) or ():
        if node.op != "call_module":
            continue
        reader = qualified_name(node)
        module = facts.modules[reader]
        if is_linear_like(module) or keeps_input(module):
            return reader
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

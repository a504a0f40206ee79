"""``exact``: lossless 1-bit masks for ReLU and dropout, 1-byte argmax for max-pool.

Forward and gradients are bit-identical to ordinary backprop (methods.md section 4).
"""

from dataclasses import dataclass
from typing import Any

from torch import nn

from aalconvert.nn.lossless import CompactMaxPool2d, MaskDropout, MaskReLU
from aalconvert.rules.swap import TypeSwapRule


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

    def site_reason(self, module: nn.Module, variant: type[nn.Module]) -> str:
        if isinstance(module, nn.MaxPool2d):
            return "keeps a 1-byte in-window argmax instead of int64 indices (exact)"
        return "keeps a 1-bit mask instead of a full tensor (exact)"

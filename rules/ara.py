"""``ara``: auxiliary residual activations on post-activation residual chains.

Inside each group of residual blocks (``aalconvert.analysis.group_blocks``),
the weighted layers that read a block input (other than the first block's)
take their weight gradient from the group anchor instead of keeping their own
input; the ReLUs whose outputs are block inputs keep a 1-bit mask, without
which those inputs would stay alive and ARA would save nothing (methods.md 1).
"""

from dataclasses import dataclass
from typing import Any

from torch import nn

from aalconvert.analysis import ARAGroup, group_blocks, ungrouped_blocks
from aalconvert.errors import ConversionError
from aalconvert.facts import ModelFacts
from aalconvert.nn.ara import ARAConv1d, ARAConv2d, ARALinear
from aalconvert.nn.lossless import MaskReLU
from aalconvert.rules.base import Rule, Site, Skip
from aalconvert.rules.wiring import TensorSlot, is_wired, swap_module

_ARA_VARIANTS: dict[type[nn.Module], type[nn.Module]] = {
    nn.Linear: ARALinear,
    nn.Conv1d: ARAConv1d,
    nn.Conv2d: ARAConv2d,
}


@dataclass(frozen=True)
class ARAOptions:
    """group: blocks per group -- k >= 1, one k per run of equal shapes, or "stage"."""

    group: int | tuple[int, ...] | str = 2

    def __post_init__(self) -> None:
        group = self.group
        if isinstance(group, list):
            object.__setattr__(self, "group", tuple(group))
            group = self.group
        valid_int = lambda k: isinstance(k, int) and not isinstance(k, bool) and k >= 1
        if group == "stage" or valid_int(group):
            return
        if isinstance(group, tuple) and group and all(valid_int(k) for k in group):
            return
        raise ConversionError(
            f"ara_group must be an int >= 1, a list of such ints (one per run of equal "
            f"shapes), or 'stage'; got {group!r}"
        )


class ARARule(Rule):
    name = "ara"
    description = "ARA: residual-chain layers take dW from the group's input (k blocks per group)"
    forward_exact = True
    gradient_exact = False

    def __init__(self, options: ARAOptions | None = None) -> None:
        self.options = options or ARAOptions()

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> "ARARule":
        if "ara_group" in options:
            return cls(ARAOptions(group=options["ara_group"]))
        return cls()

    def find(self, facts: ModelFacts) -> tuple[list[Site], list[Skip]]:
        groups = group_blocks(facts.blocks, self.options.group)
        sites: list[Site] = []
        skips = [
            Skip(self.name, left.block.name, left.reason)
            for left in ungrouped_blocks(facts.blocks, self.options.group)
        ]
        for index, group in enumerate(groups):
            refusal = self._refusal(group, facts)
            if refusal is not None:
                skips.extend(Skip(self.name, name, refusal) for name in group.ara_layers)
                continue
            sites.extend(self._group_sites(index, group))
        return sites, skips

    def _refusal(self, group: ARAGroup, facts: ModelFacts) -> str | None:
        for name in (*group.anchor_consumers, *group.ara_layers):
            module = facts.modules[name]
            if is_wired(module) or type(module) in _ARA_VARIANTS.values():
                return "already converted by ARA"
            if type(module) not in _ARA_VARIANTS:
                return f"{name} is a {type(module).__name__}, not a Linear/Conv1d/Conv2d"
            if facts.call_count(name) != 1:
                return f"{name} is called {facts.call_count(name)} times; ARA needs one call"
        return None

    def _group_sites(self, index: int, group: ARAGroup) -> list[Site]:
        anchor = group.anchor_consumers[0]
        size = len(group.blocks)
        sites = [
            Site(self.name, relu, f"keeps a 1-bit mask: its output is a block input of ARA group {index} ({size} blocks)")
            for relu in group.mask_relus
        ]
        sites += [
            Site(
                self.name,
                layer,
                f"input not kept: weight gradient uses the anchor {anchor} input (ARA group {index}, {size} blocks)",
                payload={"role": "layer"},
            )
            for layer in group.ara_layers
        ]
        # Last, so the wiring sees the swapped layers: the anchor consumer carries the group's slot.
        sites.append(
            Site(
                self.name,
                anchor,
                f"kept as in BP: its input is the anchor of ARA group {index} ({size} blocks)",
                payload={"role": "anchor", "layers": group.ara_layers},
            )
        )
        return sites

    def apply(self, model: nn.Module, site: Site, facts: ModelFacts) -> nn.Module:
        module = model.get_submodule(site.module_name)
        role = site.payload.get("role")
        if role == "layer":
            return swap_module(model, site.module_name, _ARA_VARIANTS[type(module)].from_module(module))
        if role == "anchor":
            layers = [model.get_submodule(name) for name in site.payload["layers"]]
            converted = [layer for layer in layers if type(layer) in _ARA_VARIANTS.values()]
            if converted:
                TensorSlot("anchor").wire(module, converted, root=model)
            return model
        return swap_module(model, site.module_name, MaskReLU.from_module(module))

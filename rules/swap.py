"""Table-driven rules: swap every module of a listed torch type for its variant.

Used by rules whose decision needs only the module itself (exact masks,
approximate activations). Types match exactly, so a converted variant (a
subclass) or a user's own subclass is never taken for the plain torch module.
"""

from collections.abc import Mapping
from typing import Any

from torch import nn

from aalconvert.errors import ConversionError
from aalconvert.facts import ModelFacts
from aalconvert.rules.base import Rule, Site, Skip
from aalconvert.rules.wiring import swap_module


class TypeSwapRule(Rule):
    """Subclasses provide ``variants`` (torch type -> variant type) and ``variant_options``."""

    def variants(self) -> Mapping[type[nn.Module], type[nn.Module]]:
        raise NotImplementedError

    def variant_options(self, module: nn.Module) -> dict[str, Any]:
        return {}

    def site_reason(self, module: nn.Module, variant: type[nn.Module]) -> str:
        return f"{type(module).__name__} -> {variant.__name__}"

    def find(self, facts: ModelFacts) -> tuple[list[Site], list[Skip]]:
        table = self.variants()
        sites, skips = [], []
        for name, module in facts.modules.items():
            variant = table.get(type(module))
            if variant is None:
                continue
            try:  # the variant's own checks decide; building one shares tensors, copies nothing
                variant.from_module(module, **self.variant_options(module))
            except ConversionError as error:
                skips.append(Skip(self.name, name, str(error)))
            else:
                sites.append(Site(self.name, name, self.site_reason(module, variant)))
        return sites, skips

    def apply(self, model: nn.Module, site: Site, facts: ModelFacts) -> nn.Module:
        module = model.get_submodule(site.module_name)
        variant = self.variants()[type(module)]
        return swap_module(
            model, site.module_name, variant.from_module(module, **self.variant_options(module))
        )

"""The decisions: one rule (or none) per module, with the reason in words.

Rules are asked in precedence order (see ``aalconvert.rules.registry``); the
first site that claims a module wins, and a site is refused when a module it
``requires`` already belongs to another rule. Nothing is modified here.
"""

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

from torch import nn

from aalconvert.errors import ConversionError
from aalconvert.facts import ModelFacts
from aalconvert.rules.base import COVERS, SKIPPED, Rule, Site, Skip

SkipFilter = Callable[[nn.Module, str], bool]


@dataclass
class Plan:
    """Accepted sites by module name, and every module a rule looked at and left."""

    rules: list[Rule]
    sites: dict[str, Site] = field(default_factory=dict)
    skips: list[Skip] = field(default_factory=list)
    claims: dict[str, str] = field(default_factory=dict)

    def accept(self, site: Site) -> str | None:
        """Record ``site`` unless a module it needs belongs to another rule; return why not."""
        if site.module_name in self.claims:
            return f"already converted by {self.claims[site.module_name]!r} (it takes precedence)"
        for required in site.requires:
            owner = self.claims.get(required)
            if owner not in (None, site.rule):
                return f"needs {required} left exact, but {owner!r} converts it"
        self.sites[site.module_name] = site
        for name in (site.module_name, *site.requires):
            self.claims[name] = site.rule
        return None


def skip_filter(skip: Iterable[str] | SkipFilter | None, facts: ModelFacts) -> SkipFilter:
    """Turn convert()'s ``skip`` (module names or a predicate) into a predicate.

    Names must exist in the model; a name also skips everything below it.
    """
    if skip is None:
        return lambda module, name: False
    if callable(skip):
        return skip
    if isinstance(skip, str):
        skip = [skip]
    names = list(skip)
    unknown = [name for name in names if name not in facts.modules]
    if unknown:
        raise ConversionError(
            f"skip= names modules the model does not have: {unknown}; "
            "use qualified names as in model.named_modules()"
        )
    return lambda module, name: any(name == n or name.startswith(n + ".") for n in names)


def make_plan(facts: ModelFacts, rules: list[Rule], skip: SkipFilter) -> Plan:
    """Ask each rule (already in precedence order) for its sites and keep one per module."""
    plan = Plan(rules=rules)
    for rule in rules:
        sites, skips = rule.find(facts)
        plan.skips.extend(skips)
        for site in sites:
            if skip(facts.modules[site.module_name], site.module_name):
                plan.skips.append(Skip(site.rule, site.module_name, "skipped by the skip= option"))
                continue
            if COVERS in site.payload:
                skipped = tuple(name for name, module in facts.modules.items() if skip(module, name))
                site = replace(site, payload={**site.payload, SKIPPED: skipped})
            refusal = plan.accept(site)
            if refusal is not None:
                plan.skips.append(Skip(site.rule, site.module_name, refusal))
    return plan

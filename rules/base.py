"""The Rule interface: find sites in the analysed model, rewrite a site, state its effect.

A rule never decides alone: ``aalconvert.plan`` collects every rule's sites,
keeps one decision per module by precedence, and only then are sites applied.
"""

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import nn

from aalconvert.facts import ModelFacts


SERVES = "serves"
"""Payload key of a site that pays off only when the named module's site is applied too
(a recompute chain's ReLU mask): when that site is dropped, this one is dropped with it."""

COVERS = "covers"
"""Payload key of a site whose rewrite also acts inside the modules below it that have no
site of their own; its value says, for the report, what it does there. The plan adds
``SKIPPED`` to such a site's payload: the modules the user's ``skip=`` names, which it
must leave alone."""

SKIPPED = "skipped"

ROUTED_BY = "routed_by"
"""Payload key of a site whose layer is never called itself: the parent named here runs
``F.linear`` on its weight in its own forward and hands the call to the site's variant
(``aalconvert.nn.routed_linear``). The saving shows on the parent's report row."""


@dataclass(frozen=True)
class Site:
    """One module a rule wants to rewrite, with the reason in words.

    ``payload`` carries what ``apply`` needs beyond the module name (for ARA,
    the slot that carries the group anchor).
    """

    rule: str
    module_name: str
    reason: str
    payload: Mapping[str, Any] = field(default_factory=dict)
    requires: tuple[str, ...] = ()
    """Other modules this site needs left to this rule (e.g. the norm whose kept input rebuilds a layer's input)."""


@dataclass(frozen=True)
class Skip:
    """A module a rule looked at and left as is, and why (the report shows it)."""

    rule: str
    module_name: str
    reason: str


class Rule(ABC):
    """A memory-saving rewrite. Subclasses set the class attributes and ``options``."""

    name: ClassVar[str]
    description: ClassVar[str]
    forward_exact: ClassVar[bool]
    gradient_exact: ClassVar[bool]

    options: Any

    @abstractmethod
    def find(self, facts: ModelFacts) -> tuple[list[Site], list[Skip]]:
        """Where this rule applies in the model, and where it looked but does not."""

    @abstractmethod
    def apply(self, model: nn.Module, site: Site, facts: ModelFacts) -> nn.Module:
        """Rewrite ``site`` in ``model`` (swap the module, wire run-time inputs).

        Returns the model's root, which is a new module only when the site is the root.
        """

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.options!r})"

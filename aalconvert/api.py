"""convert() and revert(): thin orchestration of trace -> facts -> plan -> apply."""

import copy
from collections.abc import Iterable, Sequence
from typing import Any

from torch import nn

from aalconvert.errors import ConversionError
from aalconvert.facts import ModelFacts, gather_facts
from aalconvert.nn import CONVERTED_TYPES
from aalconvert.plan import Plan, SkipFilter, make_plan, skip_filter
from aalconvert.rules.base import Rule
from aalconvert.rules.registry import resolve
from aalconvert.rules.wiring import remove_wiring, swap_module


def _check_model(model: Any) -> None:
    if not isinstance(model, nn.Module):
        raise ConversionError(
            f"convert() takes a torch.nn.Module, got {type(model).__name__}; "
            "pass the model object itself (not a state_dict or a class)"
        )
    on_meta = [name or "<root>" for name, p in model.named_parameters() if p.is_meta]
    if on_meta:
        raise ConversionError(
            f"the model's parameters are on the meta device (e.g. {on_meta[0]}); convert a "
            "materialised model, or use aalconvert.inspect() to study a meta-device model"
        )


def _shallow_copy(model: nn.Module) -> nn.Module:
    """A new module tree that shares every Parameter and buffer with ``model``."""
    memo = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return copy.deepcopy(model, memo)


def plan_conversion(
    model: nn.Module,
    rules: str | Rule | Sequence[str | Rule] = "auto",
    *,
    example_inputs: tuple | None = None,
    skip: Iterable[str] | SkipFilter | None = None,
    **rule_options: Any,
) -> tuple[Plan, ModelFacts]:
    """Validate everything and decide every rewrite, without modifying ``model``."""
    _check_model(model)
    chosen = resolve(rules, rule_options)
    facts = gather_facts(model, example_inputs)
    return make_plan(facts, chosen, skip_filter(skip, facts)), facts


def convert(
    model: nn.Module,
    rules: str | Rule | Sequence[str | Rule] = "auto",
    *,
    example_inputs: tuple | None = None,
    inplace: bool = False,
    skip: Iterable[str] | SkipFilter | None = None,
    **rule_options: Any,
) -> nn.Module:
    """Return ``model`` rewritten to keep less for backward.

    ``rules``: a name (``"auto"``, ``"exact"``, ``"recompute"``, ``"ara"``,
    ``"asa"``, ``"approx8"``, ``"approx4"``, ``"approx2"``), a list of them, or
    Rule objects; see ``aalconvert.rules.available()``. ``rule_options``:
    ``ara_group`` (k, one k per stage, or ``"stage"``), ``asa_eps``,
    ``asa_lr_expansion``, ``asa_variant``, ``bits``, ``stochastic``,
    ``group_size``, ``min_numel``. ``skip``: module names or a predicate
    ``(module, name) -> bool``. ``example_inputs`` give shapes (else structure is used).
    The result shares the original Parameter objects (same state_dict keys);
    converting a converted model changes nothing. Unless ``inplace``, the
    original module tree is left as it was.
    """
    _check_model(model)
    target = model if inplace else _shallow_copy(model)
    plan, facts = plan_conversion(
        target, rules, example_inputs=example_inputs, skip=skip, **rule_options
    )
    for site in plan.sites.values():
        rule = next(r for r in plan.rules if r.name == site.rule)
        target = rule.apply(target, site, facts)
    return target


def revert(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Give back plain torch modules sharing the same Parameters.

    ASA's forward change (``W (x + eps*s)``) is dropped: the reverted model
    computes ``W x`` again, so its outputs differ slightly from the ASA model's.
    """
    _check_model(model)
    target = model if inplace else _shallow_copy(model)
    # Unwire first: a slot's handles point at the hook dicts of the modules it was wired on,
    # so once a variant is swapped out (to_module() may carry its hooks over) they miss.
    remove_wiring(target)
    for name, module in list(target.named_modules()):
        if isinstance(module, CONVERTED_TYPES):
            target = swap_module(target, name, module.to_module())
    return target

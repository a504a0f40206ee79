"""Fit a memory budget: one rule per module, cheapest changes first, so that one training step fits.

The predicted peak is inspect's (``Report.totals``): parameters + optimizer
state + the most bytes alive at once in a simulated step (forward, loss and
backward on fake tensors of a fake copy: ``aalconvert.step_memory``). The model
is traced once.

How the plan is chosen:

1. Tiers. The candidate rules are tried in ``costs.tier_order`` (lossless
   first, then by measured cost per byte saved; checkpointing whole blocks is
   one of them). Tier k's *cumulative* plan is ``make_plan`` with the rules of
   tiers 1..k (a later ``approx`` width replaces an earlier one), without any
   site inside a checkpointed block, and it is estimated once.
2. Units. What tier k's plan decides differently from tier k-1's is cut into
   units that must be taken whole: an ARA group (its anchor wires its layers;
   its ReLU masks pay only with the group), an ASA layer with the ReLU mask
   that feeds it, a recompute layer with the ReLU masks that serve it, any
   other site alone (a checkpointed block is one site). Each unit's saving is
   the change of bytes kept between the two plans at its modules, at modules
   inside it, and at modules that counted a tensor one of its modules also
   keeps (``SavedByModule.counted_at``); what no unit claims goes to the
   tier's root site, if it has one (approx's saved-tensor packer).
3. Order. Units in tier order; within a tier the largest saving first, except
   that in the 4- and 2-bit tiers the model's first and last weighted layers
   go last (they keep their 8-bit copies longest). Taking a prefix of this
   order means every earlier tier is taken whole, which is what each unit's
   saving was estimated under. Checkpointed blocks go in forward order: the
   first blocks' activations are the ones still alive when backward has made
   nearly every gradient, so checkpointing them lowers the peak first.
   ``checkpoint4`` refines ``checkpoint`` on the same blocks (4-bit copies of
   their inputs) and comes right after it (``costs.RuleCost.follows``).
4. Search. The smallest prefix whose plan, estimated on fake tensors, fits the
   budget; found by bisection inside the first tier whose full plan fits.
   Then every approximate tier but the last that the plan fits without is
   left out, the costliest first (``_Ladder.without_needless_tiers``): one
   taken whole on the way, such as 4-bit copies at every checkpointed block,
   may have been needed only until a later one compressed the block whose
   recomputation made the peak.
   Then the checkpointed blocks the plan fits without are left out (both
   their units), last block first (``_Ladder.without_needless_checkpoints``): backward reaches
   them while few gradients exist. Then, where nothing is compressed, the
   lossless units the plan fits without (``_Ladder.without_needless_reruns``).
   The plan's peak is an estimate of the very plan returned, not a sum.
5. Without checkpointing. Checkpointing every block keeps each block's input
   in full and has one block recompute, which can keep more than our rules
   inside the blocks would; so the same is done for the tier order without
   it, used when the first order cannot reach the budget. The floor is the
   lowest predicted peak of BP and of either order's tiers taken whole: where
   gradients and the first layers' activations make the peak (the end of
   backward), a plan that keeps less can peak higher (decoded copies, a
   block recomputing), so the floor is not always the plan that keeps least.
6. Checkpointing the first block too. When the plan found changes numbers
   (an approx, ARA or ASA unit, or checkpointed blocks' 4-bit copies), the
   search is run once more on the tiers that leave every number inside the
   blocks as it is (lossless, the loss head) and checkpointing, whose first
   block is then a candidate (``_lossless_checkpointing``); where that fits,
   it is the plan: a second forward of the first block costs less than
   compressing it. The same order is searched where no other fits.

Limits. The plan holds the step budget less ``HEADROOM`` and, where given,
a kept budget (bytes kept for backward: ``aalconvert.budget_limits``); every
"fits" above means both.

A checkpointed block counts its inputs (or their copies) as kept; the simulated step runs its
recomputation in backward, so the peak counts what it keeps under BP alive
again, with the gradients of everything after it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn
from torch._subclasses import FakeTensorMode

from aalconvert.bisection import first_true
from aalconvert.budget_limits import Limits, check_kept_budget, kept_budget_bytes
from aalconvert.checkpointing import (
    CHECKPOINT_RULES, STATEFUL_CALL, CheckpointRule, CopiedBoundaryRule, held_by_checkpoints, inside,
    recompute_bytes, with_checkpoint_inputs)
from aalconvert.costs import RULE_COSTS, tier_order
from aalconvert.errors import ConversionError
from aalconvert.facts import ModelFacts, gather_facts
from aalconvert.memory import SavedByModule, fake_copy, fake_inputs
from aalconvert.plan import Plan, SkipFilter, make_plan, skip_filter
from aalconvert.report import Report, build_report, format_bytes, optimizer_state_factor
from aalconvert.rules.base import COVERS, SERVES, SKIPPED, Rule, Site, Skip
from aalconvert.rules.registry import AUTO, PRECEDENCE, build_rule, coordinate, resolve
from aalconvert.sizes import parse_size


HEADROOM = 0.02
"""Fraction of the budget the planner leaves free for what its estimate cannot see: tensors made
outside torch's dispatcher (checkpointing's saved RNG states), workspaces (our kernels' CPU path),
optimizer bookkeeping. Predicted step peaks are within 1.4 % of the profiler's measurement on the
examples, except checkpointed convolutional nets (up to 4.4 % under on resnet_bottleneck, about 1.5 % of a
budget that also holds parameters and optimizer state): tests/test_step_memory.py, tests/test_budget.py.
A GPU's caching allocator rounds and fragments on top of that: leave it room below the device's memory
when choosing the budget."""


RERUN_TRIALS = 32
"""The most plans estimated while leaving out lossless units the plan fits without
(``_Ladder.without_needless_reruns``): each is a simulated step, and a deep model has hundreds of
units. Units still untried stay in the plan."""


PLANNED_LOSS_HEAD = "forward"
"""How the planner's loss head makes its gradients (``loss_head_gradients``, unless given): in forward.

The planner fits a step's peak, which the two schemes share (the weight-sized gradient kept from
forward is what backward allocates first), and takes the faster one: one matmul fewer."""


def usable_bytes(budget_bytes: int) -> int:
    """What the planned step may peak at under ``budget_bytes``: the budget less the headroom."""
    return math.floor(budget_bytes * (1 - HEADROOM))


def smallest_budget(peak_bytes: int) -> int:
    """The least budget whose usable part holds ``peak_bytes``."""
    budget = math.ceil(peak_bytes / (1 - HEADROOM))
    while usable_bytes(budget) < peak_bytes:
        budget += 1
    return budget


class BudgetError(ConversionError):
    """The budget is under the floor: even the plan that peaks least does not fit.

    ``floor_bytes``: the least budget that plan fits (its predicted peak and
    the headroom); ``largest_batch``: the largest batch it would fit at the
    budget (0 when none), scaled linearly from the batch given.
    """

    def __init__(self, message: str, floor_bytes: int, largest_batch: int) -> None:
        super().__init__(message)
        self.floor_bytes = floor_bytes
        self.largest_batch = largest_batch


@dataclass(frozen=True)
class Unit:
    """Sites of one tier that are taken together, and the bytes they save (estimated)."""

    tier: str
    sites: tuple[Site, ...]
    saving: int
    sensitive: bool = False

    @property
    def modules(self) -> tuple[str, ...]:
        return tuple(site.module_name for site in self.sites)


@dataclass(frozen=True)
class Choice:
    """One unit the plan takes: its rule, modules, estimated saving (bytes) and why it was needed."""

    rule: str
    modules: tuple[str, ...]
    saving: int
    why: str
    reasons: tuple[str, ...]


@dataclass(frozen=True)
class TierStep:
    """One tier: the predicted peak (bytes) with it and every earlier tier taken whole, and its cost row."""

    rule: str
    units: int
    taken: int
    peak_bytes: int
    cost_per_saved: float | None
    source: str


@dataclass
class BudgetPlan:
    """A per-module plan that fits ``budget_bytes`` (or says by how much it does not), with its estimate.

    ``report`` is inspect's report of the chosen plan (BP vs planned, per
    module); ``decisions`` maps module name -> rule; ``choices`` are the units
    taken in order, each with why; ``tiers`` the tiers tried. The plan fits
    when its predicted peak is under the budget less ``HEADROOM``;
    ``floor_bytes`` is the least budget any plan fits.
    """

    budget_bytes: int | None
    plan: Plan
    report: Report
    decisions: dict[str, str]
    choices: list[Choice]
    tiers: list[TierStep]
    floor_bytes: int
    batch_size: int | None
    facts: ModelFacts = field(repr=False)
    site_tiers: dict[str, int] = field(default_factory=dict, repr=False)
    """Module name -> index into ``tiers`` of the tier plan whose site it takes."""
    plain_blocks: tuple[str, ...] = ()
    """Blocks the planner found it need not checkpoint: the whole-model packer leaves them alone."""
    recompute_bytes: int = 0
    """What the largest checkpointed block keeps under BP: alive again while it recomputes (bytes).

    Already in the predicted peak (the simulated step recomputes), not added to it."""
    kept_budget_bytes: int | None = None
    """The most the plan may keep for backward (bytes), where a kept budget was given."""
    rule_options: dict[str, Any] = field(default_factory=dict, repr=False)
    """The rule options it was planned with: ``convert_with_plan`` builds the same rules."""
    skip: Iterable[str] | SkipFilter | None = field(default=None, repr=False)

    @property
    def peak_bp_bytes(self) -> int:
        return self.report.totals.peak_bp_bytes

    @property
    def peak_bytes(self) -> int:
        """Predicted peak of one training step of the planned model (bytes), recomputation included."""
        return self.report.totals.peak_converted_bytes

    @property
    def kept_bytes(self) -> int:
        """Predicted bytes the planned model keeps for backward (checkpointed blocks' inputs included)."""
        return self.report.totals.converted_bytes

    @property
    def usable_bytes(self) -> int | None:
        """The budget less the headroom: what the predicted peak must stay under (None: no step budget)."""
        return None if self.budget_bytes is None else usable_bytes(self.budget_bytes)

    @property
    def limits(self) -> Limits:
        return Limits(self.usable_bytes, self.kept_budget_bytes)

    @property
    def fits(self) -> bool:
        return self.limits.hold(self.report.totals)

    def to_dict(self) -> dict[str, Any]:
        """Plain data, exact bytes: budget, peaks, floor, tiers, choices, decisions and the report."""
        return {
            "budget_bytes": self.budget_bytes,
            "usable_bytes": self.usable_bytes,
            "kept_budget_bytes": self.kept_budget_bytes,
            "fits": self.fits,
            "peak_bp_bytes": self.peak_bp_bytes,
            "peak_bytes": self.peak_bytes,
            "kept_bp_bytes": self.report.totals.bp_bytes,
            "kept_bytes": self.kept_bytes,
            "floor_bytes": self.floor_bytes,
            "recompute_bytes": self.recompute_bytes,
            "plain_blocks": list(self.plain_blocks),
            "batch_size": self.batch_size,
            "tiers": [vars(step) for step in self.tiers],
            "choices": [{"rule": c.rule, "modules": list(c.modules), "saving_bytes": c.saving,
                         "why": c.why, "reasons": list(c.reasons)} for c in self.choices],
            "decisions": dict(self.decisions),
            "report": self.report.to_dict(),
        }


def candidate_rules(rules: str | Sequence[str] | None) -> list[str]:
    """The rule names the planner may use, in tier order (None: all; "auto" expands to its rules)."""
    if rules is None:
        return tier_order()
    names = [rules] if isinstance(rules, str) else list(rules)
    expanded = [n for name in names for n in (AUTO if name == "auto" else (name,))]
    unknown = [name for name in expanded if name not in RULE_COSTS]
    if unknown or not expanded:
        raise ConversionError(
            f"budget planning takes rules from {', '.join(RULE_COSTS)} (or 'auto'); got {names!r}")
    return tier_order(sorted(set(expanded)))


class _Estimator:
    """Fake-tensor forwards of plans on fresh fake copies of one model, all with the same facts."""

    def __init__(self, model: nn.Module, example_inputs: tuple, labels: Any, optimizer: str | None,
                 skip: Iterable[str] | SkipFilter | None) -> None:
        from aalconvert import api  # api imports this module lazily; import back lazily too

        self.api = api
        self.fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
        self.device = api._estimate_device(model, example_inputs)
        self.target = fake_copy(model, self.fake_mode, self.device).train()
        self.inputs = fake_inputs(example_inputs, self.fake_mode, self.device)
        labels, note = api._forward_labels(model, example_inputs, labels)
        self.keywords = {} if labels is None else {
            "labels": fake_inputs((labels,), self.fake_mode, self.device)[0]}
        self.notes: list[str] = [note] if note else []
        self.optimizer = optimizer
        self.facts = gather_facts(self.target, self.inputs)
        self.skip = skip_filter(skip, self.facts)
        self._kept_by_sites: dict[tuple, SavedByModule] = {}
        self.bp = self.kept(Plan(rules=[]))

    def kept(self, plan: Plan) -> SavedByModule:
        """What a forward of the model converted by ``plan`` keeps, checkpointed blocks' inputs included.

        Remembered per set of sites: the ladders of one planning share their
        first tiers (and bisection revisits prefixes), and one fake step of a
        real model takes seconds.
        """
        key = _sites_key(plan)
        if key not in self._kept_by_sites:
            self._kept_by_sites[key] = self._simulate(plan)
        return self._kept_by_sites[key]

    def _simulate(self, plan: Plan) -> SavedByModule:
        copy = fake_copy(self.target, self.fake_mode, self.device).train()
        copy = apply_plan(copy, plan, self.facts)
        saved = self.api._saved_by_module(copy, self.inputs, self.keywords, self.fake_mode, self.notes)
        if not checkpointed(plan):
            return saved
        with self.fake_mode:  # a second forward: what the checkpoints hold that nothing else saves
            held = held_by_checkpoints(copy, lambda: copy(*self.inputs, **self.keywords),
                                       lambda storage: storage._cdata)
        return with_checkpoint_inputs(saved, held)

    def report(self, plan: Plan, kept: SavedByModule) -> Report:
        estimated_on = self.api._estimated_on(self.notes)
        return build_report(self.facts, plan, self.bp, kept, optimizer=self.optimizer,
                            estimated_on=estimated_on, notes=list(dict.fromkeys(self.notes)))


def _sites_key(plan: Plan) -> tuple:
    """What decides a converted forward: per site, in order, its module, its rule with that rule's options,
    and its payload (reprs: payloads hold chains and graph nodes, not hashable)."""
    rules = {rule.name: repr(rule) for rule in plan.rules}
    return tuple((name, site.rule, rules[site.rule], site.requires,
                  tuple(sorted((key, repr(value)) for key, value in site.payload.items())))
                 for name, site in plan.sites.items())


def apply_plan(model: nn.Module, plan: Plan, facts: ModelFacts) -> nn.Module:
    """Apply every site of ``plan`` to ``model`` (in the plan's order) and return the root."""
    for site in plan.sites.values():
        rule = next(r for r in plan.rules if r.name == site.rule)
        model = rule.apply(model, site, facts)
    return model


def tier_rules(tiers: list[str], rule_options: dict[str, Any]) -> list[Rule]:
    """One Rule object per tier name, built from convert()'s options (checked first)."""
    if "bits" in rule_options:
        raise ConversionError("bits= does not apply with a budget: the planner chooses the bit widths")
    registered = [name for name in tiers if name not in CHECKPOINT_RULES]
    if "loss_head" in registered:
        rule_options = {"loss_head_gradients": PLANNED_LOSS_HEAD, **rule_options}
    approx = [name for name in registered if name.startswith("approx")]
    resolve([name for name in registered if name not in approx] + approx[:1] or ["exact"], rule_options)
    compressing = any(name.startswith("approx") for name in tiers)  # then the first block is better compressed
    checkpoints = {rule.name: rule for rule in (CheckpointRule, CopiedBoundaryRule)}
    return [checkpoints[name](first_block=not compressing) if name in checkpoints
            else build_rule(name, rule_options) for name in tiers]


def leave_plain(plan: Plan, blocks: Sequence[str]) -> Plan:
    """``plan`` with the whole-model sites (the saved-tensor packer) leaving ``blocks`` alone.

    A block the planner chose not to checkpoint after all runs as its own
    sites say (lossless ones, taken before checkpointing), not through the
    k-bit packer: that would cost the time checkpointing was dropped to save.
    """
    if not blocks:
        return plan
    for name, site in list(plan.sites.items()):
        if COVERS in site.payload:
            skipped = tuple(dict.fromkeys((*site.payload.get(SKIPPED, ()), *blocks)))
            plan.sites[name] = replace(site, payload={**site.payload, SKIPPED: skipped})
    return plan


def checkpointed(plan: Plan) -> list[str]:
    """The blocks ``plan`` checkpoints."""
    return [name for name, site in plan.sites.items() if site.rule in CHECKPOINT_RULES]


def _precedence(rule_name: str) -> int:
    """Checkpointing first (it takes whole blocks; from k-bit copies over from full inputs), then the
    registry's precedence."""
    if rule_name in CHECKPOINT_RULES:
        return -1 - CHECKPOINT_RULES.index(rule_name)
    return PRECEDENCE.index(_family(rule_name))


def drop_inside_checkpoints(plan: Plan) -> None:
    """Remove the sites inside checkpointed blocks: checkpointing drops what they keep anyway."""
    blocks = checkpointed(plan)
    for name in [name for name in plan.sites if plan.sites[name].rule not in CHECKPOINT_RULES]:
        block = next((b for b in blocks if inside(name, b)), None)
        if block is not None:
            site = plan.sites.pop(name)
            plan.skips.append(Skip(site.rule, name, f"inside checkpointed block {block}: not converted"))


def cumulative_plans(facts: ModelFacts, rules: list[Rule], skip: SkipFilter,
                     model: nn.Module) -> list[Plan]:
    """Plan k uses the rules of tiers 1..k (the latest approx width only), in precedence order."""
    plans = []
    for k in range(1, len(rules) + 1):
        chosen: dict[str, Rule] = {}
        for rule in rules[:k]:
            chosen[_family(rule.name)] = rule
        ordered = sorted(chosen.values(), key=lambda r: _precedence(r.name))
        coordinate([rule for rule in ordered if rule.name not in CHECKPOINT_RULES])  # as convert() would
        plan = make_plan(facts, ordered, skip)
        drop_inside_checkpoints(plan)
        _drop_failing(plan, facts, model)
        plans.append(plan)
    return plans


def _drop_failing(plan: Plan, facts: ModelFacts, model: nn.Module) -> None:
    from aalconvert import api

    api._drop_sites_that_fail(plan, facts, model)


def _family(name: str) -> str:
    return "approx" if name.startswith("approx") else name


_UNIT_ENDS = {
    # An ARA group's sites come masks first, then layers, then the anchor (rules/ara.py): whole groups.
    "ara": lambda site: site.payload.get("role") == "anchor",
    # An ASA ReLU mask site comes just before the layer it feeds (rules/asa.py).
    "asa": lambda site: "variant" in site.payload,
}


def tier_units(tier: str, plan: Plan, before: Plan, kept: SavedByModule, kept_before: SavedByModule,
               sensitive: set[str]) -> list[Unit]:
    """The units tier ``tier`` adds to ``before``, each with its estimated saving (bytes)."""
    changed = [site for name, site in plan.sites.items()
               if name not in before.sites or before.sites[name].rule != site.rule]
    groups: list[list[Site]] = []
    pending: dict[str, list[Site]] = {}
    for site in changed:
        ends = _UNIT_ENDS.get(site.rule)
        waiting = pending.setdefault(site.rule, [])
        waiting.append(site)
        if ends is None or ends(site):
            groups.append(list(waiting))
            waiting.clear()
    groups += [sites for sites in pending.values() if sites]
    # A site that serves another (a recompute chain's ReLU mask) joins that site's unit.
    owner = {site.module_name: i for i, sites in enumerate(groups) for site in sites}
    for i, sites in enumerate(groups):
        for site in list(sites):
            served = site.payload.get(SERVES)
            if served in owner and owner[served] != i:
                groups[owner[served]].append(site)
                sites.remove(site)
                owner[site.module_name] = owner[served]
    groups = [sites for sites in groups if sites]
    owner = {site.module_name: i for i, sites in enumerate(groups) for site in sites}
    savings = [0] * len(groups)
    root = owner.get("")
    for name in set(kept.bytes_by_module) | set(kept_before.bytes_by_module):
        delta = kept_before.bytes_by_module.get(name, 0) - kept.bytes_by_module.get(name, 0)
        if delta == 0:
            continue
        unit = _owning_unit(name, owner, kept, kept_before)
        unit = root if unit is None else unit
        if unit is not None:
            savings[unit] += delta
    return [Unit(tier, tuple(sites), savings[i], any(s.module_name in sensitive for s in sites))
            for i, sites in enumerate(groups)]


def _owning_unit(name: str, owner: dict[str, int], kept: SavedByModule,
                 kept_before: SavedByModule) -> int | None:
    """The unit whose module is ``name``, shares a tensor with it, or encloses it (not the root)."""
    for candidate in (name, kept.counted_at.get(name), kept_before.counted_at.get(name)):
        if candidate is not None and candidate != "" and candidate in owner:
            return owner[candidate]
    parts = name.split(".")
    for depth in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:depth])
        if prefix in owner:
            return owner[prefix]
    return None


def sensitive_modules(facts: ModelFacts) -> set[str]:
    """The model's first and last weighted layers (Linear, Conv): kept at more bits longest."""
    weighted = [name for name, module in facts.modules.items()
                if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd))]
    return set(weighted[:1] + weighted[-1:])


def site_tiers(units: Sequence[Unit], tiers: list[str]) -> dict[str, int]:
    """Per module, the index of the latest tier whose unit taken decides it."""
    tier_index = {name: i for i, name in enumerate(tiers)}
    return {site.module_name: tier_index[unit.tier] for unit in units for site in unit.sites}


def merge(decided_tiers: dict[str, int], plans: list[Plan], rules: list[Rule]) -> Plan:
    """One Plan: per module its tier plan's site, accepted by precedence, then tier, then place."""
    decided = {name: (k, plans[k].sites[name]) for name, k in decided_tiers.items()}
    position = {(k, name): i for k, plan in enumerate(plans) for i, name in enumerate(plan.sites)}
    ordered = sorted(decided.values(), key=lambda item: (
        _precedence(item[1].rule), item[0], position.get((item[0], item[1].module_name), 0)))
    used = {site.rule for _, site in ordered}
    merged = Plan(rules=[rule for rule in rules if rule.name in used])
    for _, site in ordered:
        refusal = merged.accept(site)
        if refusal is not None:
            merged.skips.append(Skip(site.rule, site.module_name, refusal))
    drop_inside_checkpoints(merged)
    if plans:
        merged.skips.extend(skip for skip in plans[-1].skips if skip.module_name not in merged.sites)
    return merged


def plan_budget(
    model: nn.Module,
    budget: str | int | None = None,
    example_inputs: tuple | None = None,
    *,
    kept_budget: str | int | float | None = None,
    optimizer: str | None = None,
    rules: str | Sequence[str] | None = None,
    labels: torch.Tensor | str | None = "auto",
    skip: Iterable[str] | SkipFilter | None = None,
    **rule_options: Any,
) -> BudgetPlan:
    """Choose a rule per module so that one training step fits ``budget`` (its predicted peak) and
    ``kept_budget`` (what its forward keeps for backward), each where given.

    ``budget``: bytes, or a size such as "10GiB" / "512MiB" / "1.5GB" (None:
    no bound on the step's peak, then ``kept_budget`` is needed).
    ``kept_budget``: the most the forward may keep for backward, as a size or
    a fraction of what BP keeps (0.25, "25%"): see ``aalconvert.budget_limits``.
    ``rules``: the rules the planner may use, "checkpoint" (whole blocks under
    torch.utils.checkpoint) among them (default: all, in ``costs.tier_order``).
    ``optimizer``, ``labels``, ``skip`` and rule options
    (``asa_eps``, ``ara_group``, ``group_size``, ...) as for inspect()/convert().
    ``model`` is not modified; everything runs on fake tensors. Raises
    BudgetError when no plan fits.
    """
    if budget is None and kept_budget is None:
        raise ConversionError("a plan needs budget= (the step's peak), kept_budget= (bytes kept for backward) "
                              "or both")
    budget_bytes = None if budget is None else parse_size(budget)
    if kept_budget is not None:
        check_kept_budget(kept_budget)
    _require_inputs(example_inputs)
    if not isinstance(example_inputs, tuple):
        raise ConversionError(
            f"example_inputs must be a tuple of the model's positional arguments, got "
            f"{type(example_inputs).__name__}; wrap a single tensor as (tensor,)")
    optimizer_state_factor(optimizer)
    tiers = candidate_rules(rules)
    tier_rules(tiers, rule_options)  # options checked before any work
    estimator = _Estimator(model, example_inputs, labels, optimizer, skip)
    bp_report = estimator.report(Plan(rules=[]), estimator.bp)
    batch = _batch_size(example_inputs)
    limits = Limits(None if budget_bytes is None else usable_bytes(budget_bytes),
                    None if kept_budget is None else kept_budget_bytes(kept_budget, bp_report.totals.bp_bytes))
    # Checkpointing every block keeps each block's input and recomputes the largest one: where the
    # budget is tighter than that allows, the rules alone (inside the blocks too) may still fit.
    without = [t for t in tiers if t not in CHECKPOINT_RULES]
    orders = [tiers] + ([without] if without and len(without) < len(tiers) else [])
    ladders = [_ladder(estimator, order, rule_options, limits) for order in orders]
    floor_peak = min(bp_report.totals.peak_bp_bytes, *(ladder.floor for ladder in ladders))
    found = None
    for ladder in ladders:
        fitting = _fitting(ladder, limits, bp_report)
        if fitting is not None:
            found = ladder, fitting
            break
    if found is None or (found[0] is ladders[0] and found[0].loses_fidelity(found[1][0])):
        instead = _lossless_checkpointing(estimator, tiers, rule_options, limits)
        fitting = None if instead is None else _fitting(instead, limits, bp_report)
        found = found if fitting is None else (instead, fitting)
        if found is None:
            raise _nothing_fits(limits, budget_bytes, floor_peak, [*ladders, *([instead] if instead else [])],
                                bp_report, batch)
    ladder, (taken, plain) = found
    plan, report, _ = ladder.evaluate_units(taken, plain) if taken else (Plan(rules=[]), bp_report, 0)
    totals = [bp_report.totals] + ladder.totals_by_tier
    steps, choices, used = [], [], []
    start = 0
    for k, (tier, end) in enumerate(zip(ladder.tiers, ladder.tier_ends)):
        cost = RULE_COSTS[tier]
        chosen = [i for i in taken if start <= i < end]
        steps.append(TierStep(tier, end - start, len(chosen), totals[k + 1].peak_converted_bytes,
                              cost.cost_per_saved, cost.source))
        before = "after " + " + ".join(used) if used else "under BP"
        used += [tier] if end > start else []
        why = f"needed to fit: {limits.over(totals[k]) or 'the plan fits without the rest'} {before}"
        for unit in (ladder.order[i] for i in chosen):
            choices.append(Choice(unit.tier, unit.modules, unit.saving, why,
                                  tuple(site.reason for site in unit.sites)))
        start = end
    return BudgetPlan(
        budget_bytes=budget_bytes, plan=plan, report=report,
        decisions={name: site.rule for name, site in plan.sites.items()},
        choices=choices, tiers=steps, floor_bytes=smallest_budget(floor_peak), batch_size=batch,
        facts=estimator.facts,
        site_tiers=site_tiers([ladder.order[i] for i in taken], ladder.tiers), plain_blocks=plain,
        recompute_bytes=recompute_bytes(checkpointed(plan), estimator.bp), kept_budget_bytes=limits.kept,
        rule_options=dict(rule_options), skip=skip,
    )


def _nothing_fits(limits: Limits, budget_bytes: int | None, floor_peak: int, ladders: list[_Ladder],
                  bp_report: Report, batch: int | None) -> BudgetError:
    """The error for limits no plan holds: the step budget under the floor, the kept budget under the
    least any plan keeps, or the two together out of reach of any one plan."""
    if limits.peak is not None and budget_bytes is not None and floor_peak > limits.peak:
        lowest = min(ladders, key=lambda ladder: ladder.floor)
        return _under_floor(budget_bytes, floor_peak, lowest.evaluate(lowest.floor_units)[1], batch,
                            _not_checkpointed(ladders[0].plans[-1] if ladders[0].plans else None))
    # The tiers' cumulative plans, and every plan the search estimated (a prefix may keep a little
    # more than its tier's cumulative plan, which let the search start).
    least_kept = min(bp_report.totals.bp_bytes, *(ladder.least_kept for ladder in ladders),
                     *(report.totals.converted_bytes for ladder in ladders for _, report, _ in ladder.cache.values()))
    assert limits.kept is not None  # the step budget alone is always met at its floor
    largest = 0 if batch is None or least_kept == 0 else math.floor(limits.kept * batch / least_kept)
    if least_kept > limits.kept or limits.peak is None:
        fits = (f"the largest batch that would keep under it is about {largest} (scaled linearly from batch "
                f"{batch})" if largest > 0 else "not even one sample would keep under it")
        return BudgetError(
            f"kept budget {format_bytes(limits.kept)} ({limits.kept} bytes) is under the least any plan keeps "
            f"for backward, {format_bytes(least_kept)} ({least_kept} bytes; BP keeps "
            f"{format_bytes(bp_report.totals.bp_bytes)}): {fits}", least_kept, largest)
    return BudgetError(
        f"no plan keeps under {format_bytes(limits.kept)} for backward and peaks under "
        f"{format_bytes(limits.peak or 0)} (the budget less {HEADROOM:.0%} headroom) at once: the plans that "
        f"keep that little peak higher (checkpointed blocks recompute, decoded copies); raise one of the two, "
        f"or plan for each alone to see what it takes", least_kept, largest)


def _fitting(ladder: _Ladder, limits: Limits, bp_report: Report) -> tuple | None:
    """No units where BP holds ``limits``; else ``ladder.fitting_units`` where the ladder may hold them;
    else None."""
    if limits.hold(bp_report.totals):
        return (), ()
    return ladder.fitting_units(limits) if ladder.may_hold(limits) else None


def _lossless_checkpointing(estimator: _Estimator, tiers: list[str], rule_options: dict[str, Any],
                            limits: Limits) -> _Ladder | None:
    """The ladder of the tiers that change no number inside the blocks and checkpointing, whose first
    block is then a candidate; None without a checkpointing tier.

    With compressing tiers among the candidates, checkpointing leaves the first
    block out (compressed, it keeps less at the end of backward, where its
    recomputation would make the peak); but where the budget holds every block
    checkpointed, compressing costs more time and fidelity than checkpointing
    the first block as well, and where no plan of the other orders holds the
    limits (a kept budget under what they keep), checkpointing every block may.
    """
    order = [tier for tier in tiers if tier in CHECKPOINT_RULES or RULE_COSTS[tier].fidelity_loss == 0]
    if not any(tier in CHECKPOINT_RULES for tier in order):
        return None
    return _ladder(estimator, order, rule_options, limits)


def _ladder(estimator: _Estimator, tiers: list[str], rule_options: dict[str, Any], limits: Limits) -> _Ladder:
    """The ladder of ``tiers``; for a kept budget alone, without the tiers that keep more than the tiers
    before them.

    A prefix takes every earlier tier whole, so such a tier would stand in the
    way of every later one. The loss head making its gradients in forward keeps
    a weight-sized gradient, more than the logits' log-softmax where there are
    fewer tokens than the hidden size; it lowers no kept bytes then (under a
    step budget it still may lower the peak, and stays).
    """
    ladder = _Ladder(estimator, tiers, rule_options)
    if limits.peak is not None:
        return ladder
    kept = [estimator.bp.nbytes] + [totals.converted_bytes for totals in ladder.totals_by_tier]
    growing = {tier for k, tier in enumerate(tiers) if kept[k + 1] > kept[k]}
    return ladder if not growing else _Ladder(estimator, [t for t in tiers if t not in growing], rule_options)


class _Ladder:
    """One tier order: its cumulative plans and peaks, its units in order, prefix plans on demand."""

    def __init__(self, estimator: _Estimator, tiers: list[str], rule_options: dict[str, Any]) -> None:
        self.estimator = estimator
        self.tiers = tiers
        self.rules = tier_rules(tiers, rule_options)
        facts = estimator.facts
        self.position = {name: i for i, name in enumerate(facts.modules)}
        """Module name -> its place in forward order (blocks are checkpointed and left plain by it)."""
        self.plans = cumulative_plans(facts, self.rules, estimator.skip, estimator.target)
        kept_by_tier = [estimator.kept(plan) for plan in self.plans]
        self.totals_by_tier = [estimator.report(plan, kept).totals for plan, kept in zip(self.plans, kept_by_tier)]
        """Predicted totals of each tier's cumulative plan (it and every earlier tier taken whole)."""
        sensitive = sensitive_modules(facts)
        self.order: list[Unit] = []
        self.tier_ends: list[int] = []
        previous, previous_kept = Plan(rules=[]), estimator.bp
        for tier, plan, kept in zip(tiers, self.plans, kept_by_tier):
            units = tier_units(tier, plan, previous, kept, previous_kept,
                               sensitive if RULE_COSTS[tier].bits < 8 else set())
            self.order += sorted(units, key=self._unit_order(tier))
            self.tier_ends.append(len(self.order))
            previous, previous_kept = plan, kept
        self.cache: dict[tuple[int, ...], tuple[Plan, Report, int]] = {}
        # The lowest peak among the tiers taken whole (peaks need not fall tier by tier).
        lowest_tier = min(range(len(tiers)), key=lambda k: self.totals_by_tier[k].peak_converted_bytes,
                          default=None)
        self.floor_units = 0 if lowest_tier is None else self.tier_ends[lowest_tier]
        self.floor = self.evaluate(self.floor_units)[2]
        self.least_kept = min((totals.converted_bytes for totals in self.totals_by_tier),
                              default=estimator.bp.nbytes)
        """The least a tier's cumulative plan keeps for backward (bytes)."""

    def _unit_order(self, tier: str) -> Callable[[Unit], tuple]:
        """Within a tier: checkpointed blocks in forward order, other units the largest saving first."""
        if tier in CHECKPOINT_RULES:
            return lambda unit: (self.position.get(unit.modules[0], 0), unit.modules)
        return lambda unit: (unit.sensitive, -unit.saving, unit.modules)

    def evaluate(self, n: int) -> tuple[Plan, Report, int]:
        """The plan of the first ``n`` units, its report and its predicted peak (bytes)."""
        return self.evaluate_units(tuple(range(n)))

    def evaluate_units(self, taken: tuple[int, ...], plain: tuple[str, ...] = ()) -> tuple[Plan, Report, int]:
        """The plan of the units at positions ``taken`` of the order, with ``plain`` blocks left to their
        own sites (``leave_plain``): the plan, its report and its predicted peak."""
        if (taken, plain) not in self.cache:
            units = [self.order[i] for i in taken]
            merged = leave_plain(merge(site_tiers(units, self.tiers), self.plans, self.rules), plain)
            report = self.estimator.report(merged, self.estimator.kept(merged))
            self.cache[taken, plain] = merged, report, report.totals.peak_converted_bytes
        return self.cache[taken, plain]

    def may_hold(self, limits: Limits) -> bool:
        """Whether some plan of this order may hold ``limits``: the least peak and the least kept among its
        tiers are under them (not the same plan: ``fitting_units`` says at last)."""
        return ((limits.peak is None or self.floor <= limits.peak)
                and (limits.kept is None or self.least_kept <= limits.kept))

    def holds(self, limits: Limits, taken: tuple[int, ...], plain: tuple[str, ...] = ()) -> bool:
        """Whether the plan of the units at ``taken`` (``plain`` blocks left plain) holds ``limits``."""
        return limits.hold(self.evaluate_units(taken, plain)[1].totals)

    def fitting_units(self, limits: Limits) -> tuple[tuple[int, ...], tuple[str, ...]] | None:
        """The units of the smallest prefix that holds ``limits`` (which BP does not), less what the plan
        holds them without, and the blocks left plain; None where no tier's prefix holds them."""
        prefix = _smallest_fitting_prefix(lambda n: self.holds(limits, tuple(range(n))), self.tier_ends)
        if prefix is None:
            return None
        taken = self.without_needless_tiers(tuple(range(prefix)), limits)
        if not taken:
            return (), ()
        taken, plain = self.without_needless_checkpoints(taken, limits)
        return self.without_needless_reruns(taken, plain, limits), plain

    def loses_fidelity(self, taken: tuple[int, ...]) -> bool:
        """Whether units at ``taken`` include a tier that changes numbers (``checkpoint4``'s copies too)."""
        return any(RULE_COSTS[self.order[i].tier].fidelity_loss != 0 for i in taken)

    def compresses(self, taken: tuple[int, ...]) -> bool:
        """Whether units at ``taken`` include a tier that changes numbers inside the blocks (approx, ARA, ASA)."""
        return any(self.order[i].tier not in CHECKPOINT_RULES and RULE_COSTS[self.order[i].tier].fidelity_loss != 0
                   for i in taken)

    def without_needless_tiers(self, taken: tuple[int, ...], limits: Limits) -> tuple[int, ...]:
        """``taken`` less the units of each approximate tier (one that costs fidelity) the plan still
        fits without, the costliest first, each tier once; never the last tier taken.

        The prefix search takes tiers whole in cost order, but a tier's cost per
        byte says nothing of where the peak is: on timm ViT-S at checkpointing's
        peak, 4-bit copies at every checkpointed block and 8-bit copies in the
        first block were taken on the way to the 4-bit first block that alone
        was needed. Exact tiers stay: without them, a later tier's whole-model
        packer would take their sites, at more cost than they have.
        """
        last = self.order[max(taken)].tier if taken else None
        for tier in reversed(self.tiers):
            if tier == last or not RULE_COSTS[tier].fidelity_loss:
                continue
            trial = tuple(i for i in taken if self.order[i].tier != tier)
            if trial != taken and self.holds(limits, trial):
                taken = trial
        return taken

    def without_needless_checkpoints(self, taken: tuple[int, ...],
                                     limits: Limits) -> tuple[tuple[int, ...], tuple[str, ...]]:
        """``taken`` less the checkpointed blocks the plan fits without (each block's
        ``checkpoint`` and ``checkpoint4`` units together), last block first, and those blocks (left plain).

        Backward reaches the last blocks first, while few gradients exist: their
        activations often fit beside them, and each block left out saves its
        second forward. Stops at the first block the plan needs.
        """
        plain: tuple[str, ...] = ()
        blocks = {self.order[i].modules[0]: None for i in taken if self.order[i].tier in CHECKPOINT_RULES}
        for block in sorted(blocks, key=self.position.__getitem__, reverse=True):
            trial = tuple(i for i in taken if not (self.order[i].tier in CHECKPOINT_RULES
                                                   and self.order[i].modules[0] == block)), (*plain, block)
            if not self.holds(limits, *trial):
                break
            taken, plain = trial
        return taken, plain

    def without_needless_reruns(self, taken: tuple[int, ...], plain: tuple[str, ...],
                                limits: Limits) -> tuple[int, ...]:
        """``taken`` less the units of lossless tiers that cost time (recompute, exact) the plan fits
        without, and those inside checkpointed blocks (which convert nothing); only where nothing is
        compressed.

        Lossless tiers are taken whole before checkpointing, yet the plan's peak
        is often made where some of them do not help (the end of backward, with
        every gradient alive): on a Hugging Face Llama halfway between
        checkpointing's peak and BP's, the gated MLPs' reruns alone were needed,
        and the norms' reruns cost time for nothing. Units that save least go
        first (a small rerun costs the most per byte: its call overhead), a run
        of them at a time, halved where the plan does not fit without it; at
        most ``RERUN_TRIALS`` estimates. Where a tier compresses, a dropped unit's
        tensors would go to its packer instead: nothing gained in time.
        """
        if self.compresses(taken):
            return taken
        blocks = checkpointed(self.evaluate_units(taken, plain)[0])
        rerunning = [i for i in taken if RULE_COSTS[self.order[i].tier].lossless_rule
                     and (RULE_COSTS[self.order[i].tier].cost_per_saved or 0) > 0]
        idle = {i for i in rerunning
                if all(any(inside(name, block) for block in blocks) for name in self.order[i].modules)}
        taken = tuple(i for i in taken if i not in idle)
        candidates = sorted((i for i in rerunning if i not in idle), key=lambda i: (
            self.order[i].saving, min(self.position.get(name, 0) for name in self.order[i].modules)))
        runs, trials = [candidates] if candidates else [], 0
        while runs and trials < RERUN_TRIALS:
            run = runs.pop(0)
            trial = tuple(i for i in taken if i not in run)
            trials += 1
            if self.holds(limits, trial, plain):
                taken = trial
            elif len(run) > 1:
                runs[:0] = [run[:len(run) // 2], run[len(run) // 2:]]
        return taken


def convert_to_budget(
    model: nn.Module,
    budget: str | int | None,
    example_inputs: tuple | None,
    *,
    kept_budget: str | int | float | None = None,
    optimizer: str | None = None,
    rules: str | Sequence[str] | None = None,
    inplace: bool = False,
    labels: torch.Tensor | str | None = "auto",
    skip: Iterable[str] | SkipFilter | None = None,
    **rule_options: Any,
) -> nn.Module:
    """``model`` converted by :func:`plan_budget`'s plan (what ``convert(model, budget=..., kept_budget=...)``
    runs).

    The plan is chosen on fake tensors, then applied by :func:`convert_with_plan`.
    Every check (budget, options, floor) runs before ``model`` is touched.
    """
    if budget is None and kept_budget is None:
        raise ConversionError("optimizer= only counts toward a memory budget: pass budget= too, or drop it")
    if budget is not None:
        parse_size(budget)
    if kept_budget is not None:
        check_kept_budget(kept_budget)
    _check_plain(model, example_inputs)
    chosen = plan_budget(model, budget, example_inputs, kept_budget=kept_budget, optimizer=optimizer, rules=rules,
                         labels=labels, skip=skip, **rule_options)
    return convert_with_plan(model, chosen, example_inputs, inplace=inplace)


def convert_with_plan(model: nn.Module, chosen: BudgetPlan, example_inputs: tuple | None, *,
                      inplace: bool = False) -> nn.Module:
    """``model`` converted as ``chosen`` (``aalconvert.plan``'s result for this model) decided, without
    planning again: what ``convert(model, budget=chosen)`` runs.

    The model is traced once on ``example_inputs`` and each module gets the
    rule the plan chose for it. The plan's estimates hold for the inputs it was
    planned with; other shapes keep other bytes.
    """
    from aalconvert import api

    _check_plain(model, example_inputs)
    target = model if inplace else api._shallow_copy(model)
    rule_objects = tier_rules([step.rule for step in chosen.tiers], chosen.rule_options)
    facts = gather_facts(target, example_inputs)
    plans = cumulative_plans(facts, rule_objects, skip_filter(chosen.skip, facts), target)
    missing = [name for name, k in chosen.site_tiers.items() if name not in plans[k].sites]
    if missing:
        raise ConversionError(
            f"the plan names modules this model's trace does not convert ({missing[:3]}): pass the model "
            "it was planned for (aalconvert.plan(model, ...)); if it is that model, inspect it with "
            "aalconvert.inspect and report it")
    plan = leave_plain(merge(chosen.site_tiers, plans, rule_objects), chosen.plain_blocks)
    target = apply_plan(target, plan, facts)
    if plan.sites:
        applied = sorted({rule.name for rule in plan.rules}, key=api._precedence)
        setattr(target, api._RULES_ATTRIBUTE, tuple(applied))
    return target


def _check_plain(model: nn.Module, example_inputs: tuple | None) -> None:
    """Raise before any work where a budget's conversion cannot start: no inputs, not a plain model."""
    from aalconvert import api

    _require_inputs(example_inputs)
    api._check_model(model)
    earlier, _ = api._earlier_conversion(model)
    if earlier:
        raise ConversionError(
            f"the model is already converted with {', '.join(sorted(earlier))}; budget= plans from the "
            "plain model: call aalconvert.revert(model) first")


def _require_inputs(example_inputs: tuple | None) -> None:
    """Raise before any work where a budget has no inputs to estimate what a forward keeps."""
    if example_inputs is None:
        raise ConversionError(
            "a budget needs example_inputs=(...): the plan is chosen from the bytes a forward on them keeps")


def _smallest_fitting_prefix(fits: Callable[[int], bool], tier_ends: list[int]) -> int | None:
    """The fewest units (a prefix of the order) whose plan ``fits``: the first tier whose full plan fits,
    bisected inside (its start, the previous tier in full, does not fit); None when no tier's does."""
    low = 0  # known not to fit (BP, checked first)
    for end in tier_ends:
        if end == low:
            continue
        if fits(end):
            return first_true(low, end, fits)
        low = end
    return None


def _batch_size(example_inputs: tuple) -> int | None:
    first = next((x for x in example_inputs if isinstance(x, torch.Tensor) and x.dim() > 0), None)
    return None if first is None else int(first.shape[0])


def _not_checkpointed(plan: Plan | None) -> str:
    """What the error says of blocks checkpointing would take but may not (their calls pass state), or ""."""
    stateful = [skip for skip in (plan.skips if plan else ()) if skip.rule in CHECKPOINT_RULES
                and skip.reason.startswith(STATEFUL_CALL)]
    blocks = list(dict.fromkeys(skip.module_name for skip in stateful))
    if not blocks:
        return ""
    return (f"; {len(blocks)} block(s) ({', '.join(blocks[:3])}{', ...' if len(blocks) > 3 else ''}) were not "
            f"offered for checkpointing: {stateful[0].reason}")


def _under_floor(budget: int, floor_peak: int, report: Report, batch: int | None,
                 not_checkpointed: str = "") -> BudgetError:
    totals = report.totals
    fixed = totals.fixed_bytes
    floor = smallest_budget(floor_peak)
    per_batch = floor_peak - fixed
    usable = usable_bytes(budget)
    if batch is None or per_batch <= 0 or usable <= fixed:
        largest = 0
    else:
        largest = math.floor((usable - fixed) * batch / per_batch)
    fits = (f"the largest batch that would fit is about {largest} (activations scaled linearly from "
            f"batch {batch})" if largest > 0 else
            f"no batch fits: parameters, gradients and optimizer state alone take {format_bytes(fixed)}")
    return BudgetError(
        f"budget {format_bytes(budget)} ({budget} bytes) is under the floor of {format_bytes(floor)} ({floor} "
        f"bytes): the "
        f"plan that peaks least peaks at {format_bytes(floor_peak)}, parameters + gradients + optimizer "
        f"state ({format_bytes(fixed)}) + activations and transients beside them, recomputation included "
        f"({format_bytes(per_batch)}; {format_bytes(totals.converted_bytes)} kept for backward), and the "
        f"planner leaves {HEADROOM:.0%} of the budget free for what its estimate cannot see; {fits}"
        f"{not_checkpointed}",
        floor, largest)

"""The kept budget: the planner bounds the bytes the forward keeps for backward, alone or beside the step budget.

On the synthetic residual MLP of test_budget (every rule, checkpointing
included): the plan keeps under the kept budget as predicted and as measured
on the converted model, the two ways of writing it plan alike, and a kept
budget no plan reaches is an error that names the least any plan keeps.
"""

import functools
import math

import pytest
import torch

import aalconvert
from aalconvert.budget import BudgetError, plan_budget, smallest_budget, usable_bytes
from aalconvert.budget_limits import Limits, check_kept_budget, kept_budget_bytes
from aalconvert.costs import RULE_COSTS
from aalconvert.errors import ConversionError
from aalconvert.report import Totals
from tests.test_budget import measured_kept, synthetic


@pytest.fixture(scope="module")
def bp_kept() -> int:
    model, inputs = synthetic()
    return aalconvert.inspect(model, inputs, "exact").totals.bp_bytes


@functools.cache
def kept_plan(kept_budget):
    """The synthetic model's plan for a kept budget alone (each planned once: the planner is deterministic)."""
    model, inputs = synthetic()
    return aalconvert.plan(model, example_inputs=inputs, kept_budget=kept_budget)


@pytest.fixture(scope="module")
def least():
    """The plan at a kept budget of one byte fails; its error names the least any plan keeps."""
    model, inputs = synthetic()
    with pytest.raises(BudgetError) as raised:
        plan_budget(model, example_inputs=inputs, kept_budget=1)
    return raised.value


@pytest.mark.parametrize("written, expected", [
    (0.25, 250), ("25%", 250), (" 2.5 % ", 25), (1.0, 1000), ("100%", 1000), ("1KiB", 1024), (512, 512),
])
def test_a_kept_budget_is_a_size_or_a_share_of_what_bp_keeps(written, expected):
    check_kept_budget(written)
    assert kept_budget_bytes(written, bp_kept=1000) == expected


@pytest.mark.parametrize("written, message", [
    (0.0, r"in \(0, 1\]"), (1.5, r"in \(0, 1\]"), ("0%", r"in \(0, 1\]"), ("150%", r"in \(0, 1\]"),
    (float("nan"), r"in \(0, 1\]"), ("a%", "a percentage is a number"), ("12 parsecs", "bad memory size"),
    (0, "must be positive"), (True, "memory size"),
])
def test_a_bad_kept_budget_is_an_error_saying_what_is_accepted(written, message):
    with pytest.raises(ConversionError, match=message):
        check_kept_budget(written)


def test_limits_hold_each_bound_given_and_say_what_is_over():
    totals = Totals(bp_bytes=1000, converted_bytes=400, parameter_bytes=0, gradient_bytes=0, optimizer=None,
                    optimizer_state_bytes=0, largest_transient_bytes=0, bp_step_bytes=900, converted_step_bytes=600)
    assert Limits(peak=600).hold(totals) and not Limits(peak=599).hold(totals)
    assert Limits(peak=None, kept=400).hold(totals) and not Limits(peak=None, kept=399).hold(totals)
    assert not Limits(peak=600, kept=399).hold(totals)
    assert Limits(peak=599, kept=399).over(totals) == "1 B over the budget and 1 B kept over the kept budget"
    assert Limits(peak=600, kept=400).over(totals) == ""


def test_a_plan_needs_a_budget_of_one_kind_or_the_other_and_checks_it_before_any_work():
    model, inputs = synthetic()
    before = [type(m) for m in model.modules()]
    with pytest.raises(ConversionError, match="budget=.*kept_budget=.*or both"):
        plan_budget(model, example_inputs=inputs)
    with pytest.raises(ConversionError, match=r"in \(0, 1\]"):
        aalconvert.convert(model, kept_budget=2.0, example_inputs=inputs, inplace=True)
    with pytest.raises(ConversionError, match="needs example_inputs"):
        aalconvert.convert(model, kept_budget=0.5)
    assert [type(m) for m in model.modules()] == before


@pytest.mark.parametrize("fraction", [0.6, 0.3])
def test_a_kept_budget_alone_is_kept_under_with_no_step_budget(fraction, bp_kept):
    plan = kept_plan(fraction)
    assert plan.budget_bytes is None and plan.usable_bytes is None and plan.fits
    assert plan.kept_budget_bytes == math.floor(fraction * bp_kept)
    assert plan.kept_bytes <= plan.kept_budget_bytes < bp_kept
    assert plan.decisions and all(choice.why.startswith("needed to fit: ") for choice in plan.choices)
    assert any("kept over the kept budget" in choice.why for choice in plan.choices)
    data = plan.to_dict()
    assert data["kept_budget_bytes"] == plan.kept_budget_bytes and data["kept_bytes"] == plan.kept_bytes
    assert data["budget_bytes"] is None and data["kept_bp_bytes"] == bp_kept


def test_what_keeps_under_a_loose_kept_budget_changes_no_number(bp_kept):
    """Lossless rules and checkpointing come first: at 0.6 of BP's bytes nothing approximate is needed."""
    plan = kept_plan(0.6)
    assert {RULE_COSTS[choice.rule].fidelity_loss for choice in plan.choices} == {0.0}


def test_a_size_and_the_same_share_plan_alike(bp_kept):
    share, size = kept_plan(0.3), kept_plan(math.floor(0.3 * bp_kept))
    assert share.decisions == size.decisions and share.kept_bytes == size.kept_bytes


def test_a_tighter_kept_budget_keeps_less(bp_kept, least):
    fractions = [0.8, 0.5, 0.3, least.floor_bytes / bp_kept]
    kept = [kept_plan(f).kept_bytes for f in fractions]
    assert all(k <= math.floor(f * bp_kept) for k, f in zip(kept, fractions))
    assert kept[-1] == least.floor_bytes < kept[0]


def test_the_converted_model_keeps_under_the_kept_budget_as_measured():
    model, inputs = synthetic()
    plan = kept_plan(0.3)
    converted = aalconvert.convert(model, example_inputs=inputs, kept_budget=0.3).train()
    kept_bytes, kept = measured_kept(converted, lambda: converted(*inputs))
    assert kept_bytes <= plan.kept_budget_bytes and abs(kept_bytes - plan.kept_bytes) <= 0.01 * kept_bytes
    kept.output.float().logsumexp(-1).mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in converted.parameters() if p.grad is not None)


def test_a_kept_budget_under_the_least_any_plan_keeps_names_it_and_the_batch_that_would_keep_under_it(least, bp_kept):
    assert 0 < least.floor_bytes < bp_kept and least.largest_batch == 0
    assert f"under the least any plan keeps for backward" in str(least)
    assert f"({least.floor_bytes} bytes;" in str(least) and "not even one sample" in str(least)
    model, inputs = synthetic()  # batch 64: half the least any plan keeps holds about 32 samples' worth
    with pytest.raises(BudgetError) as raised:
        plan_budget(model, example_inputs=inputs, kept_budget=least.floor_bytes // 2)
    assert raised.value.largest_batch == 31 or raised.value.largest_batch == 32
    assert f"largest batch that would keep under it is about {raised.value.largest_batch}" in str(raised.value)


def test_with_both_budgets_the_plan_holds_both(bp_kept):
    model, inputs = synthetic()
    peak_only = aalconvert.plan(model, smallest_budget(10**12), inputs)
    budget = (peak_only.peak_bp_bytes + peak_only.floor_bytes) // 2
    by_peak = aalconvert.plan(model, budget, inputs)
    kept_budget = by_peak.kept_bytes // 2
    both = aalconvert.plan(model, budget, inputs, kept_budget=kept_budget)
    assert both.fits and both.peak_bytes <= usable_bytes(budget) and both.kept_bytes <= kept_budget
    assert both.budget_bytes == budget and both.kept_budget_bytes == kept_budget


def test_two_budgets_no_one_plan_holds_together_are_an_error_saying_so(least):
    """The plan that keeps least does not peak least (decoded copies, checkpointed blocks recomputing):
    at the floor's budget and the least kept, no plan holds both."""
    model, inputs = synthetic()
    floor = aalconvert.plan(model, smallest_budget(10**12), inputs).floor_bytes
    keeping_least = aalconvert.plan(model, example_inputs=inputs, kept_budget=least.floor_bytes)
    assert keeping_least.peak_bytes > usable_bytes(floor)  # what makes the two out of reach together
    with pytest.raises(BudgetError, match="no plan keeps under .* and peaks under .* at once"):
        plan_budget(model, floor, inputs, kept_budget=least.floor_bytes)

"""A BudgetPlan shown to people: the units chosen and why, the tiers tried, the peaks (rich).

Kept apart from the planner so that ``aalconvert.budget`` decides and this
module only renders; JSON is ``BudgetPlan.to_dict()``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import IO, Any

from aalconvert.budget import HEADROOM, BudgetPlan
from aalconvert.report import display_name, format_bytes


def modules_text(modules: tuple[str, ...], shown: int = 3) -> str:
    """``a, b, c and 4 more`` (the root as <root>)."""
    names = [display_name(name) for name in modules]
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def reasons_text(reasons: tuple[str, ...], shown: int = 2) -> str:
    """The distinct reasons of a unit's sites, the first ``shown`` of them, then how many more."""
    distinct = list(dict.fromkeys(reasons))
    more = f" (+{len(distinct) - shown} more)" if len(distinct) > shown else ""
    return " | ".join(distinct[:shown]) + more


def asked_text(budget: object, kept_budget: object, show: Callable[[Any], str] = format_bytes) -> str:
    """``a budget of 10.0 GiB`` / ``a kept budget of 2.0 GiB`` / both: what a plan is asked to hold
    (``show``: how a value is written; the CLI shows the user's own text)."""
    asked = [f"{what} {show(value)}" for what, value in (("a budget of", budget), ("a kept budget of", kept_budget))
             if value is not None]
    return " and ".join(asked)


def print_budget_plan(plan: BudgetPlan, *, file: IO[str] | None = None, top: int | None = None) -> None:
    """Render ``plan``: the choices (largest first within a tier), the tiers tried, then the totals."""
    from rich.console import Console
    from rich.panel import Panel
    from rich.table import Table

    console = Console(file=file)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = 180
    report = plan.report
    choices = plan.choices if top is None else plan.choices[:top]
    table = Table(title=f"{report.model}: plan for {asked_text(plan.budget_bytes, plan.kept_budget_bytes)} "
                        f"(optimizer: {report.totals.optimizer or 'none given'})")
    for column, justify in (("rule", "left"), ("modules", "left"), ("saves (est.)", "right"),
                            ("why", "left"), ("what it does", "left")):
        table.add_column(column, justify=justify)
    for choice in choices:
        table.add_row(choice.rule, modules_text(choice.modules), format_bytes(choice.saving),
                      choice.why, reasons_text(choice.reasons))
    if len(choices) < len(plan.choices):
        table.caption = f"{len(plan.choices) - len(choices)} more units not shown (top={top})"
    if plan.choices:
        console.print(table)
    else:
        console.print("BP fits the budget: nothing to convert.", highlight=False)
    tiers = Table(title="tiers, cheapest first (cost per byte saved from benchmarks/results)")
    for column in ("rule", "cost / byte saved", "units taken", "peak with the tier in full"):
        tiers.add_column(column)
    for step in plan.tiers:
        cost = "not measured" if step.cost_per_saved is None else f"{step.cost_per_saved:.2f}"
        tiers.add_row(step.rule, cost, f"{step.taken} / {step.units}", format_bytes(step.peak_bytes))
    console.print(tiers)
    totals = Table.grid(padding=(0, 2))
    t = report.totals
    lines = [
        ("budget", "none (a kept budget only)" if plan.budget_bytes is None else format_bytes(plan.budget_bytes)),
        ("predicted peak, BP", format_bytes(plan.peak_bp_bytes)),
        ("predicted peak, planned", format_bytes(plan.peak_bytes)),
        ("floor (least budget any plan fits)", format_bytes(plan.floor_bytes)),
        ("parameters + gradients + optimizer state", format_bytes(t.fixed_bytes)),
        ("activations kept, BP -> planned",
         f"{format_bytes(t.bp_bytes)} -> {format_bytes(t.converted_bytes)} (ratio {t.ratio:.3f})"),
        ("largest transient", format_bytes(t.largest_transient_bytes)),
        ("the largest checkpointed block recomputing (within the above)", format_bytes(plan.recompute_bytes)),
    ]
    if plan.usable_bytes is not None:
        lines.append((f"left under the budget less {HEADROOM:.0%} headroom",
                      format_bytes(plan.usable_bytes - plan.peak_bytes)))
    if plan.kept_budget_bytes is not None:
        lines.append(("kept budget (activations kept for backward)", format_bytes(plan.kept_budget_bytes)))
        lines.append(("left under the kept budget", format_bytes(plan.kept_budget_bytes - plan.kept_bytes)))
    for label, value in lines:
        totals.add_row(label, value)
    console.print(Panel(totals, title="one training step", expand=False))
    for note in report.notes:
        console.print(f"note: {note}", highlight=False)

"""What each rule costs, from measured figures: the order in which the budget planner tries them.

One table, one row per rule, every figure with the file it was read from
(``python benchmarks/costs.py`` reads them again; ``tests/test_costs.py``
holds this table to it). A rule's cost per byte saved is

    (step time ratio - 1 + FIDELITY_WEIGHT * fidelity loss) / (1 - kept ratio)

where the step time ratio and the kept ratio are the medians over the seven
examples at batch 64 (``python benchmarks/memory.py``,
``benchmarks/results/memory_cpu.json``; checkpointing and ``checkpoint4``: over the
three real models of ``benchmarks/results/peers_cpu.json``), and the fidelity loss is
the worst shortfall to BP over the examples where the rule converts
something, in accuracy points or percent of validation loss, from the runs
trained to convergence where they exist (``fidelity_converged.json``), else
from the short runs (``fidelity.json``). Our lossless rules (exact,
recompute) come first whatever their time: they change no number and cost
little extra work per byte on a GPU (their CPU times carry Python overhead).
Checkpointing also gives the same gradients but costs one more forward of
each block, so it is ranked by its cost like the rest; a rule with a
figure nobody has measured comes after every measured one. Costs within 5 %
of each other are a tie (the CPU step times were taken with other work on the
machine), settled for the rule with more bits (finer copies, smaller gradient
error), then by name. A rule that refines another on the same sites
(``follows``: ``checkpoint4`` keeps checkpointing's blocks in 4-bit copies)
comes right after it, whatever its cost.

The CPU figures are what exists: ``approx*`` there runs the kernels' CPU path
(compiled C passes, ``kernels/cpu_native.py``), not the Triton kernels, and the
examples are small enough that each call's Python overhead weighs (their median
``approx4`` step is 1.85x BP's), so on larger models and on a GPU its time cost
is likely lower than this table says.
Regenerate the benchmarks, then this table from ``benchmarks/costs.py``.
"""

from dataclasses import dataclass

FIDELITY_WEIGHT = 0.2
"""Step-time ratio one accuracy point (or one percent of loss) is worth: a policy, not a measurement.

At 0.2, ASA's 2.4 % worst loss gap costs as much as 0.48x of step time."""

TIE = 0.05  # relative difference under which two costs count as equal (timing noise)


@dataclass(frozen=True)
class RuleCost:
    """Measured figures of one rule (None: not measured) and where each came from."""

    rule: str
    lossless_rule: bool
    """One of our lossless rules (exact gradients, elementwise extra work): always tried first."""
    step_time_ratio: float | None
    kept_ratio: float | None
    fidelity_loss: float | None
    bits: int = 32
    source: str = ""
    follows: str | None = None
    """A rule this one refines on the same sites: it is tried right after it, whatever its cost."""

    @property
    def cost_per_saved(self) -> float | None:
        """Time overhead plus weighted fidelity loss per fraction of BP's bytes saved (None: unmeasured)."""
        if None in (self.step_time_ratio, self.kept_ratio, self.fidelity_loss) or self.kept_ratio >= 1:
            return None
        return (self.step_time_ratio - 1 + FIDELITY_WEIGHT * self.fidelity_loss) / (1 - self.kept_ratio)


_MEMORY = "benchmarks/results/memory_cpu.json of 2026-12-01 00:04 UTC (batch 64, median of 7 examples)"
_SHORT = "benchmarks/results/fidelity.json (3 seeds, short runs)"
_CONVERGED = "benchmarks/results/fidelity_converged.json (trained to convergence)"

RULE_COSTS: dict[str, RuleCost] = {cost.rule: cost for cost in (
    RuleCost("exact", True, 1.249, 0.811, 0.0,
             source=f"time, kept: {_MEMORY}; fidelity: bit-identical gradients "
                    "(tests/test_lossless_guarantees.py)"),
    RuleCost("recompute", True, 1.28, 0.53, 0.0,
             source=f"time, kept: {_MEMORY} (recompute + exact); fidelity: bit-identical gradients "
                    "(tests/test_lossless_guarantees.py)"),
    RuleCost("loss_head", False, 0.943, 0.704, 0.0,
             source="time, kept: benchmarks/results/loss_head_cpu.json of 2026-12-01 05:41 UTC (Llama, vocabulary "
                    "32k, gradients made in forward, as the planner builds it: faster than BP's head, and the "
                    "weight-sized gradient it keeps is allocated by BP's backward first thing); fidelity: equal "
                    "to the plain head up to fp32 rounding (tests)"),
    RuleCost("checkpoint", False, 1.31, 0.235, 0.0,
             source="time, kept: benchmarks/results/peers_cpu.json of 2026-12-01 07:21 UTC (torch.utils.checkpoint "
                    "per block, median of torchvision ResNet-50, timm ViT-S, Hugging Face Llama); fidelity: the "
                    "same gradients (the forward runs again with the same RNG state)"),
    RuleCost("checkpoint4", False, 1.333, 0.2, 0.093, bits=4, follows="checkpoint",
             source="time, kept: benchmarks/results/peers_cpu.json of 2026-12-01 07:21 UTC (the 'checkpoint, 4-bit "
                    "inputs' rows, median of the same three models; ResNet-50's blocks keep full inputs); "
                    "fidelity: not trained, approx4's worst (resnet_basic 0.09 points below BP) taken as its bound: "
                    "its gradient cosine to BP is 0.996-0.9997 on the models it takes "
                    "(benchmarks/results/boundary_*.json); tried right after checkpointing, whose blocks it keeps "
                    "in 4-bit copies"),
    RuleCost("ara", False, 1.191, 0.783, 0.37,
             source=f"time, kept: {_MEMORY}; fidelity: resnet_basic 0.37 points below BP ({_SHORT}); "
                    f"resnet_bottleneck 0.52 above ({_CONVERGED}, 12 seeds)"),
    RuleCost("asa", False, 1.405, 0.565, 2.416,
             source=f"time, kept: {_MEMORY}; fidelity: gpt validation loss 2.4 % above BP ({_SHORT}); "
                    f"transformer 0.09 points below ({_CONVERGED})"),
    RuleCost("approx8", False, 1.649, 0.143, 0.093, bits=8,
             source=f"time, kept: {_MEMORY}; fidelity: not trained at 8 bits, approx4's worst "
                    "(resnet_basic 0.09 points below BP) taken as its bound: 8-bit copies are finer"),
    RuleCost("approx4", False, 1.854, 0.084, 0.093, bits=4,
             source=f"time, kept: {_MEMORY}; fidelity: resnet_basic 0.09 points below BP ({_SHORT})"),
    RuleCost("approx2", False, None, None, None, bits=2,
             source="not measured (no memory or fidelity run at 2 bits): tried last"),
)}


def tier_order(rules: list[str] | None = None) -> list[str]:
    """``rules`` (default: every rule in the table) in the order the planner tries them, cheapest first."""
    names = list(RULE_COSTS) if rules is None else rules
    unknown = [name for name in names if name not in RULE_COSTS]
    if unknown:
        raise ValueError(f"no measured cost for rule(s) {unknown}; known: {', '.join(RULE_COSTS)}")
    costs = [RULE_COSTS[name] for name in names]
    ordered = sorted(costs, key=_sort_key)
    # Settle near-ties (within TIE) for more bits, walking neighbours until nothing moves.
    moved = True
    while moved:
        moved = False
        for i in range(len(ordered) - 1):
            first, second = ordered[i], ordered[i + 1]
            if (first.lossless_rule == second.lossless_rule and _near(first, second)
                    and second.bits > first.bits):
                ordered[i], ordered[i + 1] = second, first
                moved = True
    for cost in [cost for cost in ordered if cost.follows is not None]:
        base = next((other for other in ordered if other.rule == cost.follows), None)
        if base is not None:
            ordered.remove(cost)
            ordered.insert(ordered.index(base) + 1, cost)
    return [cost.rule for cost in ordered]


def _sort_key(cost: RuleCost) -> tuple[bool, bool, float, str]:
    value = cost.cost_per_saved
    return (not cost.lossless_rule, value is None, value or 0.0, cost.rule)


def _near(first: RuleCost, second: RuleCost) -> bool:
    a, b = first.cost_per_saved, second.cost_per_saved
    return a is not None and b is not None and abs(a - b) <= TIE * max(a, b)

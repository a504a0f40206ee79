"""The planner's cost table (``aalconvert/costs.py``) read from the measured results it cites.

Per rule: the step-time ratio and the kept ratio (medians over the seven
examples at batch 64, ``benchmarks/results/memory_cpu.json``; checkpointing:
medians over the three real models of ``benchmarks/results/peers_cpu.json``;
the loss head: ``benchmarks/results/loss_head_cpu.json``; ``checkpoint4``: the
peers' "checkpoint, 4-bit inputs" rows), and the fidelity
loss: the worst shortfall to BP over the examples where the rule converts
something, in accuracy points or percent of validation loss, from the runs
trained to convergence (``fidelity_converged.json``) where they exist, else
from the short runs (``fidelity.json``); never below 0.

    python benchmarks/costs.py          # prints the figures; tests/test_costs.py holds costs.py to them
"""

import json
import statistics
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
MEMORY, PEERS, LOSS_HEAD = "memory_cpu.json", "peers_cpu.json", "loss_head_cpu.json"
SHORT_FIDELITY, CONVERGED_FIDELITY = "fidelity.json", "fidelity_converged.json"
BATCH = 64
RULES = ("exact", "recompute", "ara", "asa", "approx8", "approx4")
# Never trained: approx8 at 8 bits (4-bit copies are coarser, a bound); checkpoint4's 4-bit block inputs
# move the gradient less than approx4's 4-bit copies of every activation on the examples it takes
# (cosine to BP 0.9996 or more vs 0.999, benchmarks/results/boundary_examples.json), so approx4's is its bound.
FIDELITY_STAND_IN = {"approx8": "approx4", "checkpoint4": "approx4"}


def load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def memory_figures(rule: str) -> tuple[float, float]:
    """(step time ratio, kept ratio): medians over the examples at ``BATCH``."""
    rows = [row for row in load(MEMORY)["rows"] if row["batch"] == BATCH and row["rules"] == rule]
    if not rows:
        raise ValueError(f"{MEMORY} has no rows for {rule} at batch {BATCH}")
    return (statistics.median(row["step_ratio"] for row in rows),
            statistics.median(row["ratio"] for row in rows))


def checkpoint_figures(method: str = "checkpoint") -> tuple[float, float]:
    """(step time ratio, kept ratio) of checkpointing every block (``method``, a peers row): medians over
    the peers' models."""
    rows = [row for record in load(PEERS)["records"] for row in record["rows"]
            if row["method"] == method and row["ok"]]
    if not rows:
        raise ValueError(f"{PEERS} has no rows for {method!r}")
    return (statistics.median(row["time_ratio"] for row in rows),
            statistics.median(row["kept_ratio"] for row in rows))


def loss_head_figures() -> tuple[float, float]:
    """The loss head as the planner builds it: gradients made in forward (``budget.PLANNED_LOSS_HEAD``)."""
    row = next(row for row in load(LOSS_HEAD)["rows"] if row["rules"] == "loss_head, gradients in forward")
    return row["step_time_ratio"], row["kept_ratio"]


def shortfalls(rule: str) -> dict[str, float]:
    """Per example, the rule's shortfall to BP (positive: worse), converged runs over short ones."""
    found: dict[str, float] = {}
    short = load(SHORT_FIDELITY)["rows"]
    bp_level = {row["example"]: row["mean"] for row in short if row["rules"] == "bp"}
    for row in short:
        if row["rules"] != rule or row.get("delta") is None:
            continue
        if "loss" in row["metric"]:  # lower is better: a higher loss, in percent of BP's
            found[row["example"]] = 100 * row["delta"] / bp_level[row["example"]]
        else:
            found[row["example"]] = -row["delta"]
    for row in load(CONVERGED_FIDELITY)["rows"]:
        if row["rules"] == rule and row.get("gap_mean") is not None:
            found[row["example"]] = row["gap_mean"]
    return found


def fidelity_loss(rule: str) -> float:
    """The worst shortfall over the examples (0 when the rule is never worse than BP)."""
    found = shortfalls(FIDELITY_STAND_IN.get(rule, rule))
    if not found:
        raise ValueError(f"no fidelity run of {rule} in {SHORT_FIDELITY} or {CONVERGED_FIDELITY}")
    return max(0.0, max(found.values()))


def table() -> dict[str, tuple[float, float, float]]:
    """Rule -> (step time ratio, kept ratio, fidelity loss), each rounded to 3 decimals."""
    figures = {rule: (*memory_figures(rule), 0.0 if rule in ("exact", "recompute") else fidelity_loss(rule))
               for rule in RULES}
    figures["checkpoint"] = (*checkpoint_figures(), 0.0)
    figures["checkpoint4"] = (*checkpoint_figures("checkpoint, 4-bit inputs"), fidelity_loss("checkpoint4"))
    figures["loss_head"] = (*loss_head_figures(), 0.0)
    return {rule: tuple(round(value, 3) for value in values) for rule, values in figures.items()}


def main() -> None:
    print("| rule | step time / BP | kept / BP | fidelity loss |")
    print("| --- | ---: | ---: | ---: |")
    for rule, (time, kept, loss) in table().items():
        print(f"| {rule} | {time:.3f} | {kept:.3f} | {loss:.3f} |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()

"""The budget planner on every example: predicted vs measured bytes kept, and predicted vs measured step peak.

For each example (batch 16, AdamW) and three budgets between the floor and
the least budget BP fits (80 %, 40 % and 5 % of the way down), plan with
``aalconvert.plan``, convert with the same budget, and measure on real tensors
what the converted model keeps (``measure_saved`` plus the block inputs the
checkpoints hold) and the peak of one real training step (the profiler:
``aalconvert.step_memory.measure_training_step``), parameters and optimizer
state added. Prints a markdown table.

    python benchmarks/budget.py                 # every example
    python benchmarks/budget.py --header-off bert vit   # these examples' rows only (to finish a run)
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # examples/ lives at the repo root

import aalconvert  # noqa: E402
from aalconvert.budget import plan_budget, smallest_budget  # noqa: E402
from aalconvert.checkpointing import checkpoint_inputs  # noqa: E402
from aalconvert.memory import measure_saved, storage_key  # noqa: E402
from aalconvert.step_memory import measure_training_step, training_loss  # noqa: E402
from examples import EXAMPLES  # noqa: E402

FRACTIONS = (0.8, 0.4, 0.05)


def measured(model, inputs) -> int:
    """Bytes kept for backward, measured, with what checkpoints hold (each storage once)."""
    with checkpoint_inputs(model, storage_key) as held:
        kept = measure_saved(lambda: model(*inputs), model.parameters())
    return kept.nbytes + sum(b for s in held.values() for k, b in s.items() if k not in kept.storages)


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)
    names = [name for name in argv if name != "--header-off"] or list(EXAMPLES)
    unknown = sorted(set(names) - set(EXAMPLES))
    if unknown:
        raise SystemExit(f"unknown example(s) {unknown}; choose from {', '.join(EXAMPLES)}")
    if "--header-off" not in argv:
        print("| example | budget (floor -> BP) | budget B | predicted peak B | measured peak B | rel "
              "| predicted kept B | measured kept B | rel | rules |")
        print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for name in names:
        example = EXAMPLES[name]
        torch.manual_seed(0)
        model = example.build_model().train()
        inputs = example.example_inputs(batch_size=16)
        bp_budget = smallest_budget(
            aalconvert.inspect(model, inputs, "exact", optimizer="adamw").totals.peak_bp_bytes)
        floor = plan_budget(model, bp_budget, inputs, optimizer="adamw").floor_bytes
        for fraction in FRACTIONS:
            budget = int(floor + (bp_budget - floor) * fraction)
            plan = aalconvert.plan(model, budget=budget, example_inputs=inputs, optimizer="adamw")
            converted = aalconvert.convert(model, budget=budget, example_inputs=inputs, optimizer="adamw")
            kept = measured(converted.train(), inputs)
            totals = plan.report.totals
            step = measure_training_step(converted, lambda: training_loss(converted(*inputs)), "adamw")
            peak = step.peak_bytes + totals.parameter_bytes + totals.optimizer_state_bytes
            rules = ",".join(sorted(set(plan.decisions.values()))) or "none"
            print(f"| {name} | {fraction} | {budget} | {plan.peak_bytes} | {peak} | "
                  f"{(plan.peak_bytes - peak) / peak:+.4f} | {totals.converted_bytes} | {kept} | "
                  f"{(totals.converted_bytes - kept) / kept:+.4f} | {rules} |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])

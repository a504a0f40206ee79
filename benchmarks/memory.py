"""Bytes the forward keeps for backward, converted vs ordinary backprop, per example and rule.

Measured, not estimated: every storage a saved tensor points to, counted once,
parameters excluded (aalconvert.memory.measure_saved; methods.md section 5).
CPU, fp32, train mode, the examples' default (small) configs.

    python benchmarks/memory.py                       # batch 16, all examples, all rule sets
    python benchmarks/memory.py --batch 4 --examples resnet_basic,vit --json out.json
"""

import argparse
import json
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aalconvert  # noqa: E402
from aalconvert.memory import measure_saved  # noqa: E402
from examples import EXAMPLES  # noqa: E402

RULE_SETS = ["exact", "recompute", "ara", "ara(stage)", "asa", "approx8", "approx4", "auto", "auto+approx4"]


def convert_with(model: torch.nn.Module, rule_set: str, inputs: tuple) -> torch.nn.Module:
    """Convert ``model`` with a rule set as named in RULE_SETS."""
    if rule_set == "ara(stage)":
        return aalconvert.convert(model, "ara", example_inputs=inputs, ara_group="stage")
    return aalconvert.convert(model, rule_set.split("+"), example_inputs=inputs)


def kept_bytes(model: torch.nn.Module, inputs: tuple) -> int:
    """Bytes one training-mode forward keeps for backward (backward is run to check it works)."""
    model.train()
    saved = measure_saved(lambda: model(*inputs), model.parameters())
    saved.output.float().sum().backward()
    return saved.nbytes


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16, help="batch size (default 16)")
    parser.add_argument("--examples", default=",".join(EXAMPLES), help="comma-separated example names")
    parser.add_argument("--rules", default=",".join(RULE_SETS), help="comma-separated rule sets")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    names, rule_sets = args.examples.split(","), args.rules.split(",")
    unknown = [n for n in names if n not in EXAMPLES] + [r for r in rule_sets if r not in RULE_SETS]
    if unknown:
        parser.error(f"unknown example or rule set {unknown}; examples: {list(EXAMPLES)}, rule sets: {RULE_SETS}")

    rows = []
    for name in names:
        example = EXAMPLES[name]
        torch.manual_seed(0)
        inputs = example.example_inputs(args.batch)
        baseline = kept_bytes(example.build_model(), inputs)
        for rule_set in rule_sets:
            converted = convert_with(example.build_model(), rule_set, inputs)
            kept = kept_bytes(converted, inputs)
            rows.append({"example": name, "rules": rule_set, "bp_bytes": baseline,
                         "converted_bytes": kept, "ratio": kept / baseline})

    table = Table(title=f"bytes kept for backward, converted / BP (batch {args.batch}, fp32, CPU)")
    table.add_column("example")
    for rule_set in rule_sets:
        table.add_column(rule_set, justify="right")
    for name in names:
        ratios = {r["rules"]: r["ratio"] for r in rows if r["example"] == name}
        table.add_row(name, *(f"{ratios[r]:.3f}" for r in rule_sets))
    Console(width=160).print(table)

    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "torch": torch.__version__, "machine": platform.machine(),
              "batch": args.batch, "rows": rows}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()

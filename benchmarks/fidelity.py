"""Does a converted model still learn? Train every example with every rule set and compare with BP.

For each example and seed, plain backprop is trained first and then each rule set,
in the same process and from the same initial weights, batches and dropout draws
(``examples/train.py``). Writes a markdown table (held-out metric mean +- std over
seeds, forward bytes kept / BP, step time / BP, smallest ARA/ASA learning indicator,
the issue's target met or missed), a JSON record of every run, and a PNG of the
learning curves when matplotlib is installed.

    python benchmarks/fidelity.py                     # defaults: 3 seeds, every example and rule set
    python benchmarks/fidelity.py --quick             # tiny models, 20 steps, 1 seed (a minute or two)
    python benchmarks/fidelity.py --seeds 1 --examples resnet_basic,gpt --out /tmp/fidelity

Parts run in parallel (say, one process per core, each with its own --examples
and --out) become one table with ``--merge part1.json part2.json --out ...``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aalconvert  # noqa: E402
from aalconvert.nn import CONVERTED_TYPES  # noqa: E402
from aalconvert.nn.indicator import ARA_LAYERS, ASA_LAYERS  # noqa: E402
from examples import EXAMPLES  # noqa: E402
from examples.train import BP, TRAIN_CONFIGS, RunResult, rule_list, train  # noqa: E402

RULE_SETS = ["bp", "exact", "ara", "asa", "approx4", "auto", "auto+approx4"]
TARGETS = {
    "exact": "identical",
    "approx8": (0.5, 0.01),
    "approx4": (0.5, 0.01),
    "ara": (1.0, None),
    "asa": (2.0, 0.03),
}
"""Issue 6's targets: accuracy points below BP, relative loss above BP (None: no target given)."""


def applies(example: str, rules: str, smoke: bool) -> str | None:
    """Why ``rules`` does not apply to ``example`` (nothing converted, no ARA/ASA layer), or None."""
    if rules == BP:
        return None
    config = TRAIN_CONFIGS[example]
    model = EXAMPLES[example].build_model(**(config.smoke_overrides if smoke else config.overrides))
    converted = aalconvert.convert(model, rule_list(rules))
    modules = list(converted.modules())
    if not any(isinstance(m, CONVERTED_TYPES) for m in modules):
        return "nothing converted"
    for rule, layer_types in (("ara", ARA_LAYERS), ("asa", ASA_LAYERS)):
        if rules == rule and not any(isinstance(m, layer_types) for m in modules):
            return f"no {rule.upper()} layer"
    return None


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(runs: list[RunResult], skipped: dict[tuple[str, str], str]) -> list[dict]:
    """One row per (example, rule set): statistics over seeds, ratios to the same seed's BP run."""
    rows = []
    for example in dict.fromkeys(r.example for r in runs):
        bp = {r.seed: r for r in runs if r.example == example and r.rules == BP}
        bp_mean = statistics.fmean(r.final_metric for r in bp.values())
        for rules in dict.fromkeys(r.rules for r in runs if r.example == example):
            group = [r for r in runs if r.example == example and r.rules == rules]
            mean, std = _mean_std([r.final_metric for r in group])
            indicators = [r.min_indicator for r in group if r.min_indicator is not None]
            row = {
                "example": example, "rules": rules, "metric": group[0].metric, "seeds": len(group),
                "mean": mean, "std": std, "delta": mean - bp_mean,
                "kept_ratio": statistics.fmean(r.kept_bytes / bp[r.seed].kept_bytes for r in group),
                "time_ratio": statistics.fmean(r.step_time_s / bp[r.seed].step_time_s for r in group),
                "min_indicator": min(indicators) if indicators else None,
                "identical_to_bp": all(r.losses == bp[r.seed].losses for r in group),
            }
            row["target"] = target_verdict(row, group[0].higher_is_better, bp_mean)
            rows.append(row)
        for (skipped_example, rules), reason in skipped.items():
            if skipped_example == example:
                rows.append({"example": example, "rules": rules, "skipped": reason})
    return rows


def target_verdict(row: dict, higher_is_better: bool, bp_mean: float) -> str:
    """'met' / 'missed (...)' against TARGETS, or '-' where the issue sets none."""
    target = TARGETS.get(row["rules"])
    if target is None:
        return "-"
    if target == "identical":
        return "met" if row["identical_to_bp"] else "missed (losses differ from BP)"
    points, relative = target
    if row["min_indicator"] is not None and not row["min_indicator"] > 0:
        return "missed (learning indicator <= 0)"
    if higher_is_better:
        shortfall = bp_mean - row["mean"]
        return "met" if shortfall <= points else f"missed ({shortfall:.2f} points below BP)"
    if relative is None:
        return "-"
    excess = (row["mean"] - bp_mean) / bp_mean
    return "met" if excess <= relative else f"missed ({100 * excess:.1f}% above BP)"


def markdown(rows: list[dict], header: str) -> str:
    lines = [header, "",
             "| example | metric | rules | mean ± std | Δ vs BP | kept / BP | step time / BP | min LI | target |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        if "skipped" in row:
            lines.append(f"| {row['example']} | | {row['rules']} | n/a ({row['skipped']}) | | | | | |")
            continue
        li = "-" if row["min_indicator"] is None else f"{row['min_indicator']:.4f}"
        lines.append(
            f"| {row['example']} | {row['metric']} | {row['rules']} | {row['mean']:.3f} ± {row['std']:.3f} | "
            f"{row['delta']:+.3f} | {row['kept_ratio']:.3f} | {row['time_ratio']:.2f} | {li} | {row['target']} |")
    return "\n".join(lines) + "\n"


def plot(runs: list[RunResult], path: Path) -> str:
    """Learning curves (held-out metric vs step, mean over seeds), one panel per example; says what it did."""
    try:
        import matplotlib
    except ImportError:
        return "matplotlib is not installed (pip install -e '.[plot]'): no plot written"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    examples = list(dict.fromkeys(r.example for r in runs))
    colours = {rules: f"C{i}" for i, rules in enumerate(dict.fromkeys(r.rules for r in runs))}
    columns = min(4, len(examples))
    rows = math.ceil(len(examples) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.3 * rows), squeeze=False)
    for axis, example in zip(axes.flat, examples):
        for rules in dict.fromkeys(r.rules for r in runs if r.example == example):
            group = [r for r in runs if r.example == example and r.rules == rules]
            steps = [step for step, _ in group[0].curve]
            values = [statistics.fmean(r.curve[i][1] for r in group) for i in range(len(steps))]
            axis.plot(steps, values, label=rules, color="black" if rules == BP else colours[rules],
                      linestyle="--" if rules == BP else "-", linewidth=1.2)
        axis.legend(fontsize=6)
        axis.set_title(example, fontsize=10)
        axis.set_xlabel("step")
        axis.set_ylabel(group[0].metric, fontsize=8)
    for axis in list(axes.flat)[len(examples):]:
        axis.axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return f"plot written to {path}"


def load_parts(paths: list[Path]) -> tuple[list[RunResult], dict[tuple[str, str], str], str]:
    """(runs, skipped rule sets, header) of earlier runs' JSON files, refusing a run present twice."""
    runs: list[RunResult] = []
    skipped: dict[tuple[str, str], str] = {}
    headers = []
    for path in paths:
        data = json.loads(path.read_text())
        headers.append(data["header"])
        runs.extend(RunResult(**run) for run in data["runs"])
        skipped.update({(row["example"], row["rules"]): row["skipped"] for row in data["rows"] if "skipped" in row})
    keys = [(r.example, r.rules, r.seed) for r in runs]
    repeated = sorted({key for key in keys if keys.count(key) > 1})
    if repeated:
        raise SystemExit(f"--merge: runs {repeated} appear in more than one file; merge disjoint parts only")
    return runs, skipped, "Merged from:\n\n" + "\n".join(f"- {header}" for header in headers)


def train_all(args: argparse.Namespace, names: list[str], rule_sets: list[str]
              ) -> tuple[list[RunResult], dict[tuple[str, str], str], str]:
    """Train every example with every rule set and seed; (runs, skipped rule sets, header)."""
    seeds = 1 if args.quick else args.seeds
    steps = args.steps or (20 if args.quick else None)
    torch.set_num_threads(args.threads)
    runs: list[RunResult] = []
    skipped: dict[tuple[str, str], str] = {}
    for example in names:
        task = TRAIN_CONFIGS[example].make_task(args.quick)
        for rules in rule_sets:
            reason = applies(example, rules, args.quick)
            if reason:
                skipped[(example, rules)] = reason
        for seed in range(seeds):
            for rules in (r for r in rule_sets if (example, r) not in skipped):
                result = train(example, rules, steps=steps, seed=seed, device=args.device, smoke=args.quick,
                               task=task)
                runs.append(result)
                print(f"{example:18s} {rules:13s} seed {seed}: {result.metric} {result.final_metric:.3f}, "
                      f"kept {result.kept_bytes} B, step {1e3 * result.step_time_s:.1f} ms", flush=True)
    command = "python benchmarks/fidelity.py " + " ".join(args.argv)
    header = (f"Fidelity: `{command.strip()}` ({datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, "
              f"torch {torch.__version__}, Python {platform.python_version()}, {args.device}, "
              f"{seeds} seed(s), steps {'per example' if steps is None else steps})")
    return runs, skipped, header


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", default=",".join(TRAIN_CONFIGS), help="comma-separated example names")
    parser.add_argument("--rules", default=",".join(RULE_SETS), help="comma-separated rule sets ('+'-joined names)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per rule set (default 3)")
    parser.add_argument("--steps", type=int, help="optimizer steps per run (default: each example's)")
    parser.add_argument("--quick", action="store_true", help="tiny models, 20 steps, 1 seed")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1, help="CPU intra-op threads (default 1)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/fidelity"),
                        help="path prefix for .md, .json and .png (default benchmarks/results/fidelity)")
    parser.add_argument("--merge", type=Path, nargs="+", metavar="JSON",
                        help="write the table from these earlier runs' JSON files instead of training "
                             "(parts split by --examples; only --out applies)")
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    names, rule_sets = args.examples.split(","), args.rules.split(",")
    unknown = [n for n in names if n not in TRAIN_CONFIGS]
    if unknown:
        parser.error(f"unknown examples {unknown}; choose from {list(TRAIN_CONFIGS)}")
    for rules in rule_sets:
        try:
            rule_list(rules)
        except ValueError as error:
            parser.error(str(error))
    if BP not in rule_sets:
        rule_sets.insert(0, BP)  # every ratio is to the same seed's BP run

    if args.merge:
        training_options = ("examples", "rules", "seeds", "steps", "quick", "device", "threads")
        given = [f"--{name}" for name in training_options if getattr(args, name) != parser.get_default(name)]
        if given:
            parser.error(f"--merge takes the runs as they are in the files; drop {', '.join(given)}")
        missing = [str(path) for path in args.merge if not path.is_file()]
        if missing:
            parser.error(f"--merge: no such file(s) {missing}")
        runs, skipped, header = load_parts(args.merge)
    else:
        runs, skipped, header = train_all(args, names, rule_sets)
    rows = summarise(runs, skipped)
    table = markdown(rows, header)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(table)
    args.out.with_suffix(".json").write_text(json.dumps(
        {"header": header, "rows": rows, "runs": [asdict(r) for r in runs]}, indent=1))
    print(plot(runs, args.out.with_suffix(".png")))
    return rows


if __name__ == "__main__":
    main()

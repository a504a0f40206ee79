"""Does a converted model still learn? Train every example with every rule set and compare with BP.

For each example and seed, plain backprop is trained first and then each rule set,
in the same process and from the same initial weights, batches and dropout draws
(``examples/train.py``). Writes a markdown table (each run's end level, the mean of
its evaluations over the last quarter of its steps, mean +- std over seeds; the gap
to the same seed's BP with a 95 % t-interval over seeds and the issue's target met,
missed or undecided; the steps each rule set needs to reach BP's final level;
forward bytes kept / BP, step time / BP, smallest ARA/ASA learning indicator), a
JSON record of every run, and a PNG of the learning curves when matplotlib is installed.

    python benchmarks/fidelity.py                     # defaults: 3 seeds, every example and rule set
    python benchmarks/fidelity.py --quick             # tiny models, 20 steps, 1 seed (a minute or two)
    python benchmarks/fidelity.py --converged --examples transformer,resnet_bottleneck --seeds 5
    python benchmarks/fidelity.py --seeds 1 --examples resnet_basic,gpt --out /tmp/fidelity

Parts run apart (one process per core or per seed, each with its own --examples or
--first-seed and --out) become one table with ``--merge part1.json part2.json --out ...``.
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
from aalconvert.rules.registry import AUTO  # noqa: E402
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


CONFIDENCE = 0.95  # two-sided level of the paired t-interval each verdict reads
END_TAIL = 0.25  # the end level averages the evaluations of the last quarter of the steps
REACH_TOLERANCE = (0.5, 0.01)
"""How close to BP's final level counts as reached: accuracy points below it, relative loss above it."""


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz), converging for x < (a+1)/(a+b+2)."""
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, 300):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return result


def _incomplete_beta(a: float, b: float, x: float) -> float:
    """Regularized I_x(a, b), so the t distribution needs no scipy (the language examples need no sklearn)."""
    if x <= 0.0 or x >= 1.0:
        return 0.0 if x <= 0.0 else 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1) / (a + b + 2):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: int) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom."""
    tail = 0.5 * _incomplete_beta(df / 2, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: int) -> float:
    """The t with P(T <= t) = p, by bisection on ``t_cdf`` (monotone)."""
    low, high = -1e3, 1e3
    for _ in range(200):
        middle = (low + high) / 2
        low, high = (middle, high) if t_cdf(middle, df) < p else (low, middle)
    return (low + high) / 2


def t_interval(values: list[float], confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """(mean, low, high): two-sided t-interval of the mean; infinite with one value (no spread known)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, -math.inf, math.inf
    half = t_quantile(0.5 + confidence / 2, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def confidence_at_most(values: list[float], threshold: float) -> float | None:
    """How sure the paired seeds make us that the true mean is <= threshold (one-sided t); None with one seed."""
    if len(values) < 2:
        return None
    mean, spread = statistics.fmean(values), statistics.stdev(values) / math.sqrt(len(values))
    if spread == 0:
        return 1.0 if mean <= threshold else 0.0
    return t_cdf((threshold - mean) / spread, len(values) - 1)


def shortfall(value: float, bp_value: float, higher_is_better: bool) -> float:
    """How much worse than BP on the same seed: accuracy points below it, or % of BP's loss above it."""
    return bp_value - value if higher_is_better else 100.0 * (value - bp_value) / bp_value


def reach_level(bp_final: float, higher_is_better: bool) -> float:
    """BP's final level less the REACH_TOLERANCE, so noise at the ceiling does not read as never reaching it."""
    points, relative = REACH_TOLERANCE
    return bp_final - points if higher_is_better else bp_final * (1 + relative)


def steps_to_reach(curve: list[tuple[int, float]], level: float, higher_is_better: bool) -> int | None:
    """First evaluated step whose held-out metric is at or past ``level``; None if the run never got there."""
    for step, value in curve:
        if (value >= level) if higher_is_better else (value <= level):
            return step
    return None


def end_level(curve: list[tuple[int, float]], tail: float = END_TAIL) -> float:
    """Mean of the evaluations in the last ``tail`` of the steps (0: the final one): where a run ends, with
    less of the test set's one-image steps and the last iterate's wobble than a single evaluation."""
    last_step = curve[-1][0]
    return statistics.fmean(value for step, value in curve if step >= (1 - tail) * last_step)


def plateau_change(curve: list[tuple[int, float]], tail: float = 0.25) -> float:
    """Change of the metric over the last ``tail`` of the run's steps: small means BP stopped improving."""
    last_step = curve[-1][0]
    start = next(value for step, value in curve if step >= (1 - tail) * last_step)
    return curve[-1][1] - start


def seeds_for_half_width(spread: float, half_width: float, confidence: float = CONFIDENCE) -> int | None:
    """Seeds whose t-interval would be +-``half_width`` at this seed-to-seed ``spread`` (std of the paired
    gaps): how far a run is from telling a gap of that size from noise. None beyond 1000 seeds."""
    if spread == 0:
        return 2
    for n in range(2, 1001):
        if t_quantile(0.5 + confidence / 2, n - 1) * spread / math.sqrt(n) <= half_width:
            return n
    return None


def gap_verdict(gaps: list[float], target: float, unit: str) -> str:
    """'met' / 'missed' when the t-interval of the paired gap lies wholly below / above the target, else 'undecided'."""
    _, low, high = t_interval(gaps)
    sure = confidence_at_most(gaps, target)
    if sure is None:
        return f"undecided (1 seed; target {target:g} {unit})"
    state = "met" if high <= target else "missed" if low > target else "undecided"
    text = f"{state} (P(gap <= {target:g} {unit}) = {100 * sure:.1f} %"
    if state == "undecided":
        needed = seeds_for_half_width(statistics.stdev(gaps), 1.0)
        text += f"; about {needed or '>1000'} seeds for a +-1 {unit} interval at this spread"
    return text + ")"


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def target_for(example: str, rules: str) -> tuple | str | None:
    """The issue-6 target a rule set answers to: its own, or for a combination (``auto``) the tightest
    of the targets of its lossy parts that convert something in ``example``; None where none applies."""
    if rules in TARGETS:
        return TARGETS[rules]
    names = rule_list(rules)
    if not names:
        return None
    approx = any(name.startswith("approx") for name in names)
    parts = [p for name in names for p in (AUTO if name == "auto" else (name,)) if not (approx and p == "ara")]
    numeric = [TARGETS[p] for p in dict.fromkeys(parts)
               if isinstance(TARGETS.get(p), tuple) and applies(example, p, smoke=False) is None]
    if not numeric:
        return None
    relative = [r for _, r in numeric if r is not None]
    return min(points for points, _ in numeric), (min(relative) if relative else None)


def _gap_target(target: tuple, higher_is_better: bool) -> tuple[float | None, str]:
    """(threshold, unit) a paired gap is held to: points for accuracy, % of BP's loss for a loss."""
    points, relative = target
    return (points, "points") if higher_is_better else (None if relative is None else 100 * relative, "% loss")


def _reach(group: list[RunResult], bp: dict[int, RunResult], tail: float) -> dict:
    """Steps each seed's run needs to reach its BP's final level (within REACH_TOLERANCE), and BP's own."""
    own, base = [], []
    for run in group:
        level = reach_level(end_level(bp[run.seed].curve, tail), run.higher_is_better)
        own.append(steps_to_reach(run.curve, level, run.higher_is_better))
        base.append(steps_to_reach(bp[run.seed].curve, level, run.higher_is_better))
    reached = [s for s in own if s is not None]
    ratios = [s / b for s, b in zip(own, base) if s is not None and b]
    return {"steps_to_bp_final": own, "bp_steps_to_bp_final": base,
            "reach_median": statistics.median(reached) if reached else None,
            "reach_ratio": statistics.fmean(ratios) if ratios else None,
            "not_reached": sum(s is None for s in own)}


def _compare(row: dict, group: list[RunResult], bp: dict[int, RunResult], example: str, tail: float) -> None:
    """Add the paired gap to BP (t-interval over seeds), its verdict and the steps to BP's final level."""
    higher = group[0].higher_is_better
    gaps = [shortfall(end_level(r.curve, tail), end_level(bp[r.seed].curve, tail), higher) for r in group]
    _, low, high = t_interval(gaps)
    row.update(gaps=gaps, gap_mean=statistics.fmean(gaps), gap_low=low, gap_high=high,
               gap_unit="points" if higher else "% loss", **_reach(group, bp, tail))
    target = target_for(example, row["rules"])
    row["target_used"] = target
    if target == "identical":
        row["verdict"] = "met (losses identical to BP)" if row["identical_to_bp"] else "missed (losses differ)"
    elif target is None:
        row["verdict"] = "-"
    else:
        threshold, unit = _gap_target(target, higher)
        row["verdict"] = "-" if threshold is None else gap_verdict(gaps, threshold, unit)


def summarise(runs: list[RunResult], skipped: dict[tuple[str, str], str], tail: float = END_TAIL) -> list[dict]:
    """One row per (example, rule set): statistics over seeds, ratios and paired gaps to the same seed's BP run.

    ``mean``/``std``/``delta`` are of the final evaluation (as before); the gap, verdict and steps to BP's
    level read ``end_level`` (the last ``tail`` of the steps averaged)."""
    rows = []
    for example in dict.fromkeys(r.example for r in runs):
        bp = {r.seed: r for r in runs if r.example == example and r.rules == BP}
        bp_mean = statistics.fmean(r.final_metric for r in bp.values())
        for rules in dict.fromkeys(r.rules for r in runs if r.example == example):
            group = [r for r in runs if r.example == example and r.rules == rules]
            missing = sorted({r.seed for r in group} - set(bp))
            if missing:
                raise SystemExit(f"{example} {rules}: seeds {missing} have no BP run to pair with")
            mean, std = _mean_std([r.final_metric for r in group])
            indicators = [r.min_indicator for r in group if r.min_indicator is not None]
            row = {
                "example": example, "rules": rules, "metric": group[0].metric, "seeds": len(group),
                "steps": sorted({r.steps for r in group}),
                "mean": mean, "std": std, "delta": mean - statistics.fmean(bp[r.seed].final_metric for r in group),
                "kept_ratio": statistics.fmean(r.kept_bytes / bp[r.seed].kept_bytes for r in group),
                "time_ratio": statistics.fmean(r.step_time_s / bp[r.seed].step_time_s for r in group),
                "min_indicator": min(indicators) if indicators else None,
                "identical_to_bp": all(r.losses == bp[r.seed].losses for r in group),
            }
            row["target"] = target_verdict(row, group[0].higher_is_better, bp_mean)
            if rules == BP:
                row["plateau_change"] = statistics.fmean(plateau_change(r.curve) for r in group)
            else:
                _compare(row, group, bp, example, tail)
            row["end_level"], row["end_std"] = _mean_std([end_level(r.curve, tail) for r in group])
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


def _target_text(target: tuple | str | None, unit: str) -> str:
    if target is None:
        return "-"
    if target == "identical":
        return "identical"
    points, relative = target
    return f"<= {points:g} points" if unit == "points" else (
        "-" if relative is None else f"<= {100 * relative:g} % loss")


def _reach_text(row: dict) -> str:
    """Median steps to BP's final level, BP's own median in brackets, the mean per-seed ratio, misses."""
    if row["reach_median"] is None:
        return f"not reached ({row['not_reached']}/{row['seeds']} seeds)"
    reached = [b for s, b in zip(row["steps_to_bp_final"], row["bp_steps_to_bp_final"]) if s is not None and b]
    text = f"{row['reach_median']:g} (BP {statistics.median(reached):g})" if reached else f"{row['reach_median']:g}"
    if row["reach_ratio"] is not None:
        text += f", x{row['reach_ratio']:.2f}"
    if row["not_reached"]:
        text += f"; not reached on {row['not_reached']}/{row['seeds']} seeds"
    return text


def _gap_text(row: dict) -> str:
    if math.isinf(row["gap_low"]):
        return f"{row['gap_mean']:+.2f} {row['gap_unit']} (1 seed)"
    return f"{row['gap_mean']:+.2f} [{row['gap_low']:+.2f}, {row['gap_high']:+.2f}] {row['gap_unit']}"


def markdown(rows: list[dict], header: str, tail: float = END_TAIL) -> str:
    """The table: end level, paired gap to BP with its t-interval, the verdict, steps to BP's final level."""
    lines = [header, "",
             f"End level: mean of a run's held-out evaluations over the last {100 * tail:g} % of its steps, then "
             f"mean ± std over seeds. Gap: how much worse than BP's end level on the same seed (accuracy points "
             f"below, or % of loss above), mean over seeds [{100 * CONFIDENCE:g} % t-interval]. Verdict: met / "
             f"missed when the whole interval "
             f"is on one side of the target, else undecided; P is the one-sided t probability that the true gap is "
             f"within the target. Steps to BP's final level: first evaluation at or past each seed's BP end level "
             f"less {REACH_TOLERANCE[0]:g} points (or {100 * REACH_TOLERANCE[1]:g} % more loss), median over seeds "
             f"(BP's own), and the mean per-seed ratio to BP's. BP rows: change of BP's metric over the last quarter "
             f"of its steps (near 0: converged).", "",
             "| example | metric | rules | seeds | steps | end level mean ± std | gap vs BP [CI] | target | verdict | "
             "steps to BP's final level | kept / BP | step time / BP | min LI |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        if "skipped" in row:
            lines.append(f"| {row['example']} | | {row['rules']} | n/a ({row['skipped']}) | | | | | | | | | |")
            continue
        li = "-" if row["min_indicator"] is None else f"{row['min_indicator']:.4f}"
        steps = ",".join(str(s) for s in row.get("steps", []))
        start = (f"| {row['example']} | {row['metric']} | {row['rules']} | {row['seeds']} | {steps} | "
                 f"{row['end_level']:.3f} ± {row['end_std']:.3f} | ")
        if row["rules"] == BP:
            middle = f"plateau {row['plateau_change']:+.3f} | - | - | - | "
        else:
            unit = row["gap_unit"]
            middle = (f"{_gap_text(row)} | {_target_text(row['target_used'], unit)} | {row['verdict']} | "
                      f"{_reach_text(row)} | ")
        lines.append(start + middle + f"{row['kept_ratio']:.3f} | {row['time_ratio']:.2f} | {li} |")
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
    prefix = "Merged from:\n\n"
    parts = [line for header in headers
             for line in (header.removeprefix(prefix).splitlines() if header.startswith(prefix) else [f"- {header}"])]
    return runs, skipped, prefix + "\n".join(parts)  # a merged file merged again lists its parts once


def run_length(example: str, converged: bool) -> int | None:
    """The example's converged run length with ``--converged`` (None: its short default), or a clear error."""
    if not converged:
        return None
    steps = TRAIN_CONFIGS[example].converged_steps
    if steps is None:
        raise SystemExit(f"--converged: no converged run length measured for {example!r} (TrainConfig."
                         f"converged_steps); give --steps, or measure one and set it in examples/train.py")
    return steps


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
        for seed in range(args.first_seed, args.first_seed + seeds):
            for rules in (r for r in rule_sets if (example, r) not in skipped):
                result = train(example, rules, steps=steps or run_length(example, args.converged), seed=seed,
                               device=args.device, smoke=args.quick, task=task, eval_points=args.eval_points)
                runs.append(result)
                print(f"{example:18s} {rules:13s} seed {seed}: {result.metric} {result.final_metric:.3f}, "
                      f"kept {result.kept_bytes} B, step {1e3 * result.step_time_s:.1f} ms", flush=True)
    command = "python benchmarks/fidelity.py " + " ".join(args.argv)
    header = (f"Fidelity: `{command.strip()}` ({datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, "
              f"torch {torch.__version__}, Python {platform.python_version()}, {args.device}, "
              f"seeds {args.first_seed}..{args.first_seed + seeds - 1}, steps "
              f"{steps or ('converged per example' if args.converged else 'per example')}, "
              f"{args.eval_points} evaluations per run)")
    return runs, skipped, header


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", default=",".join(TRAIN_CONFIGS), help="comma-separated example names")
    parser.add_argument("--rules", default=",".join(RULE_SETS), help="comma-separated rule sets ('+'-joined names)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per rule set (default 3)")
    parser.add_argument("--first-seed", type=int, default=0,
                        help="seeds run are first-seed .. first-seed+N-1 (parts split by seed merge with --merge)")
    parser.add_argument("--eval-points", type=int, default=10,
                        help="held-out evaluations per run (the learning curve; steps-to-reach resolution)")
    parser.add_argument("--steps", type=int, help="optimizer steps per run (default: each example's)")
    parser.add_argument("--quick", action="store_true", help="tiny models, 20 steps, 1 seed")
    parser.add_argument("--converged", action="store_true",
                        help="each example's converged run length (TrainConfig.converged_steps), "
                             "not its short default")
    parser.add_argument("--end-tail", type=float, default=END_TAIL,
                        help="fraction of the last steps whose evaluations make a run's end level (0: the final one)")
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
    if args.converged and not args.steps:
        for name in names:
            run_length(name, True)  # an example without a measured length fails before any training
    if BP not in rule_sets:
        rule_sets.insert(0, BP)  # every ratio is to the same seed's BP run

    if args.merge:
        training_options = ("examples", "rules", "seeds", "first_seed", "eval_points", "steps", "quick", "converged",
                            "device", "threads")
        given = [f"--{name}" for name in training_options if getattr(args, name) != parser.get_default(name)]
        if given:
            parser.error(f"--merge takes the runs as they are in the files; drop {', '.join(given)}")
        missing = [str(path) for path in args.merge if not path.is_file()]
        if missing:
            parser.error(f"--merge: no such file(s) {missing}")
        runs, skipped, header = load_parts(args.merge)
    else:
        runs, skipped, header = train_all(args, names, rule_sets)
    rows = summarise(runs, skipped, args.end_tail)
    table = markdown(rows, header, args.end_tail)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(table)
    args.out.with_suffix(".json").write_text(json.dumps(
        {"header": header, "rows": rows, "runs": [asdict(r) for r in runs]}, indent=1))
    print(plot(runs, args.out.with_suffix(".png")))
    return rows


if __name__ == "__main__":
    main()

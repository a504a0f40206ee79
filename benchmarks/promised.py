"""What inspect promises against what a real step keeps: predicted vs measured bytes, per model and rule set.

Users judge a conversion by "memory drops by the amount the report promised".
For real models from the zoo (``benchmarks/zoo.py``'s builders, at its step
size: vision batch 2 at 64 px, Swin 112, text 4 x 128 tokens; random init,
train mode, default dropout, fp32, CPU) and rule sets ``bp`` (no conversion),
``exact``, ``auto``, ``auto+approx4`` (the zoo's spelling), this compares:

- bytes kept for backward: ``aalconvert.inspect``'s prediction on fake tensors
  (``Report.totals.bp_bytes`` / ``converted_bytes``) against the zoo's
  measurement of one real forward (``zoo.run_step``: saved-tensor hooks,
  distinct storages, parameters excluded);
- the step above its start: inspect's simulated step (``bp_step_bytes`` /
  ``converted_step_bytes``) against the profiler's replay of one real step
  (``aalconvert.step_memory.measure_training_step``, SGD, the same stand-in
  loss ``training_loss``: a language model's own loss, else logsumexp).

Language models get ``labels=`` the token ids in both (``zoo.training_keywords``).
Where the kept bytes differ by more than ``--threshold`` (5 %), the modules
that differ most are listed (``aalconvert.memory.saved_by_module`` on the real
model against the report's rows), with the cause where one is known.

    .zoo-venv/bin/python benchmarks/promised.py --no-venv            # the default list, ~10 min on one thread
    python benchmarks/promised.py --models gpt2,bert --rules bp,auto  # re-runs itself in .zoo-venv/
"""

import argparse
import gc
import json
import math
import platform
import sys
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # aalconvert at the repo root
sys.path.insert(0, str(ROOT / "benchmarks"))  # zoo.py's builders and measurement

import zoo  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
BP = "bp"
RULE_SETS = [BP, "exact", "auto", "auto+approx4"]
# One model per family of the zoo, as the zoo builds it.
DEFAULT_MODELS = ["hf/gpt2", "hf/bert", "hf/llama", "hf/t5", "hf/bart", "hf/opt",
                  "timm/vit_small_patch16_224", "timm/swin_tiny_patch4_window7_224",
                  "torchvision/resnet50", "torchvision/mobilenet_v3_large", "torchvision/efficientnet_b0",
                  "torchvision/convnext_tiny"]
THRESHOLD = 0.05
# Known causes of gaps this code does not close, by model (shown under the table when a row is off).
KNOWN_GAPS: dict[str, str] = {}  # BART's all-ones decoder mask was one until 80e8565 (aalconvert/known_ones.py)
# Known causes of step-peak gaps (not the kept bytes this benchmark holds to 5 %), by model.
PEAK_NOTES: dict[str, str] = {
    "hf/gpt2": "under auto+approx4 only: the CPU path of the k-bit kernels makes temporaries the "
               "simulation does not model (README: 'Not seen')",
}


def _error(predicted: int | None, measured: int | None) -> float | None:
    """(predicted - measured) / measured, or None when either is missing."""
    if predicted is None or not measured:
        return None
    return (predicted - measured) / measured


def _loss_of(model: Any, inputs: tuple, keywords: dict):
    from aalconvert.step_memory import training_loss

    return lambda: training_loss(model(*inputs, **keywords))


def measured_peak(model: Any, inputs: tuple, keywords: dict) -> int:
    """The profiler's peak of one real SGD step above its start (bytes)."""
    from aalconvert.step_memory import measure_training_step

    model.train()
    torch_seed()
    return measure_training_step(model, _loss_of(model, inputs, keywords)).peak_bytes


def torch_seed() -> None:
    import torch

    torch.manual_seed(1)


def module_differences(report: Any, model: Any, inputs: tuple, keywords: dict, params: list,
                       converted: bool, top: int = 5) -> list[dict]:
    """The modules whose predicted bytes differ most from a real forward's (``saved_by_module``)."""
    from aalconvert.memory import saved_by_module

    model.train()
    torch_seed()
    real = saved_by_module(model, lambda: model(*inputs, **keywords), params).bytes_by_module
    predicted = {row.name: row.bytes_converted if converted else row.bytes_bp for row in report.rows}
    rows = [{"module": name or "<root>", "predicted": predicted.get(name, 0), "measured": real.get(name, 0)}
            for name in set(real) | set(predicted) if predicted.get(name, 0) != real.get(name, 0)]
    rows.sort(key=lambda r: -abs(r["predicted"] - r["measured"]))
    return rows[:top]


def measure_model(entry: "zoo.Entry", rule_sets: list[str], threshold: float, peaks: bool) -> dict:
    """Every rule set on one model: predicted and measured kept bytes (and step peaks)."""
    import torch

    import aalconvert

    record: dict[str, Any] = {"model": entry.name, "rows": []}
    start = time.perf_counter()
    torch.manual_seed(0)
    model, inputs = entry.build()
    params = [p for p in model.parameters() if p.requires_grad]
    keywords = zoo.training_keywords(model, inputs)
    record.update(inputs=[list(t.shape) for t in inputs if isinstance(t, torch.Tensor)],
                  parameters=sum(p.numel() for p in params), labels=bool(keywords))
    labels = keywords.get("labels")
    bp_measured = zoo.run_step(model, inputs, params, keywords).nbytes
    bp_peak = measured_peak(model, inputs, keywords) if peaks else None
    reports: dict[str, Any] = {}  # BP's prediction comes with every report: taken from the first

    def inspect(rules: str) -> Any:
        if rules == BP and reports:
            return next(iter(reports.values()))
        reports.setdefault(rules, aalconvert.inspect(model, inputs, "exact" if rules == BP else rules.split("+"),
                                                     labels=labels))
        return reports[rules]

    for rules in [*[r for r in rule_sets if r != BP], *[r for r in rule_sets if r == BP]]:
        row: dict[str, Any] = {"rules": rules}
        try:
            report = inspect(rules)
            totals = report.totals
            if rules == BP:
                target = model
                row.update(predicted=totals.bp_bytes, predicted_peak=totals.bp_step_bytes,
                           measured=bp_measured, measured_peak=bp_peak)
            else:
                target = aalconvert.convert(model, rules.split("+"), example_inputs=inputs)
                row.update(predicted=totals.converted_bytes, predicted_peak=totals.converted_step_bytes,
                           measured=zoo.run_step(target, inputs, params, keywords).nbytes,
                           measured_peak=measured_peak(target, inputs, keywords) if peaks else None)
            row.update(error=_error(row["predicted"], row["measured"]),
                       peak_error=_error(row["predicted_peak"], row["measured_peak"]),
                       notes=list(report.notes), estimated_on=report.estimated_on)
            if row["error"] is not None and abs(row["error"]) > threshold:
                row["differences"] = module_differences(report, target, inputs, keywords, params, rules != BP)
            row["status"] = "ok"
        except Exception as error:  # a failure is a row, never silent
            row.update(status="error", error_message=f"{type(error).__name__}: {error}"[:500])
        record["rows"].append(row)
        target = report = None
        gc.collect()
    record["rows"].sort(key=lambda row: rule_sets.index(row["rules"]))
    record["seconds"] = time.perf_counter() - start
    return record


def _percent(value: float | None) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:+.1f} %"


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.3f}"


def markdown(result: dict) -> str:
    """The table (predicted, measured, error %) with the command at the top, then every gap explained."""
    threshold = result["threshold"]
    lines = [f"# inspect's promise against a real step ({result['date'][:10]})", "",
             f"`{result['command']}`", "",
             f"{result['machine']}, {result['threads']} thread(s), torch {result['versions'].get('torch')}, "
             + ", ".join(f"{k} {v}" for k, v in result["versions"].items() if k != "torch")
             + f"; aalconvert {result['library']}; {result['seconds'] / 60:.1f} min.", "",
             "Kept: bytes kept for backward after the forward (predicted: `aalconvert.inspect` on fake tensors; "
             "measured: `zoo.run_step`'s saved-tensor hooks on one real forward). Peak: the most bytes of one "
             "training step above its start (predicted: inspect's simulated step; measured: "
             "`aalconvert.step_memory.measure_training_step`, the profiler). MiB; error = (predicted - measured) "
             f"/ measured. Zoo step sizes (vision batch 2 at 64 px, Swin 112, text 4 x 128), train mode, fp32, "
             f"CPU. Rows off by more than {100 * threshold:.0f} % in kept bytes are marked **bold**.", "",
             "| model | rules | kept predicted | kept measured | error | peak predicted | peak measured | error |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    off = []
    for record in result["records"]:
        for row in record["rows"]:
            if row["status"] != "ok":
                lines.append(f"| {record['model']} | {row['rules']} | fails: {row['error_message'][:80]} | | | | | |")
                off.append((record, row))
                continue
            big = row["error"] is not None and abs(row["error"]) > threshold
            error = _percent(row["error"])
            lines.append(f"| {record['model']} | {row['rules']} | {_mib(row['predicted'])} | {_mib(row['measured'])} "
                         f"| {f'**{error}**' if big else error} | {_mib(row['predicted_peak'])} | "
                         f"{_mib(row['measured_peak'])} | {_percent(row['peak_error'])} |")
            if big:
                off.append((record, row))
    errors = [abs(r["error"]) for rec in result["records"] for r in rec["rows"] if r.get("error") is not None]
    peak_errors = [abs(r["peak_error"]) for rec in result["records"] for r in rec["rows"]
                   if r.get("peak_error") is not None]
    lines += ["", f"Kept bytes: {len(errors)} rows, largest error {_percent(max(errors, default=None))} (absolute), "
              f"{sum(e > threshold for e in errors)} above {100 * threshold:.0f} %."
              + (f" Peaks: largest error {_percent(max(peak_errors))} (absolute)." if peak_errors else "")]
    peak_off = sorted({record["model"] for record in result["records"] for row in record["rows"]
                       if row.get("peak_error") is not None and abs(row["peak_error"]) > threshold})
    if peak_off:
        lines += ["", f"## Step peaks off by more than {100 * threshold:.0f} % ({len(peak_off)} models)", ""]
        lines += [f"- {model}: {PEAK_NOTES.get(model, 'cause not found yet')}." for model in peak_off]
    lines += ["", f"## Rows off by more than {100 * threshold:.0f} % in kept bytes ({len(off)})", ""]
    by_model: dict[str, list[dict]] = {}
    for record, row in off:
        by_model.setdefault(record["model"], []).append(row)
    for model, rows in by_model.items():
        failed = [f"{row['rules']}: {row['error_message']}" for row in rows if row["status"] != "ok"]
        rows = [row for row in rows if row["status"] == "ok"]
        if failed:
            lines.append(f"- {model} fails: " + "; ".join(failed))
        if not rows:
            continue
        errors = ", ".join(f"{row['rules']} {_percent(row['error'])}" for row in rows)
        modules = "; ".join(f"{d['module']} {d['predicted']} vs {d['measured']} B" for d in rows[0].get("differences", []))
        lines.append(f"- {model} ({errors}): {KNOWN_GAPS.get(model, 'cause not found yet')}. Modules predicted vs "
                     f"measured ({rows[0]['rules']}): {modules or 'none differ'}.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS),
                        help="comma-separated zoo names (hf/gpt2, or bare: gpt2, resnet50); default: one per family")
    parser.add_argument("--rules", default=",".join(RULE_SETS), help="comma-separated rule sets ('+'-joined; bp: none)")
    parser.add_argument("--threshold", type=float, default=THRESHOLD, help="kept-bytes error that counts as off")
    parser.add_argument("--no-peaks", action="store_true", help="leave out the step peaks (one profiled step each)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/promised_<date>.json); "
                                                 ".md beside it")
    parser.add_argument("--no-venv", action="store_true", help="run in this interpreter, not .zoo-venv")
    args = parser.parse_args(argv)
    zoo.reexec_in_zoo_venv(__file__, argv)

    import torch

    torch.set_num_threads(args.threads)
    entries, not_importable = zoo.zoo()
    entries = zoo.select(entries, args.models, None, False, parser)
    rule_sets = args.rules.split(",")
    date = datetime.now(timezone.utc)
    out = args.out or RESULTS / f"promised_{date:%Y-%m-%d}.json"
    result = {"date": date.isoformat(timespec="seconds"),
              "command": "python benchmarks/promised.py" + (" " + " ".join(argv) if argv else ""),
              "library": zoo.library_state(), "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
              "threads": torch.get_num_threads(), "versions": zoo.package_versions(), "rule_sets": rule_sets,
              "threshold": args.threshold, "not_run": not_importable, "records": [], "seconds": 0.0}
    started = time.perf_counter()
    for index, entry in enumerate(entries, 1):
        print(f"[{index}/{len(entries)} {time.perf_counter() - started:5.0f}s] {entry.name} ...", file=sys.stderr,
              flush=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            record = measure_model(entry, rule_sets, args.threshold, not args.no_peaks)
        result["records"].append(record)
        for row in record["rows"]:
            print(f"    {row['rules']:14s} " + (f"kept {_mib(row['predicted'])} vs {_mib(row['measured'])} MiB "
                                                f"({_percent(row['error'])}), peak {_mib(row['predicted_peak'])} vs "
                                                f"{_mib(row['measured_peak'])} ({_percent(row['peak_error'])})"
                                                if row["status"] == "ok" else row["error_message"]),
                  file=sys.stderr, flush=True)
        result["seconds"] = time.perf_counter() - started
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(markdown(result))
    print(f"wrote {out} and {out.with_suffix('.md')}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()

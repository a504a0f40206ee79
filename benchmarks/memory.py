"""Memory kept for backward and step time, converted vs ordinary backprop, per example, batch and rule.

For each example at each batch size: the bytes one training-mode forward keeps
for backward, and the time of one full training step (forward, loss, backward,
SGD step) as a ratio to BP, measured in the same process with the rule sets'
steps interleaved round by round (median of ``--rounds``), so a machine that
slows down mid-run slows every rule alike.

- CPU: bytes are every storage a saved tensor points to, counted once,
  parameters excluded (aalconvert.memory.measure_saved; methods.md section 5).
- CUDA: bytes are ``torch.cuda.max_memory_allocated`` over one full step,
  minus what was allocated before it (parameters, optimizer state), and
  ``--cap-gib`` additionally finds the largest batch whose step fits under that
  cap (``torch.cuda.set_per_process_memory_fraction``) for BP and each rule.

    python benchmarks/memory.py                       # batches 16 and 64, every example and rule set
    python benchmarks/memory.py --batch 4 --examples resnet_basic,vit --json out.json
    python benchmarks/memory.py --device cuda --cap-gib 4 --json benchmarks/results/memory_h100.json
"""

import argparse
import gc
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # cpu_malloc

import aalconvert  # noqa: E402
from cpu_malloc import malloc_for_timing  # noqa: E402
from aalconvert.bisection import first_true  # noqa: E402
from aalconvert.errors import ConversionError  # noqa: E402
from aalconvert.memory import measure_saved  # noqa: E402
from examples import EXAMPLES  # noqa: E402

BP = "bp"
RULE_SETS = ["exact", "recompute", "ara", "ara(stage)", "asa", "approx8", "approx4", "auto", "auto+approx4"]
MAX_BATCH_LIMIT = 1 << 20  # the largest batch the cap search tries


def build(name: str, rule_set: str, inputs: tuple, device: torch.device) -> torch.nn.Module:
    """A fresh example model on ``device``, converted with a rule set as named in RULE_SETS (or BP)."""
    torch.manual_seed(0)
    model = EXAMPLES[name].build_model().to(device)
    if rule_set == BP:
        return model
    if rule_set == "ara(stage)":
        return aalconvert.convert(model, "ara", example_inputs=inputs, ara_group="stage")
    return aalconvert.convert(model, rule_set.split("+"), example_inputs=inputs)


def make_inputs(name: str, batch: int, device: torch.device) -> tuple:
    torch.manual_seed(0)
    return tuple(t.to(device) for t in EXAMPLES[name].example_inputs(batch))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Trainer:
    """One model with its SGD optimizer, stepping on fixed inputs (a full training step)."""

    def __init__(self, model: torch.nn.Module, inputs: tuple):
        self.model, self.inputs = model.train(), inputs
        self.optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.model(*self.inputs).float().square().mean().backward()
        self.optimizer.step()

    def timed_step(self, device: torch.device) -> float:
        synchronize(device)
        start = time.perf_counter()
        self.step()
        synchronize(device)
        return time.perf_counter() - start


def kept_bytes(trainer: Trainer, device: torch.device) -> int:
    """Bytes one step keeps for backward (CPU: saved storages; CUDA: step peak over the pre-step allocation)."""
    if device.type == "cuda":
        trainer.optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        trainer.step()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    saved = measure_saved(lambda: trainer.model(*trainer.inputs), trainer.model.parameters())
    saved.output.float().square().mean().backward()  # what was kept is enough for backward
    return saved.nbytes


def step_times(trainers: dict[str, Trainer], rounds: int, device: torch.device) -> dict[str, float]:
    """Median step time per rule set, the rule sets interleaved in every round."""
    times: dict[str, list[float]] = {rules: [] for rules in trainers}
    for _ in range(rounds):
        for rules, trainer in trainers.items():
            times[rules].append(trainer.timed_step(device))
    return {rules: statistics.median(t) for rules, t in times.items()}


def largest_fitting(fits: Callable[[int], bool], limit: int = MAX_BATCH_LIMIT) -> int:
    """The largest n in [1, limit] with ``fits(n)``, assuming fits is monotone (0 if even 1 fails).

    Doubles until a failure, then bisects between the last fit and the first failure.
    """
    if not fits(1):
        return 0
    good = 1
    while good < limit:
        trial = min(2 * good, limit)
        if not fits(trial):
            bad = trial
            break
        good = trial
    else:
        return good
    return first_true(good, bad, lambda batch: not fits(batch)) - 1


def release_cuda_memory() -> None:
    """Free what dropped models still hold: a model and its optimizer form a reference cycle."""
    gc.collect()
    torch.cuda.empty_cache()


def step_fits(name: str, rule_set: str, batch: int, device: torch.device) -> bool:
    """True when two full training steps at ``batch`` run without a CUDA out-of-memory error."""
    try:
        inputs = make_inputs(name, batch, device)
        trainer = Trainer(build(name, rule_set, inputs, device), inputs)
        trainer.step()
        trainer.step()  # the second step also holds the optimizer's momentum
        return True
    except torch.OutOfMemoryError:
        return False
    except ConversionError as error:  # tracing on example values ran out of memory
        if isinstance(error.__cause__, torch.OutOfMemoryError):
            return False
        raise
    finally:
        inputs = trainer = None
        release_cuda_memory()


def max_batches(name: str, rule_sets: list[str], cap_gib: float, device: torch.device) -> dict[str, int]:
    """Largest batch per rule set (BP included) whose training step fits under ``cap_gib`` GiB."""
    release_cuda_memory()
    fraction = cap_gib * 2**30 / torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    try:
        return {rules: largest_fitting(lambda n: step_fits(name, rules, n, device)) for rules in [BP, *rule_sets]}
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)


def measure_example(name: str, batch: int, rule_sets: list[str], rounds: int, device: torch.device) -> list[dict]:
    """One row per rule set: bytes kept and step time, each with its ratio to BP at this batch."""
    inputs = make_inputs(name, batch, device)
    trainers = {rules: Trainer(build(name, rules, inputs, device), inputs) for rules in [BP, *rule_sets]}
    for trainer in trainers.values():
        # Warm-up before anything is measured: lazy initialisation, kernel compilation,
        # library workspaces (allocated once, on the first matmuls) and optimizer state.
        trainer.step()
    kept = {rules: kept_bytes(trainer, device) for rules, trainer in trainers.items()}
    times = step_times(trainers, rounds, device)
    return [{"example": name, "batch": batch, "rules": rules,
             "bp_bytes": kept[BP], "converted_bytes": kept[rules], "ratio": kept[rules] / kept[BP],
             "bp_step_s": times[BP], "step_s": times[rules], "step_ratio": times[rules] / times[BP]}
            for rules in rule_sets]


def print_table(rows: list[dict], names: list[str], rule_sets: list[str], batch: int, device: torch.device) -> None:
    what = "step peak" if device.type == "cuda" else "bytes kept for backward"
    table = Table(title=f"{what}, converted / BP, and step time / BP (batch {batch}, fp32, {device.type})")
    table.add_column("example")
    for rule_set in rule_sets:
        table.add_column(rule_set, justify="right")
    for name in names:
        cells = {r["rules"]: r for r in rows if r["example"] == name and r["batch"] == batch}
        table.add_row(name, *(f"{cells[r]['ratio']:.3f} / {cells[r]['step_ratio']:.2f}x" for r in rule_sets))
    Console(width=200).print(table)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", default="16,64", help="comma-separated batch sizes (default 16,64)")
    parser.add_argument("--examples", default=",".join(EXAMPLES), help="comma-separated example names")
    parser.add_argument("--rules", default=",".join(RULE_SETS), help="comma-separated rule sets")
    parser.add_argument("--rounds", type=int, default=5, help="timed steps per rule set (median; default 5)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--cap-gib", type=float, help="CUDA only: also find the largest batch under this cap")
    parser.add_argument("--threads", type=int, default=1, help="CPU intra-op threads (default 1)")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    parser.add_argument("--system-malloc", action="store_true",
                        help="CPU: leave glibc's malloc as it is (default: keep freed memory, benchmarks/cpu_malloc.py)")
    args = parser.parse_args(argv)
    names, rule_sets = args.examples.split(","), args.rules.split(",")
    unknown = [n for n in names if n not in EXAMPLES] + [r for r in rule_sets if r not in RULE_SETS]
    if unknown:
        parser.error(f"unknown example or rule set {unknown}; examples: {list(EXAMPLES)}, rule sets: {RULE_SETS}")
    try:
        batches = [int(b) for b in args.batch.split(",")]
    except ValueError:
        parser.error(f"--batch takes comma-separated positive integers, got {args.batch!r}")
    if any(b < 1 for b in batches) or args.rounds < 1:
        parser.error("--batch sizes and --rounds must be at least 1")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda was given but torch sees no CUDA device")
    if device.type == "cuda" and device.index is None:  # the memory-fraction call needs an index
        device = torch.device("cuda", torch.cuda.current_device())
    if args.cap_gib is not None:
        if device.type != "cuda":
            parser.error("--cap-gib needs --device cuda (the cap is a CUDA allocator limit)")
        total_gib = torch.cuda.get_device_properties(device).total_memory / 2**30
        if not 0 < args.cap_gib <= total_gib:
            parser.error(f"--cap-gib must be above 0 and at most the device's {total_gib:.1f} GiB")
    torch.set_num_threads(args.threads)
    malloc = None
    if device.type == "cpu":
        malloc = malloc_for_timing(args.system_malloc)

    rows: list[dict] = []
    for batch in batches:
        for name in names:
            print(f"measuring {name} at batch {batch}", file=sys.stderr, flush=True)
            rows.extend(measure_example(name, batch, rule_sets, args.rounds, device))
        print_table(rows, names, rule_sets, batch, device)

    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "torch": torch.__version__, "machine": platform.machine(), "device": device.type,
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
              "command": "python benchmarks/memory.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "batches": batches, "rounds": args.rounds, "malloc": malloc, "rows": rows}
    if args.json:  # written now too, so a failing batch search cannot lose the measurements
        args.json.write_text(json.dumps(result, indent=2))
    if args.cap_gib is not None:
        result["cap_gib"] = args.cap_gib
        result["max_batch"] = {}
        for name in names:
            print(f"searching the largest batch of {name} under {args.cap_gib} GiB", file=sys.stderr, flush=True)
            result["max_batch"][name] = found = max_batches(name, rule_sets, args.cap_gib, device)
            print(f"{name}: largest batch under {args.cap_gib} GiB: "
                  + ", ".join(f"{rules} {n} ({n / max(found[BP], 1):.1f}x BP)" for rules, n in found.items()))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()

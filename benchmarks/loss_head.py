"""The loss head on a Hugging Face Llama with a 32k vocabulary: bytes kept, step peak, step time.

Issue 12's model: 4 layers of width 256 (random init, nothing downloaded), batch
2 x 256 tokens called with ``labels=``, fp32, train mode, CPU. Per rule set:
bytes kept for backward / BP (``aalconvert.memory.measure_saved``: every storage
a saved tensor points to, once, parameters excluded), the peak of one training
step (forward with labels, backward) above what was allocated before it, counted
from the profiler's allocation events, and the step time / BP (median of
``--rounds`` interleaved rounds after a warm-up, one thread).

    python benchmarks/loss_head.py
    python benchmarks/loss_head.py --rounds 3 --json benchmarks/results/loss_head_cpu.json
"""

import argparse
import json
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aalconvert  # noqa: E402
from aalconvert.memory import measure_saved  # noqa: E402

IN_FORWARD = "loss_head, gradients in forward"
RULE_SETS = ["bp", "loss_head", IN_FORWARD, "auto", "auto+approx4"]
SIZES = dict(vocab_size=32000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=4, bos_token_id=0, eos_token_id=0)


def build(rule_set: str, ids: torch.Tensor, small: bool) -> torch.nn.Module:
    import transformers  # a test extra, not a dependency of the library

    torch.manual_seed(0)
    sizes = {**SIZES, "vocab_size": 2000, "num_hidden_layers": 1} if small else SIZES
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**sizes)).train()
    if rule_set == "bp":
        return model
    if rule_set == IN_FORWARD:
        return aalconvert.convert(model, "loss_head", example_inputs=(ids,), loss_head_gradients="forward")
    return aalconvert.convert(model, rule_set.split("+"), example_inputs=(ids,))


def step(model: torch.nn.Module, ids: torch.Tensor) -> None:
    model(ids, labels=ids).loss.backward()
    model.zero_grad(set_to_none=True)


def step_peak_bytes(model: torch.nn.Module, ids: torch.Tensor) -> int:
    """Largest allocation above the step's start, from the profiler's memory events (CPU)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, profile_memory=True) as profile:
        step(model, ids)
    live = peak = 0
    events = [e for e in profile.profiler.kineto_results.events() if e.name() == "[memory]"]
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (median)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--small", action="store_true", help="a tiny model (for tests)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    ids = torch.randint(0, 2000 if args.small else SIZES["vocab_size"], (args.batch, args.tokens),
                        generator=torch.Generator().manual_seed(0))
    models = {name: build(name, ids, args.small) for name in RULE_SETS}
    rows = {name: {"rules": name} for name in RULE_SETS}
    for name, model in models.items():
        rows[name]["kept_bytes"] = measure_saved(lambda m=model: m(ids, labels=ids).loss, model.parameters()).nbytes
        step(model, ids)  # warm-up
        rows[name]["step_peak_bytes"] = step_peak_bytes(model, ids)
    times: dict[str, list[float]] = {name: [] for name in RULE_SETS}
    for _ in range(args.rounds):
        for name, model in models.items():
            start = time.perf_counter()
            step(model, ids)
            times[name].append(time.perf_counter() - start)
    bp = rows["bp"]
    for name, row in rows.items():
        row["kept_ratio"] = row["kept_bytes"] / bp["kept_bytes"]
        row["step_seconds"] = statistics.median(times[name])
        row["step_time_ratio"] = row["step_seconds"] / statistics.median(times["bp"])
        row["peak_drop_bytes"] = bp["step_peak_bytes"] - row["step_peak_bytes"]
    logits_bytes = ids.numel() * (2000 if args.small else SIZES["vocab_size"]) * 4
    table = Table(title=f"Llama 32k loss head, batch {args.batch}x{args.tokens}, fp32, CPU, 1 thread "
                        f"(fp32 logits = {logits_bytes / 2**20:.1f} MiB)")
    for column in ("rules", "kept / BP", "kept MiB", "step peak MiB", "peak drop MiB", "step time / BP"):
        table.add_column(column)
    for row in rows.values():
        table.add_row(row["rules"], f"{row['kept_ratio']:.3f}", f"{row['kept_bytes'] / 2**20:.1f}",
                      f"{row['step_peak_bytes'] / 2**20:.1f}", f"{row['peak_drop_bytes'] / 2**20:.1f}",
                      f"{row['step_time_ratio']:.2f}x")
    Console().print(table)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "command": "python benchmarks/loss_head.py " + " ".join(argv or sys.argv[1:]),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": platform.platform(), "torch": torch.__version__, "logits_bytes": logits_bytes,
            "head_weight_bytes": models["bp"].lm_head.weight.numel() * 4,
            "rows": list(rows.values()),
        }, indent=2))
    return list(rows.values())


if __name__ == "__main__":
    main()

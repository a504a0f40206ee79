"""benchmarks/peers.py: its measurements, verdict and table, on tiny plain-torch and example models.

The real run needs torchvision, timm and transformers (``.zoo-venv``); here the
pure parts run on the project's venv: block finding, the replay of allocation
events, the target verdict, the table, and one small end-to-end measurement.
"""

import json
import random
import statistics

import pytest
import torch
from torch import nn

from benchmark_scripts import load_benchmark
from examples import EXAMPLES


@pytest.fixture(scope="module")
def peers():
    return load_benchmark("peers")


def tiny_workload(peers):
    """Four residual-free MLP blocks in an nn.Sequential, a classifier head, batch 64 (block inputs
    of 4096 elements: large enough for 4-bit copies)."""
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64)) for _ in range(4)]
    model = nn.Sequential(*blocks, nn.Linear(64, 10))
    return peers.vision_workload("tiny", model, (torch.randn(64, 64),))


def test_outermost_blocks_are_the_members_of_sequentials_with_children_and_none_nested(peers):
    assert peers.outermost_blocks(EXAMPLES["vit"].build_model()) == [f"blocks.{i}" for i in range(4)]
    resnet = peers.outermost_blocks(EXAMPLES["resnet_basic"].build_model())
    assert resnet[:2] == ["layer1.0", "layer1.1"] and len(resnet) == 8
    nested = nn.Sequential(nn.Sequential(nn.Sequential(nn.Linear(2, 2)), nn.ReLU()), nn.Linear(2, 2))
    assert peers.outermost_blocks(nested) == ["0"]  # "0.0" is inside it; the head is a leaf
    with pytest.raises(ValueError, match="no blocks"):
        peers.checkpoint_blocks(nn.Linear(2, 2))


def test_checkpointed_copy_gives_backprops_gradients_and_leaves_the_model_alone(peers):
    workload = tiny_workload(peers)
    copy = peers.checkpoint_blocks(workload.model, peers.save_matmuls_context())
    assert "forward" not in workload.model[0].__dict__ and "forward" in copy[0].__dict__
    workload.loss(workload.model).backward()
    workload.loss(copy).backward()
    for p, q in zip(workload.model.parameters(), copy.parameters(), strict=True):
        assert p is not q and torch.allclose(p.grad, q.grad, atol=1e-6)


def row(method, kept, time, ok=True, error=None, spread=0.02, rounds=5):
    """A table row whose ``rounds`` step times (BP's median: 1 s) have median ``time`` and straying ``spread``,
    in an order of their own (seeded by the method): what strays in one method's round is not in another's."""
    if not ok:
        return {"method": method, "note": "", "ok": False, "error": error}
    half = rounds // 2
    times = [time * (1 + spread * (k - half) / max(half, 1) * 2) for k in range(rounds)]
    random.Random(method).shuffle(times)
    return {"method": method, "note": "", "ok": True, "kept_bytes": kept, "kept_ratio": kept / 100,
            "time_ratio": time, "time_spread": spread, "rounds_s": times, "peak_bytes": kept,
            "peak_ratio": kept / 100, "host_bytes": 0}


def test_target_is_met_only_when_the_planner_is_faster_at_the_peak_and_keeps_less_in_the_time(peers):
    at, floor, mid = (f"plan @ {label}" for label in (peers.AT_CHECKPOINT, peers.AT_FLOOR, peers.TOWARD_BP))
    ckpt = row(peers.CHECKPOINT, 20, 1.3)
    met = peers.target_verdict([row("bp", 100, 1.0), ckpt, row(at, 30, 1.1), row(floor, 15, 1.25),
                                row(mid, 60, 1.05)])
    assert met["met"] and met["faster"] and met["keeps_less"] and met["text"].startswith("target met")
    slow = peers.target_verdict([ckpt, row(at, 30, 1.4), row(floor, 15, 1.6)])
    assert not slow["met"] and not slow["faster"] and not slow["keeps_less"]
    assert "NOT faster" in slow["text"] and "no planner row is as fast" in slow["text"]
    more = peers.target_verdict([ckpt, row(at, 30, 1.1)])
    assert more["faster"] and not more["keeps_less"] and "NOT 1% less" in more["text"]
    # refused at the measured peak: missed, even when the planner is faster at its floor
    refused = peers.target_verdict([ckpt, row(at, 0, 0, ok=False, error="BudgetError: under the floor (1 B): x"),
                                    row(floor, 10, 1.1)])
    assert not refused["met"] and not refused["faster"] and refused["keeps_less"]
    assert "(BudgetError: under the floor)" in refused["text"]
    assert f"at {peers.AT_FLOOR} the planner takes 1.10x" in refused["text"]
    assert "did not run" in peers.target_verdict([row(peers.CHECKPOINT, 0, 0, ok=False, error="x")])["text"]


def test_target_does_not_count_differences_within_the_noise(peers):
    at = f"plan @ {peers.AT_CHECKPOINT}"
    ckpt = row(peers.CHECKPOINT, 1000, 1.30, spread=0.05)
    # 3 % faster with rounds straying by 5 %; 0.5 % fewer bytes: neither counts
    close = peers.target_verdict([ckpt, row(at, 995, 1.26, spread=0.01)])
    assert not close["faster"] and not close["keeps_less"] and "within noise" in close["text"]
    # a row 3 % slower is still at checkpointing's step time within that noise, and keeps 10 % less
    later = peers.target_verdict([ckpt, row(at, 900, 1.34, spread=0.01)])
    assert later["keeps_less"] and not later["faster"]
    # the same 8 % gain with rounds straying by 10 %: within noise over 5 rounds, told apart over 41
    few = peers.target_verdict([row(peers.CHECKPOINT, 1000, 1.25, spread=0.1), row(at, 900, 1.15, spread=0.1)])
    many = peers.target_verdict([row(peers.CHECKPOINT, 1000, 1.25, spread=0.1, rounds=41),
                                 row(at, 900, 1.15, spread=0.1, rounds=41)])
    assert not few["faster"] and "within noise" in few["text"] and "5 rounds" in few["text"]
    assert many["faster"] and "41 rounds" in many["text"]


def test_the_ratio_interval_holds_the_median_round_ratio_and_narrows_with_rounds(peers):
    sample = random.Random(1)
    slow = [1.25 * sample.uniform(0.8, 1.2) for _ in range(60)]
    fast = [1.15 * sample.uniform(0.8, 1.2) for _ in range(60)]
    low, high = peers.ratio_interval(fast, slow)
    assert low <= statistics.median(f / s for f, s in zip(fast, slow)) <= high < 1
    low5, high5 = peers.ratio_interval(fast[:5], slow[:5])
    assert high5 - low5 > high - low
    assert peers.ratio_interval(fast, slow) == (low, high)  # seeded: a rendering gives the same verdict
    with pytest.raises(ValueError, match="not paired"):
        peers.ratio_interval(fast, slow[:-1])


def test_the_ratio_interval_cancels_what_slows_both_methods_in_a_round(peers):
    """The machine slowing by up to 40 % for a round hides a 4 % difference from the medians, not from the
    ratio within each round."""
    sample = random.Random(2)
    drift = [sample.uniform(0.6, 1.4) for _ in range(30)]
    slow = [1.25 * d * sample.uniform(0.99, 1.01) for d in drift]
    fast = [1.20 * d * sample.uniform(0.99, 1.01) for d in drift]
    low, high = peers.ratio_interval(fast, slow)
    assert 0.95 < low <= high < 0.97
    each = [statistics.median(sample.choices(fast, k=30)) / statistics.median(sample.choices(slow, k=30))
            for _ in range(500)]
    assert max(each) > 1  # resampling each method's rounds alone: the difference lost in the drift


def test_short_steps_get_more_rounds_up_to_sixty(peers):
    assert peers.rounds_for(2.0, 5, 30.0) == 15
    assert peers.rounds_for(0.25, 5, 30.0) == 60
    assert peers.rounds_for(10.0, 5, 30.0) == 5
    assert peers.rounds_for(0.25, 2, 0.0) == 2


def test_spread_is_the_median_absolute_deviation_over_the_median(peers):
    assert peers.spread([1.0, 1.1, 0.9, 1.0, 3.0]) == pytest.approx(0.1)
    assert peers.spread([2.0]) == 0


def test_planner_budgets_are_checkpointings_peak_steps_to_the_floor_the_floor_and_halfway_to_bp(peers):
    budgets = peers.planner_budgets(parameter_bytes=1000, checkpoint_peak=200, bp_peak=600,
                                    predicted={"bp_peak": 3000, "checkpoint_all": 2000, "floor": 1100})
    assert budgets == dict(zip(peers.BUDGETS, [1200, 1175, 1150, 1125, 1100, 1400]))
    # no floor: neither it nor the steps toward it; a floor above checkpointing's peak: no steps
    assert peers.planner_budgets(1000, 200, 600, {"floor": None}) == {peers.AT_CHECKPOINT: 1200,
                                                                       peers.TOWARD_BP: 1400}
    assert list(peers.planner_budgets(1000, 200, 600, {"floor": 1250})) == [
        peers.AT_CHECKPOINT, peers.AT_FLOOR, peers.TOWARD_BP]


def test_one_small_run_measures_every_peer_and_renders_its_table(peers, tmp_path):
    workload = tiny_workload(peers)
    methods = [peers.BP, peers.CHECKPOINT, peers.CHECKPOINT4, peers.SELECTIVE, peers.SAVE_ON_CPU, "exact"]
    record = peers.measure_workload(workload, methods, rounds=1, log=lambda message: None)
    rows = {r["method"]: r for r in record["rows"]}
    assert set(methods) <= set(rows)
    assert len(rows) == len(methods) + len(record["budgets"]) + len(record["kept_budgets"])
    assert {peers.AT_CHECKPOINT, peers.AT_FLOOR, peers.TOWARD_BP} <= set(record["budgets"])
    kept_plan = rows[f"plan @ {peers.KEPT_AS_CHECKPOINT}"]  # asks for checkpointing's bytes kept, and gets them
    assert record["kept_budgets"] == {peers.KEPT_AS_CHECKPOINT: rows[peers.CHECKPOINT]["kept_bytes"]}
    assert kept_plan["ok"] and kept_plan["plan"]["budget_bytes"] is None
    assert kept_plan["kept_bytes"] <= rows[peers.CHECKPOINT]["kept_bytes"]
    # what the estimate does not see: checkpointing's saved RNG state (5056 bytes on CPU), the loss's scalars
    assert abs(kept_plan["kept_bytes"] - kept_plan["plan"]["predicted_kept_bytes"]) < 8 * 1024
    assert all(rows[m]["ok"] for m in methods), rows
    bp = rows[peers.BP]
    # BP keeps what saved-tensor hooks see, less the inputs and targets (alive before the step),
    # plus the loss and its scalar intermediates
    given = sum(t.nbytes for t in (*workload.inputs, workload.targets))
    assert 0 <= bp["kept_bytes"] + given - bp["saved_hooks_bytes"] < 1024
    assert rows[peers.CHECKPOINT]["kept_bytes"] < rows[peers.SELECTIVE]["kept_bytes"] < bp["kept_bytes"]
    assert rows[peers.CHECKPOINT4]["kept_bytes"] < rows[peers.CHECKPOINT]["kept_bytes"]  # three inputs in 4 bits
    on_cpu = rows[peers.SAVE_ON_CPU]
    assert on_cpu["kept_bytes"] < 1024 and on_cpu["host_bytes"] >= bp["saved_hooks_bytes"]
    assert bp["peak_bytes"] >= sum(p.numel() * 4 for p in workload.model.parameters())  # gradients
    plans = [r for r in record["rows"] if r["method"].startswith("plan @")]
    assert all(r["ok"] or "BudgetError" in r["error"] for r in plans), plans
    assert record["target"]["text"].startswith("target ")
    lines = peers.table(record)
    assert lines[0].startswith("**tiny**") and f"*{record['target']['text']}*" in lines
    assert record["predicted"]["checkpoint_all"] <= record["predicted"]["bp_peak"]
    assert any(line.startswith("Planner's predicted step peaks") for line in lines)
    assert sum(line.startswith("| ") for line in lines) == 2 + len(rows)
    result = {"date": "2026-01-01T00:00:00", "command": "python benchmarks/peers.py", "torch": torch.__version__,
              "machine": "x", "threads": 1, "rounds": 1, "seconds": 1.0, "records": [record]}
    text = peers.markdown(result)
    assert "| save_on_cpu |" in text and "to host:" in text and "| method | tiny: kept / peak / time |" in text
    path = tmp_path / "peers.json"
    path.write_text(json.dumps(result))
    assert peers.render(path)["records"] == json.loads(json.dumps(result["records"]))
    assert path.with_suffix(".md").read_text().startswith("# Peers side by side (2026-01-01, CPU)")

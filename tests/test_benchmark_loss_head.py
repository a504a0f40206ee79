"""benchmarks/loss_head.py: its rows are complete and its figures agree with the loss head's effect.

On a tiny Llama (``--small``). Timing is checked only for being positive; the
figures for issue 12's model live in the benchmark's output and the README.
"""

import json

import pytest

from benchmark_scripts import load_benchmark

pytest.importorskip("transformers")


def test_small_run_shows_the_loss_head_dropping_the_logits(tmp_path):
    out = tmp_path / "loss_head.json"
    rows = load_benchmark("loss_head").main(["--small", "--rounds", "1", "--tokens", "256", "--json", str(out)])
    by_rules = {row["rules"]: row for row in rows}
    assert list(by_rules) == ["bp", "loss_head", "loss_head, gradients in forward", "auto", "auto+approx4"]
    logits_bytes = json.loads(out.read_text())["logits_bytes"]
    assert by_rules["bp"]["kept_ratio"] == 1.0
    # The fp32 log-softmax (the size of the fp32 logits) is no longer kept, nor is it at the step's peak.
    assert by_rules["bp"]["kept_bytes"] - by_rules["loss_head"]["kept_bytes"] >= 0.99 * logits_bytes
    assert by_rules["loss_head"]["peak_drop_bytes"] >= logits_bytes
    assert by_rules["auto+approx4"]["kept_bytes"] < by_rules["auto"]["kept_bytes"] < by_rules["loss_head"]["kept_bytes"]
    # Gradients made in forward: the head's weight gradient is kept instead of being formed in backward,
    # and the step's peak is the backward scheme's, give or take a few per-token vectors.
    in_forward = by_rules["loss_head, gradients in forward"]
    head_gradient_bytes = json.loads(out.read_text())["head_weight_bytes"]
    extra = in_forward["kept_bytes"] - by_rules["loss_head"]["kept_bytes"]
    assert head_gradient_bytes - 16 * 2 * 256 <= extra  # a label and a log-sum-exp per token <= head_gradient_bytes
    assert in_forward["step_peak_bytes"] <= 1.01 * by_rules["loss_head"]["step_peak_bytes"]
    assert all(row["step_seconds"] > 0 for row in rows)

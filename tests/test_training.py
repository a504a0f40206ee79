"""Training examples on real data (examples/train.py, examples/data.py) and benchmarks/fidelity.py.

Every example trains in smoke mode (tiny model, 5 steps) with BP and two rule sets;
the data loaders give the documented shapes and a fixed split; ``exact`` repeats
BP's losses bit for bit under the same seed (dropout on); the learning-indicator
log of an ASA model is positive. No timing figure is checked beyond being positive.
"""

import json
import math
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest
import torch

from examples import EXAMPLES
from examples import data as datasets
from examples.train import TRAIN_CONFIGS, RunResult, main, rule_list, train
from benchmark_scripts import load_benchmark

REPO = Path(__file__).resolve().parents[1]
SMOKE_RULE_SETS = ("auto", "exact+approx4")


@lru_cache(maxsize=None)
def smoke_task(example: str) -> object:
    """One loaded smoke-size task per example, shared by the tests (data loads once)."""
    return TRAIN_CONFIGS[example].make_task(True)


@lru_cache(maxsize=None)
def smoke_run(example: str, rules: str, indicator_every: int = 5) -> RunResult:
    return train(example, rules, smoke=True, seed=3, task=smoke_task(example), indicator_every=indicator_every)


def test_every_example_has_a_training_config():
    assert set(TRAIN_CONFIGS) == set(EXAMPLES)


def test_digits_split_has_documented_shapes_and_is_fixed():
    first = datasets.digits(image_size=16, in_channels=3)
    assert first.train_images.shape == (1437, 3, 16, 16) and first.test_images.shape == (360, 3, 16, 16)
    assert first.train_labels.shape == (1437,) and first.test_labels.dtype == torch.int64
    assert set(first.test_labels.tolist()) == set(range(10))
    assert abs(first.train_images.mean().item()) < 0.05  # standardised with the training statistics
    native, again = datasets.digits(image_size=8, in_channels=1), datasets.digits(image_size=8, in_channels=1)
    assert torch.equal(native.test_images, again.test_images) and torch.equal(native.train_labels, again.train_labels)
    assert torch.equal(native.test_labels, first.test_labels)  # the split does not depend on the size
    train_rows = {tuple(x.flatten().tolist()) for x in native.train_images}
    test_rows = [tuple(x.flatten().tolist()) for x in native.test_images]
    assert sum(row in train_rows for row in test_rows) < 10  # held out (a few digits are pixel-identical)


def test_stdlib_text_is_byte_ids_with_a_fixed_tenth_held_out():
    text, again = datasets.stdlib_text(), datasets.stdlib_text()
    assert text.train.dtype == torch.int64 and text.train.dim() == 1
    assert 0 <= int(text.train.min()) and int(text.train.max()) < datasets.MASK_ID
    assert 0.08 < len(text.validation) / (len(text.train) + len(text.validation)) < 0.12
    assert torch.equal(text.validation, again.validation)
    assert len(text.train) > 100_000  # real text, not a stub


def test_language_model_windows_have_documented_shapes():
    text = datasets.stdlib_text().train
    windows = datasets.random_windows(text, 5, 33, torch.Generator().manual_seed(0))
    assert windows.shape == (5, 33)
    every_window = text.unfold(0, 33, 1)
    assert all((every_window == row).all(1).any() for row in windows)  # consecutive tokens of the text
    assert torch.equal(windows, datasets.random_windows(text, 5, 33, torch.Generator().manual_seed(0)))
    fixed = datasets.consecutive_windows(text, 4, 10)
    assert torch.equal(fixed[1], text[10:20])


def test_mask_tokens_masks_every_row_and_targets_only_masked_positions():
    tokens = torch.arange(40).view(4, 10)
    inputs, targets = datasets.mask_tokens(tokens, 0.0, torch.Generator().manual_seed(0))
    masked = inputs == datasets.MASK_ID
    assert masked.sum(1).tolist() == [1, 1, 1, 1]  # probability 0 still masks one per row
    assert torch.equal(targets[masked], tokens[masked]) and (targets[~masked] == -100).all()
    assert torch.equal(inputs[~masked], tokens[~masked])


def test_reversal_target_is_the_reversed_source_and_decoder_input_is_shifted():
    source, decoder_input, target = datasets.reversal_batch(3, 7, torch.Generator().manual_seed(1))
    assert source.shape == decoder_input.shape == target.shape == (3, 7)
    assert torch.equal(target, source.flip(1))
    assert (decoder_input[:, 0] == datasets.BOS_ID).all() and torch.equal(decoder_input[:, 1:], target[:, :-1])
    assert int(source.min()) >= datasets.DIGIT_OFFSET and int(source.max()) < datasets.SEQ2SEQ_VOCAB


def test_rule_list_parses_plus_joined_names_and_bp():
    assert rule_list("bp") == [] and rule_list("auto+approx4") == ["auto", "approx4"]
    with pytest.raises(ValueError, match="cannot be combined"):
        rule_list("bp+auto")
    with pytest.raises(ValueError, match="empty rule set"):
        rule_list("+")


@pytest.mark.parametrize("example", sorted(EXAMPLES))
def test_every_example_trains_in_smoke_mode_with_bp_and_two_rule_sets(example):
    bp = smoke_run(example, "bp")
    for result in (bp, *(smoke_run(example, rules) for rules in SMOKE_RULE_SETS)):
        assert len(result.losses) == result.steps == 5
        assert all(math.isfinite(loss) for loss in result.losses)
        assert math.isfinite(result.final_metric) and result.curve[-1][1] == result.final_metric
        assert result.kept_bytes > 0 and result.step_time_s > 0
    assert smoke_run(example, "auto").kept_bytes < bp.kept_bytes


@pytest.mark.parametrize("example", sorted(EXAMPLES))
def test_exact_repeats_bp_losses_bit_for_bit_with_dropout_on(example):
    bp, exact = smoke_run(example, "bp"), smoke_run(example, "exact")
    assert exact.losses == bp.losses
    assert exact.curve == bp.curve


def test_same_seed_repeats_a_run_and_another_seed_does_not():
    task = smoke_task("gpt")
    first, again = train("gpt", "auto", smoke=True, seed=3, task=task), smoke_run("gpt", "auto")
    other = train("gpt", "auto", smoke=True, seed=4, task=task)
    assert first.losses == again.losses and first.losses != other.losses


def test_asa_learning_indicator_log_is_positive_for_every_layer_and_interval():
    result = smoke_run("vit", "asa", indicator_every=1)
    assert result.auxiliary_layers > 0
    assert len(result.indicators) == 5  # smoke: one logging interval per step
    for interval in result.indicators:
        assert len(interval["layers"]) == result.auxiliary_layers
        for values in interval["layers"].values():
            assert 0 < values["min"] <= values["mean"] <= 1
    assert result.min_indicator > 0


def test_plain_bp_logs_no_learning_indicator():
    result = smoke_run("vit", "bp")
    assert result.auxiliary_layers == 0 and result.indicators == [] and result.min_indicator is None


def test_command_line_compares_with_bp_and_writes_json(tmp_path, capsys):
    out = tmp_path / "runs.json"
    main(["transformer", "--rules", "auto", "--smoke", "--compare-bp", "--json", str(out)])
    printed = capsys.readouterr().out
    assert "auto / bp: forward kept" in printed and "token accuracy (%)" in printed
    records = json.loads(out.read_text())
    assert [r["rules"] for r in records] == ["auto", "bp"]
    assert records[0]["kept_bytes"] < records[1]["kept_bytes"]


def load_fidelity():
    return load_benchmark("fidelity")


def test_fidelity_quick_writes_table_and_json_with_exact_meeting_its_target(tmp_path):
    fidelity = load_fidelity()
    prefix = tmp_path / "fidelity"
    rows = fidelity.main(["--quick", "--examples", "resnet_basic", "--rules", "exact,ara,asa",
                          "--steps", "4", "--out", str(prefix)])
    by_rules = {row["rules"]: row for row in rows}
    assert by_rules["bp"]["kept_ratio"] == 1.0
    assert by_rules["exact"]["identical_to_bp"] and by_rules["exact"]["target"] == "met"
    assert by_rules["ara"]["min_indicator"] is not None
    assert by_rules["asa"]["skipped"] == "no ASA layer"  # ASA leaves ResNet's convolutions alone
    table = prefix.with_suffix(".md").read_text()
    assert "| resnet_basic | test accuracy (%) | exact |" in table
    assert len(json.loads(prefix.with_suffix(".json").read_text())["runs"]) == 3


def test_fidelity_merge_rebuilds_one_table_from_parts_run_apart(tmp_path):
    fidelity = load_fidelity()
    part = lambda example: ["--quick", "--examples", example, "--rules", "exact,asa", "--steps", "3",
                            "--out", str(tmp_path / example)]  # fmt: skip
    rows = fidelity.main(part("resnet_basic")) + fidelity.main(part("gpt"))
    merged = fidelity.main(["--merge", str(tmp_path / "resnet_basic.json"), str(tmp_path / "gpt.json"),
                            "--out", str(tmp_path / "merged")])
    assert json.dumps(merged) == json.dumps(rows)  # skipped rows (ASA on the ResNet) included; NaN-safe
    table = (tmp_path / "merged.md").read_text()
    assert "| resnet_basic | | asa | n/a (no ASA layer) |" in table and "| gpt | validation loss" in table
    with pytest.raises(SystemExit):  # training options do not apply to runs already made
        fidelity.main(["--merge", str(tmp_path / "gpt.json"), "--seeds", "2", "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="appear in more than one file"):
        fidelity.main(["--merge", str(tmp_path / "gpt.json"), str(tmp_path / "merged.json"),
                       "--out", str(tmp_path / "again")])


def test_training_command_line_runs_an_example_next_to_bp():
    done = subprocess.run(
        [sys.executable, "-m", "examples.train", "resnet_bottleneck", "--smoke", "--rules", "exact",
         "--steps", "2", "--compare-bp"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "Warning" not in done.stderr, done.stderr
    assert "resnet_bottleneck [exact] seed 0:" in done.stdout and "resnet_bottleneck [bp] seed 0:" in done.stdout
    assert "exact / bp: forward kept" in done.stdout

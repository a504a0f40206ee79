"""benchmarks/fidelity.py's statistics: the t distribution, paired gaps, verdicts, steps to BP's level.

Known inputs only (the t values are scipy's, to 1e-9); no training, well under a second.
"""

import math

import pytest

from examples.train import TRAIN_CONFIGS, RunResult
from benchmark_scripts import load_benchmark

fidelity = load_benchmark("fidelity")


@pytest.mark.parametrize("t, df, expected", [(2.0, 3, 0.9303370157205785), (-1.3, 5, 0.12515031708533855),
                                             (0.0, 2, 0.5), (4.2, 1, 0.9255972347013828),
                                             (1.5, 30, 0.927967035435677)])
def test_t_cdf_matches_scipy(t, df, expected):
    assert fidelity.t_cdf(t, df) == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("df, expected", [(2, 4.302652729749462), (4, 2.7764451051977934), (9, 2.262157162798205)])
def test_t_quantile_is_the_two_sided_95_percent_critical_value(df, expected):
    assert fidelity.t_quantile(0.975, df) == pytest.approx(expected, abs=1e-9)


def test_t_interval_of_three_values_and_of_one():
    mean, low, high = fidelity.t_interval([1.0, 2.0, 3.0])
    assert mean == 2.0
    assert high - mean == pytest.approx(4.302652729749462 / math.sqrt(3), abs=1e-9)  # sd 1, n 3
    assert mean - low == pytest.approx(high - mean)
    assert fidelity.t_interval([5.0])[1:] == (-math.inf, math.inf)  # one seed: no spread known


def test_confidence_at_most_one_sided_t_and_degenerate_cases():
    # mean 2, standard error 1/sqrt(3): threshold 3 sits sqrt(3) standard errors above the mean
    assert fidelity.confidence_at_most([1.0, 2.0, 3.0], 3.0) == pytest.approx(fidelity.t_cdf(math.sqrt(3), 2))
    assert fidelity.confidence_at_most([0.0, 0.0], 1.0) == 1.0
    assert fidelity.confidence_at_most([2.0, 2.0], 1.0) == 0.0
    assert fidelity.confidence_at_most([0.5], 1.0) is None


def test_gap_verdict_met_missed_undecided():
    assert fidelity.gap_verdict([0.1, 0.2, 0.0, 0.1], 1.0, "points").startswith("met")
    assert fidelity.gap_verdict([3.0, 3.2, 2.9, 3.1], 1.0, "points").startswith("missed")
    assert fidelity.gap_verdict([-2.0, 3.0, 1.0], 1.0, "points").startswith("undecided")
    assert fidelity.gap_verdict([0.0], 1.0, "points").startswith("undecided (1 seed")


def test_shortfall_is_points_below_or_percent_of_loss_above_bp():
    assert fidelity.shortfall(97.0, 98.5, higher_is_better=True) == pytest.approx(1.5)
    assert fidelity.shortfall(2.2, 2.0, higher_is_better=False) == pytest.approx(10.0)
    assert fidelity.shortfall(1.9, 2.0, higher_is_better=False) == pytest.approx(-5.0)


def test_steps_to_reach_first_evaluation_at_or_past_the_level():
    curve = [(100, 50.0), (200, 90.0), (300, 99.6), (400, 99.4)]
    level = fidelity.reach_level(100.0, higher_is_better=True)  # 0.5 points below BP's final
    assert level == 99.5
    assert fidelity.steps_to_reach(curve, level, True) == 300
    assert fidelity.steps_to_reach(curve, 99.9, True) is None
    losses = [(10, 3.0), (20, 2.015), (30, 2.0)]
    assert fidelity.steps_to_reach(losses, fidelity.reach_level(2.0, higher_is_better=False), False) == 20


def test_plateau_change_over_the_last_quarter_of_steps():
    curve = [(step, value) for step, value in zip(range(100, 1100, 100), [10, 20, 40, 60, 80, 90, 95, 97, 98, 98.5])]
    assert fidelity.plateau_change(curve) == pytest.approx(98.5 - 97)  # from step 800 (75 % of 1000) to the end


def test_target_for_a_combination_is_the_tightest_of_its_lossy_parts_that_apply():
    assert fidelity.target_for("transformer", "asa") == (2.0, 0.03)
    assert fidelity.target_for("resnet_bottleneck", "ara") == (1.0, None)
    assert fidelity.target_for("resnet_basic", "ara+exact") == (1.0, None)
    assert fidelity.target_for("transformer", "auto") == (2.0, 0.03)  # ASA only: ARA finds no residual chain
    assert fidelity.target_for("transformer", "auto+approx4") == (0.5, 0.01)
    assert fidelity.target_for("transformer", "bp") is None


def _run(rules: str, seed: int, final: float, curve: list) -> RunResult:
    return RunResult("resnet_basic", rules, seed, 400, 8, "cpu", "test accuracy (%)", True, final, 100, 0.01, 0,
                     curve=curve, losses=[float(seed)])


def test_summarise_pairs_each_seed_with_its_own_bp_run():
    runs = [_run("bp", 0, 98.0, [(200, 90.0), (400, 98.0)]), _run("bp", 1, 96.0, [(200, 96.0), (400, 96.0)]),
            _run("ara", 0, 97.0, [(200, 80.0), (400, 97.0)]), _run("ara", 1, 96.5, [(200, 95.0), (400, 96.5)])]
    rows = {row["rules"]: row for row in fidelity.summarise(runs, {})}
    assert rows["ara"]["gaps"] == [1.0, -0.5]
    # levels 97.5 and 95.5: seed 0 never gets there, seed 1 at step 400 where its BP took 200
    assert rows["ara"]["steps_to_bp_final"] == [None, 400] and rows["ara"]["bp_steps_to_bp_final"] == [400, 200]
    assert rows["ara"]["reach_ratio"] == 2.0 and rows["ara"]["not_reached"] == 1
    assert rows["bp"]["plateau_change"] == 0.0  # only the final evaluation lies in the last quarter
    with pytest.raises(SystemExit, match="no BP run to pair with"):
        fidelity.summarise(runs + [_run("ara", 2, 90.0, [(400, 90.0)])], {})


def test_converged_mode_uses_each_examples_measured_length_and_refuses_an_unmeasured_one():
    assert fidelity.run_length("transformer", converged=True) == TRAIN_CONFIGS["transformer"].converged_steps > 400
    assert fidelity.run_length("transformer", converged=False) is None  # the short default
    with pytest.raises(SystemExit, match="no converged run length measured for 'gpt'"):
        fidelity.main(["--converged", "--examples", "gpt", "--out", "/tmp/never-written"])


def test_end_level_averages_the_evaluations_of_the_last_quarter():
    curve = [(step, value) for step, value in zip(range(100, 900, 100), [10, 50, 80, 90, 94, 95, 93, 95])]
    assert fidelity.end_level(curve) == pytest.approx((95 + 93 + 95) / 3)  # steps 600..800 of 800
    assert fidelity.end_level(curve, tail=0.0) == 95  # the final evaluation alone


def test_seeds_for_half_width_is_the_smallest_n_whose_t_interval_fits():
    n = fidelity.seeds_for_half_width(1.5, 1.0)
    half = lambda k: fidelity.t_quantile(0.975, k - 1) * 1.5 / math.sqrt(k)  # noqa: E731
    assert half(n) <= 1.0 < half(n - 1)
    assert fidelity.seeds_for_half_width(0.0, 1.0) == 2

"""benchmarks/memory.py: its bytes agree with an independent measurement, its rows are complete,
its batch search finds the boundary, and bad arguments are refused.

Timing figures are checked only for being positive (speed claims live in the
benchmark's output, not in tests). The CUDA paths (step peak, the cap search
under ``set_per_process_memory_fraction``) need a GPU and are not run here;
the search itself is checked on plain predicates.
"""

import json

import pytest
import torch

import aalconvert
from aalconvert.memory import measure_saved
from examples import EXAMPLES
from benchmark_scripts import load_benchmark



@pytest.fixture(scope="module")
def memory_script():
    return load_benchmark("memory")


def test_rows_cover_every_example_batch_and_rule_with_measured_bytes(memory_script, tmp_path):
    out = tmp_path / "memory.json"
    result = memory_script.main(["--batch", "2,3", "--examples", "resnet_basic,gpt",
                                 "--rules", "exact,approx4", "--rounds", "1", "--json", str(out)])
    assert json.loads(out.read_text())["rows"] == result["rows"]
    assert result["malloc"].startswith("glibc malloc keeping freed memory")  # Linux: the timing setting is said
    rows = {(r["example"], r["batch"], r["rules"]): r for r in result["rows"]}
    assert set(rows) == {(e, b, r) for e in ("resnet_basic", "gpt") for b in (2, 3) for r in ("exact", "approx4")}
    for row in rows.values():
        assert row["step_s"] > 0 and row["bp_step_s"] > 0
        assert row["step_ratio"] == pytest.approx(row["step_s"] / row["bp_step_s"])
        assert row["ratio"] == pytest.approx(row["converted_bytes"] / row["bp_bytes"])

    # The same bytes, measured here without the script: BP and approx4 on GPT at batch 3.
    torch.manual_seed(0)
    inputs = EXAMPLES["gpt"].example_inputs(3)
    for rules, expected_key in ((None, "bp_bytes"), (["approx4"], "converted_bytes")):
        torch.manual_seed(0)
        model = EXAMPLES["gpt"].build_model()
        if rules:
            model = aalconvert.convert(model, rules, example_inputs=inputs)
        model.train()
        kept = measure_saved(lambda: model(*inputs), model.parameters()).nbytes
        assert rows[("gpt", 3, "approx4")][expected_key] == kept
    assert rows[("gpt", 3, "approx4")]["ratio"] < 0.2


@pytest.mark.parametrize("boundary", [1, 2, 3, 37, 64, 1000])
def test_largest_fitting_finds_the_boundary(memory_script, boundary):
    calls = []

    def fits(n):
        calls.append(n)
        return n <= boundary

    assert memory_script.largest_fitting(fits, limit=4096) == boundary
    assert len(calls) <= 2 * 12 + 2  # doubling then bisecting: logarithmic in the boundary


def test_largest_fitting_edges(memory_script):
    assert memory_script.largest_fitting(lambda n: False) == 0
    assert memory_script.largest_fitting(lambda n: True, limit=100) == 100


@pytest.mark.parametrize("argv, message", [
    (["--batch", "0"], "at least 1"),
    (["--batch", "a,b"], "comma-separated positive integers"),
    (["--rules", "nope"], "unknown example or rule set"),
    (["--cap-gib", "2"], "needs --device cuda"),
])
def test_bad_arguments_are_refused_with_the_reason(memory_script, capsys, argv, message):
    with pytest.raises(SystemExit):
        memory_script.main(argv)
    assert message in capsys.readouterr().err

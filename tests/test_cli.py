"""`aalconvert inspect`, run as the real console script in a subprocess on the bundled examples."""

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import aalconvert
from aalconvert.cli import CommandError, main
from examples import resnet

REPO = Path(__file__).resolve().parents[1]
CONSOLE_SCRIPT = str(Path(sys.executable).with_name("aalconvert"))


def run(*args: str, cwd: Path = REPO, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    # --max-batch runs some 60 fake-tensor estimates: 100-140 s alone on a 2-core AVX2 machine, more beside
    # the other test worker
    return subprocess.run([CONSOLE_SCRIPT, "inspect", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=360, env=None if env is None else {**os.environ, **env})


def test_table_names_the_biggest_saving_module_first():
    result = run("examples/resnet.py", "--top", "3", "--batch-size", "2")
    assert result.returncode == 0, result.stderr
    expected = aalconvert.inspect(resnet.build_model(), resnet.example_inputs(batch_size=2)).rows[0]
    first_row = next(line for line in result.stdout.splitlines() if line.startswith("│"))
    assert first_row.split("│")[1].strip() == expected.name
    assert "predicted peak, converted" in result.stdout and "more rows not shown" in result.stdout


def test_json_is_pure_json_on_stdout_and_embedding_inputs_are_token_ids():
    result = run("examples/gpt.py", "--format", "json", "--input-shape", "2,16", "--optimizer", "adamw",
                 "--rules", "exact")
    assert result.returncode == 0, result.stderr
    assert "random token ids in [0, 512)" in result.stderr
    data = json.loads(result.stdout)
    assert set(data) == {"model", "rules", "estimated_on", "notes", "totals", "rows", "untraced"}
    assert data["rules"] == ["exact"] and data["estimated_on"] == "fake tensors"
    totals = data["totals"]
    assert totals["optimizer"] == "adamw"
    assert totals["optimizer_state_bytes"] == 2 * totals["gradient_bytes"] > 0
    assert 0 < totals["converted_bytes"] < totals["bp_bytes"]
    assert sum(row["bytes_bp"] for row in data["rows"]) == totals["bp_bytes"]
    types = {"name": str, "op": str, "output_shape": (list, type(None)), "dtype": (str, type(None)),
             "bytes_bp": int, "bytes_converted": int, "bytes_saved": int, "rule": str, "explanation": str}
    for row in data["rows"]:
        assert set(row) == set(types)
        assert all(isinstance(row[key], kind) for key, kind in types.items()), row
    assert max(row["output_shape"] or [0] for row in data["rows"])[0] == 2  # the batch from --input-shape


def test_package_module_callable_target_with_csv_written_to_a_file(tmp_path):
    output = tmp_path / "report.csv"
    result = run("examples.mixer:build_model", "--format", "csv", "--output", str(output),
                 "--dtype", "bf16", "--batch-size", "2", env={"COLUMNS": "40"})
    assert result.returncode == 0, result.stderr
    assert result.stdout == "" and f"wrote {output}" in result.stderr  # the path unbroken on a narrow terminal
    records = list(csv.DictReader(io.StringIO(output.read_text())))
    assert records and {r["dtype"] for r in records if r["dtype"]} == {"bf16"}
    assert all(int(r["bytes_bp"]) - int(r["bytes_converted"]) == int(r["bytes_saved"]) for r in records)


@pytest.mark.parametrize("args, code, message", [
    (["missing.py"], 1, "no such file: missing.py"),
    (["{dir}/raises.py"], 1, "raises.py raised ZeroDivisionError: division by zero"),
    (["{dir}/nomodel.py"], 1, "no model found in"),
    (["examples/resnet.py", "--input-shape", "8,x,3"], 2, "bad --input-shape '8,x,3'"),
    (["examples/resnet.py", "--rules", "fastest"], 2, "unknown rule fastest"),
    (["{dir}/noshape.py"], 2, "pass --input-shape"),
])
def test_errors_exit_nonzero_with_one_clear_line(tmp_path, args, code, message):
    (tmp_path / "raises.py").write_text("x = 1 / 0\n")
    (tmp_path / "nomodel.py").write_text("answer = 42\n")
    (tmp_path / "noshape.py").write_text("from torch import nn\nmodel = nn.Linear(4, 4)\n")
    result = run(*(arg.format(dir=tmp_path) for arg in args))
    assert result.returncode == code
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_debug_lets_the_original_exception_through(tmp_path):
    (tmp_path / "raises.py").write_text("x = 1 / 0\n")
    with pytest.raises(CommandError, match="ZeroDivisionError") as caught:
        main(["inspect", str(tmp_path / "raises.py"), "--debug"])
    assert isinstance(caught.value.__cause__, ZeroDivisionError)


def test_budget_prints_the_plan_with_why_and_the_peaks():
    result = run("examples/vit.py", "--budget", "12MiB", "--optimizer", "adamw")
    assert result.returncode == 0, result.stderr
    assert "plan for a budget of 12.0 MiB" in result.stdout and "needed to fit:" in result.stdout
    for line in ("predicted peak, BP", "predicted peak, planned", "floor (least budget any plan fits)"):
        assert line in result.stdout


def test_budget_json_is_a_plan_that_fits():
    result = run("examples/gpt.py", "--budget", "3MiB", "--format", "json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["fits"] and data["peak_bytes"] <= data["usable_bytes"] < data["budget_bytes"] == 3 * 2**20
    assert data["floor_bytes"] <= data["budget_bytes"] and data["peak_bytes"] < data["peak_bp_bytes"]
    assert data["decisions"] and all(choice["why"].startswith("needed to fit") for choice in data["choices"])


def test_budget_under_the_floor_is_an_error_naming_the_floor_and_a_batch():
    result = run("examples/gpt.py", "--budget", "2MiB")
    assert result.returncode == 1 and result.stdout == ""
    assert "under the floor of" in result.stderr and "largest batch that would fit is about" in result.stderr


@pytest.mark.parametrize("written, taken", [("0.25", 0.25), ("25%", "25%"), ("4096", "4096"), ("2MiB", "2MiB")])
def test_a_kept_budget_with_a_point_is_a_share_and_without_one_bytes_or_a_size(written, taken):
    from aalconvert.cli import build_parser
    from aalconvert.cli_budget import check_budget_flags

    args = build_parser().parse_args(["inspect", "examples/gpt.py", "--kept-budget", written])
    check_budget_flags(args)
    assert args.kept_budget == taken and type(args.kept_budget) is type(taken)


def test_kept_budget_plans_to_keep_under_a_share_of_bp_with_no_step_budget():
    result = run("examples/gpt.py", "--kept-budget", "25%", "--format", "json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["budget_bytes"] is None and data["kept_budget_bytes"] == data["kept_bp_bytes"] // 4
    assert data["fits"] and data["kept_bytes"] <= data["kept_budget_bytes"]
    assert any("kept over the kept budget" in choice["why"] for choice in data["choices"])


def test_kept_budget_beside_a_budget_prints_both_and_what_is_left_under_each():
    result = run("examples/vit.py", "--budget", "12MiB", "--kept-budget", "2MiB", "--optimizer", "adamw")
    assert result.returncode == 0, result.stderr
    assert "plan for a budget of 12.0 MiB and a kept budget of 2.0 MiB" in result.stdout
    assert "left under the kept budget" in result.stdout and "left under the budget less" in result.stdout


@pytest.mark.parametrize("args, message", [
    (("--kept-budget", "150%"), r"--kept-budget: a kept budget given as a fraction of what BP keeps must be in"),
    (("--kept-budget", "1.5"), "must be in (0, 1]"),
    (("--kept-budget", "2MiB", "--max-batch", "--memory", "1GiB"), "pass one of them"),
    (("--kept-budget", "25%", "--rules", "exact"), "leave --rules out"),
    (("--budget", "12 parsecs"), "bad memory size '12 parsecs'"),
    (("--max-batch",), "--max-batch needs --memory"),
    (("--memory", "1GiB"), "add --max-batch"),
    (("--budget", "1GiB", "--max-batch", "--memory", "1GiB"), "pass one of them"),
    (("--budget", "1GiB", "--format", "csv"), "table or JSON"),
])
def test_bad_budget_command_lines_exit_2_before_loading(args, message):
    result = run("examples/does_not_exist.py", *args)
    assert result.returncode == 2 and message in result.stderr


def test_max_batch_json_lists_every_rule_set_with_a_batch_that_fits():
    result = run("examples/gpt.py", "--max-batch", "--memory", "16MiB", "--format", "json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert [row["rules"] for row in data["rule_sets"]] == ["bp", "exact", "auto", "auto+approx8",
                                                           "auto+approx4"]
    batches = [row["largest_batch"] for row in data["rule_sets"]]
    assert 0 < batches[0] <= batches[-1] and batches == sorted(batches)
    assert all(row["peak_bytes"] <= data["memory_bytes"] for row in data["rule_sets"])


def test_max_batch_table_names_each_rule_set():
    result = run("examples/resnet.py", "--max-batch", "--memory", "64MiB", "--optimizer", "sgd_momentum")
    assert result.returncode == 0, result.stderr
    assert "largest batch whose predicted training-step peak fits 64.0 MiB" in result.stdout
    assert all(f"  {rules} " in result.stdout for rules in ("bp", "exact", "auto", "auto+approx4"))

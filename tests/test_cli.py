"""`aalconvert inspect`, run as the real console script in a subprocess on the bundled examples."""

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

import aalconvert
from aalconvert.cli import CommandError, main
from examples import resnet

REPO = Path(__file__).resolve().parents[1]
CONSOLE_SCRIPT = str(Path(sys.executable).with_name("aalconvert"))


def run(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([CONSOLE_SCRIPT, "inspect", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=120)


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
                 "--dtype", "bf16", "--batch-size", "2")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "" and f"wrote {output}" in result.stderr
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

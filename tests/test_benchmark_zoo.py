"""benchmarks/zoo.py: Hugging Face models' kept bytes, converted / BP, agree with a direct measurement."""

import json

import pytest
import torch

import aalconvert
from benchmark_scripts import load_benchmark



@pytest.fixture(scope="module")
def zoo_script():
    return load_benchmark("zoo")


def test_gpt2_rows_match_a_direct_measurement(zoo_script, tmp_path):
    out = tmp_path / "zoo.json"
    result = zoo_script.main(["--models", "gpt2", "--rules", "exact,recompute", "--json", str(out)])
    assert json.loads(out.read_text())["rows"] == result["rows"]
    rows = {r["rules"]: r for r in result["rows"]}
    torch.manual_seed(0)
    model, inputs = zoo_script._models()["gpt2"]()
    converted = aalconvert.convert(model, ["recompute"], example_inputs=inputs)
    assert rows["recompute"]["converted_bytes"] == zoo_script.kept_bytes(converted, inputs)
    # NewGELUActivation keeps its input only: recompute saves more than the exact masks alone.
    assert rows["recompute"]["ratio"] < rows["exact"]["ratio"] < 1


def test_unknown_model_is_refused(zoo_script, capsys):
    with pytest.raises(SystemExit):
        zoo_script.main(["--models", "t5"])
    assert "unknown models ['t5']" in capsys.readouterr().err

"""benchmarks/zoo.py: its smoke path runs where only transformers is installed, and its checks can fail.

The full zoo (torchvision, timm, Hugging Face) runs in its own venv
(``python benchmarks/zoo.py --setup``), outside CI; here the Hugging Face part
of ``--quick`` runs on the project's own venv.
"""

import json
import math

import pytest
import torch

import aalconvert
from benchmark_scripts import load_benchmark


@pytest.fixture(scope="module")
def zoo_script():
    return load_benchmark("zoo")


@pytest.fixture(scope="module")
def quick_run(zoo_script, tmp_path_factory):
    out = tmp_path_factory.mktemp("zoo") / "zoo.json"
    result = zoo_script.main(["--quick", "--family", "hf", "--models", "gpt2,llama",
                              "--rules", "exact,recompute,approx4", "--json", str(out)])
    return result, out


def test_quick_run_writes_its_records_and_keeps_every_promise(zoo_script, quick_run):
    result, out = quick_run
    assert json.loads(out.read_text())["records"] == json.loads(json.dumps(result["records"]))
    assert [r["model"] for r in result["records"]] == ["hf/gpt2", "hf/llama"]
    for record in result["records"]:
        assert record["status"] == "ok" and record["bp_bytes"] > 0
        rows = {row["rules"]: row for row in record["rows"]}
        assert all(row["status"] == "ok" and row["grads_finite"] for row in rows.values()), record
        for rules in ("exact", "recompute"):  # forward- and gradient-exact: bit for bit
            assert rows[rules]["forward_promised"] and rows[rules]["gradient_promised"]
            assert rows[rules]["forward_equal"] and rows[rules]["grads_equal"], (record["model"], rules)
        # language models train on their own loss (labels=), which approx4's loss head sums per chunk
        assert record["labels"] and not rows["approx4"]["forward_promised"]
        assert not rows["approx4"]["gradient_promised"]
        assert rows["approx4"]["forward_max_abs_diff"] < 1e-5
        assert 0.99 < rows["approx4"]["grad_cosine"] <= 1 + 1e-9
        assert rows["approx4"]["ratio"] < rows["exact"]["ratio"] <= 1.0
    found = zoo_script.summary(result)
    assert found["failures"] == [] and found["gradient_mismatches"] == [] and found["above_bp"] == []


def test_gpt2_recompute_bytes_match_a_direct_measurement(zoo_script, quick_run):
    result, _ = quick_run
    row = next(r for r in result["records"][0]["rows"] if r["rules"] == "recompute")
    torch.manual_seed(0)
    model, inputs = zoo_script.hf_build("gpt2")
    params = [p for p in model.parameters() if p.requires_grad]
    converted = aalconvert.convert(model, ["recompute"], example_inputs=inputs)
    keywords = zoo_script.training_keywords(model, inputs)
    assert keywords["labels"] is inputs[0]
    assert row["converted_bytes"] == zoo_script.run_step(converted, inputs, params, keywords).nbytes
    # NewGELUActivation keeps its input only: recompute saves more than the exact masks alone.
    exact = next(r for r in result["records"][0]["rows"] if r["rules"] == "exact")
    assert row["ratio"] < exact["ratio"] < 1


def test_compare_flags_a_changed_gradient_and_a_non_finite_one(zoo_script):
    grads = [torch.ones(3), None]
    bp = zoo_script.Step(8, [torch.zeros(2)], grads, 1.0)
    same = zoo_script.compare(bp, zoo_script.Step(8, [torch.zeros(2)], [torch.ones(3), None], 1.0))
    assert same["grads_equal"] and same["forward_equal"] and same["grads_finite"]
    assert same["grad_cosine"] == pytest.approx(1.0)
    nudged = zoo_script.compare(bp, zoo_script.Step(8, [torch.full((2,), 1e-7)],
                                                    [torch.tensor([1.0, 1.0, 1.0 + 2**-20]), None], 1.0))
    assert not nudged["grads_equal"] and not nudged["forward_equal"] and nudged["grads_finite"]
    broken = zoo_script.compare(bp, zoo_script.Step(8, [torch.zeros(2)], [torch.tensor([1.0, math.inf, 1.0]),
                                                                            torch.ones(1)], 1.0))
    assert not broken["grads_finite"] and broken["grads_missing"] == 1 and not broken["grads_equal"]


def _row(rules, ratio, **extra):
    return {"rules": rules, "status": "ok", "ratio": ratio, "forward_promised": rules == "exact",
            "gradient_promised": rules == "exact", "forward_equal": True, "grads_equal": True,
            "grads_finite": True, "grad_cosine": 1.0, "step_time_ratio": 1.0, **extra}


def test_summary_markdown_and_readme_name_every_problem(zoo_script, tmp_path):
    result = {"date": "2026-01-01T00:00:00", "command": "python benchmarks/zoo.py", "machine": "x86_64",
              "threads": 1, "versions": {"torch": "2"}, "rule_sets": ["exact", "auto"], "seconds": 60.0,
              "not_run": ["timm: not importable here"],
              "records": [
                  {"model": "hf/a", "source": "hf", "family": "a", "status": "ok", "bp_bytes": 2**20,
                   "inputs": [[2, 32]],
                   "rows": [_row("exact", 1.0, grads_equal=False, grad_cosine=0.5), _row("auto", 1.25)]},
                  {"model": "hf/b", "source": "hf", "family": "b", "status": "ok", "bp_bytes": 2**20,
                   "inputs": [[2, 32]],
                   "rows": [_row("exact", 0.5),
                            {"rules": "auto", "status": "convert_error", "error": "ConversionError: boom"}]},
                  {"model": "hf/c", "source": "hf", "family": "c", "status": "skipped", "rows": [],
                   "error": "BP run failed: RuntimeError: too small"}]}
    found = zoo_script.summary(result)
    assert found["medians"] == {"exact": 0.75, "auto": 1.25}
    assert found["failures"] == ["hf/b [auto]: convert_error: ConversionError: boom"]
    assert found["above_bp"] == ["hf/a [auto]: 1.2500"]
    assert found["gradient_mismatches"] == ["hf/a [exact]: gradient cosine 0.500000"]
    assert found["skipped"] == ["hf/c: BP run failed: RuntimeError: too small"]
    text = zoo_script.markdown(result)
    assert "1.000 ≠grad" in text and "| fails |" in text and "timm: not importable here" in text

    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{zoo_script.README_START}\nold table\n{zoo_script.README_END}\nafter\n")
    zoo_script.update_readme(result, zoo_script.ROOT / "benchmarks" / "results" / "zoo_x.md", readme)
    new = readme.read_text()
    assert new.startswith("intro\n") and new.endswith(f"{zoo_script.README_END}\nafter\n")
    assert "old table" not in new and "| hf/a | 1 | 1.000 | 1.250 |" in new
    assert "| hf/b | 1 | 0.500 | - (1 fail) |" in new


def test_missing_libraries_are_reported_not_dropped(zoo_script, monkeypatch):
    def missing():
        raise ImportError("No module named 'timm'")

    monkeypatch.setattr(zoo_script, "timm_entries", missing)
    entries, notes = zoo_script.zoo()
    assert any(note.startswith("timm: not importable here") for note in notes)
    assert {e.name for e in entries} >= {f"hf/{name}" for name in zoo_script.HF_ARCHITECTURES}
    assert len(zoo_script.HF_ARCHITECTURES) >= 12


def test_unknown_model_is_refused(zoo_script, capsys):
    with pytest.raises(SystemExit):
        zoo_script.main(["--models", "not_a_model"])
    assert "unknown models ['not_a_model']" in capsys.readouterr().err


def test_vision_bytes_are_measured_at_224_px_and_the_step_at_its_own_size(zoo_script):
    entry = next(e for e in zoo_script.hf_entries() if e.name == "hf/vit")
    record = zoo_script.measure_model(entry, ["exact", "approx4"])
    assert record["inputs"] == [[2, 3, 32, 32]] and record["memory_inputs"] == [[2, 3, 224, 224]]
    rows = {row["rules"]: row for row in record["rows"]}
    assert all("memory_error" not in row for row in rows.values())
    assert rows["approx4"]["ratio"] < rows["exact"]["ratio"] <= 1.0
    torch.manual_seed(0)
    model, inputs = entry.build_for_memory()
    params = list(model.parameters())

    def kept(module):
        module.train()
        torch.manual_seed(1)
        return aalconvert.memory.measure_saved(lambda: module(*inputs), params).nbytes

    converted = aalconvert.convert(model, ["approx4"], example_inputs=inputs)
    assert rows["approx4"]["ratio"] == kept(converted) / kept(model)
    assert rows["approx4"]["ratio_step"] != rows["approx4"]["ratio"]  # two sizes, two measurements


def test_a_failure_at_the_memory_size_and_a_step_above_bp_are_named(zoo_script):
    result = {"rule_sets": ["exact"], "records": [
        {"model": "hf/a", "source": "hf", "family": "a", "status": "ok", "bp_bytes": 1,
         "rows": [_row("exact", 0.5, memory_error="RuntimeError: out of memory")]},
        {"model": "hf/b", "source": "hf", "family": "b", "status": "ok", "bp_bytes": 1,
         "rows": [_row("exact", 0.9, ratio_step=1.01)]}]}
    found = zoo_script.summary(result)
    assert found["medians"] == {"exact": 0.9}  # the failed row is left out
    assert found["failures"] == ["hf/a [exact]: at the memory size: RuntimeError: out of memory"]
    assert found["above_bp"] == ["hf/b [exact]: 1.0100 at the step size"]


def test_the_family_table_gives_the_transformer_median_over_the_transformer_families(zoo_script):
    def record(source, family, ratio):
        return {"model": f"{source}/{family}", "source": source, "family": family, "status": "ok",
                "rows": [{"rules": "auto", "status": "ok", "ratio": ratio, "gradient_promised": False,
                          "forward_promised": False, "grads_finite": True}]}

    records = [record("torchvision", "vision_transformer", 0.6), record("timm", "deit", 0.7),
               record("hf", "bert", 0.4), record("hf", "resnet", 0.1), record("torchvision", "resnet", 0.2)]
    assert [zoo_script.is_transformer(r) for r in records] == [True, True, True, False, False]
    table = zoo_script.family_table({"records": records, "rule_sets": ["auto"]})
    assert "| **transformers (median)** | 3 | **0.600** |" in table

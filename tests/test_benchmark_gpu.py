"""benchmarks/gpu.py: its steps run on CPU at tiny sizes, each isolated, and its output renders.

The GPU figures themselves need a GPU (``python benchmarks/gpu.py`` there). Here:
without CUDA the script says so in one line and exits 0; every step function runs
on CPU with ``Sizes.tiny()`` (kernel tests under ``TRITON_INTERPRET=1``, inductor
replaced by aot_eager); a failing or raising step is recorded and the next one
runs; the JSON renders to markdown and to the README's GPU section, which is
checked to be the one generated from the newest result file (or the "no result
yet" note).
"""

import json
import subprocess
import sys

import pytest
import torch

from benchmark_scripts import BENCHMARKS, load_benchmark

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU behaviour")


@pytest.fixture(scope="module")
def gpu():
    return load_benchmark("gpu")


@pytest.fixture(scope="module")
def tiny_records(gpu):
    """Every step run here on CPU at tiny sizes, as run_all would record them."""
    sizes = gpu.Sizes.tiny()
    return [gpu.run_step_here(name, torch.device("cpu"), sizes, 120) for name in gpu.STEP_NAMES]


def test_without_a_gpu_the_script_says_so_in_one_line_and_exits_0(tmp_path):
    run = subprocess.run([sys.executable, str(BENCHMARKS / "gpu.py"), "--results", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0
    assert run.stdout.count("\n") == 1 and "no CUDA GPU" in run.stdout
    assert list(tmp_path.iterdir()) == []


def test_every_step_runs_on_cpu_at_tiny_sizes(tiny_records):
    by_step = {r["step"]: r for r in tiny_records}
    assert list(by_step) == ["kernel_tests", "kernel_throughput", "layers", "memory",
                             "predicted_peak", "amp", "compile", "peers"]
    for record in tiny_records:
        assert record["status"] == "passed", (record["step"], record.get("error"), record.get("traceback"))
        assert record["seconds"] > 0

    kernel_tests = by_step["kernel_tests"]["details"]
    assert kernel_tests["counts"].get("passed", 0) >= 1 and not kernel_tests["failed"]

    throughput = by_step["kernel_throughput"]["details"]["rows"]
    assert {(r["op"], r["bits"]) for r in throughput} == {
        ("clone", 0), ("pack", 1), ("unpack", 1), *((op, b) for op in ("quantize", "dequantize") for b in (2, 4, 8))}
    assert all(r["gbps"] > 0 and r["x_clone"] > 0 for r in throughput)

    layers = by_step["layers"]["details"]
    assert layers["rows"] and {r["model"] for r in layers["rows"]} >= {"ResNet-50"}
    assert layers["targets_judged"] == 0  # targets are judged on CUDA only

    memory = by_step["memory"]["details"]
    assert {(r["example"], r["rules"]) for r in memory["rows"]} == {
        ("resnet_basic", "exact"), ("resnet_basic", "approx4")}
    assert memory["max_batch"] == {}  # the cap search needs CUDA

    peaks = by_step["predicted_peak"]["details"]["rows"]
    assert {(r["example"], r["rules"]) for r in peaks} == {
        (e, r) for e in ("resnet_basic", "gpt") for r in ("bp", "approx4")}
    assert all(r["predicted_bytes"] > 0 and r["measured_bytes"] is None for r in peaks)
    # No ordering between BP and approx4 at these sizes: gradients and decoded copies make the peak.

    amp = by_step["amp"]["details"]["rows"]
    assert {(r["rules"], r["precision"]) for r in amp} == {
        (rules, "bf16") for rules in ("bp", "exact", "approx4")}
    assert all(r["ok"] for r in amp)

    compiled = by_step["compile"]["details"]
    assert compiled["backend"] == "aot_eager" and compiled["grads_close"]

    peers = by_step["peers"]["details"]
    rows = {r["method"]: r for r in peers["rows"]}
    assert peers["model"].startswith("hf/llama") and peers["rounds"] == 2
    assert list(rows) == ["bp", "checkpoint", "plan @ checkpointing's measured peak",
                          "plan @ a kept budget of checkpointing's measured bytes kept"]
    kept_plan = rows["plan @ a kept budget of checkpointing's measured bytes kept"]
    assert all(rows[m]["ok"] and len(rows[m]["rounds_s"]) == 2 for m in ("bp", "checkpoint")), rows
    assert kept_plan["ok"] and len(kept_plan["rounds_s"]) == 2, kept_plan
    # at these sizes the planner's floor is over checkpointing's peak: that row says so
    peak_plan = rows["plan @ checkpointing's measured peak"]
    assert peak_plan["ok"] or "BudgetError" in peak_plan["error"]
    assert rows["checkpoint"]["kept_bytes"] < rows["bp"]["kept_bytes"]
    assert kept_plan["plan"]["kept_budget_bytes"] == rows["checkpoint"]["kept_bytes"] >= kept_plan["kept_bytes"]
    assert peers["target"]["text"].startswith("target ")


def test_a_raising_or_failing_step_is_recorded_and_does_not_stop_the_next(gpu, monkeypatch):
    def raising(device, sizes, deadline):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    def failing(device, sizes, deadline):
        raise gpu.StepFailed("2 of 5 rows missed", {"rows": [1, 2]})

    monkeypatch.setitem(gpu.STEPS, "layers", raising)
    monkeypatch.setitem(gpu.STEPS, "memory", failing)
    monkeypatch.setitem(gpu.STEPS, "amp", lambda device, sizes, deadline: {"rows": []})
    result = gpu.run_all(torch.device("cpu"), "tiny", steps=("layers", "memory", "amp"),
                         runner=lambda name, device, sizes, budget: gpu.run_step_here(
                             name, device, gpu.SIZES[sizes](), budget), echo=lambda line: None)
    statuses = [(r["step"], r["status"]) for r in result["steps"]]
    assert statuses == [("layers", "error"), ("memory", "failed"), ("amp", "passed")]
    assert "illegal memory access" in result["steps"][0]["error"]
    assert "Traceback" in result["steps"][0]["traceback"]
    assert result["steps"][1]["details"] == {"rows": [1, 2]}
    assert all(r["seconds"] >= 0 for r in result["steps"])


def test_steps_past_the_total_budget_are_skipped_not_run(gpu):
    ran = []

    def runner(name, device, sizes, budget):
        ran.append((name, budget))
        return dict(step=name, status="passed", seconds=0.0)

    result = gpu.run_all(torch.device("cpu"), "full", total_budget=100, runner=runner,
                         echo=lambda line: None)
    assert ran[0][0] == "kernel_tests" and ran[0][1] == pytest.approx(100, abs=1)  # what is left
    assert [r["status"] for r in result["steps"]] == ["passed"] * len(gpu.STEP_NAMES)
    result = gpu.run_all(torch.device("cpu"), "full", total_budget=5, runner=runner,
                         echo=lambda line: None)
    assert [r["status"] for r in result["steps"]] == ["skipped"] * len(gpu.STEP_NAMES)


def test_a_step_runs_isolated_in_its_own_process(gpu):
    record = gpu.run_step_in_subprocess("kernel_throughput", torch.device("cpu"), "tiny", 60)
    assert record["status"] == "passed", record.get("error")
    assert record["details"]["rows"]


def test_an_unknown_step_in_its_process_is_an_error_record(gpu):
    record = gpu.run_step_in_subprocess("no_such_step", torch.device("cpu"), "tiny", 30)
    assert record["status"] == "error" and record["error"]


def _result(gpu, records):
    return dict(environment=gpu.environment(torch.device("cpu")), sizes="tiny",
                total_seconds=sum(r["seconds"] for r in records), total_budget_s=450, steps=records)


def test_results_render_to_json_markdown_and_the_readme_section(gpu, tiny_records, tmp_path):
    result = _result(gpu, tiny_records)
    result["environment"]["device"] = "NVIDIA H200"
    json_path, md_path = gpu.result_paths(result, tmp_path)
    assert json_path.name == f"gpu_nvidia_h200_{result['environment']['date'][:10]}.json"
    assert md_path.suffix == ".md"
    json_path.write_text(json.dumps(result, default=str))

    markdown = gpu.render_markdown(json.loads(json_path.read_text()))
    assert "**NVIDIA H200**" in markdown
    for step in gpu.STEP_NAMES:
        assert f"| {step} | passed |" in markdown
    assert "Kernel throughput" in markdown and "| resnet_basic | approx4 |" in markdown
    assert "Mixed precision: 3 of 3" in markdown and "torch.compile (aot_eager)" in markdown
    assert "Peers (`benchmarks/peers.py`'s rows on the device) on hf/llama" in markdown
    assert "| plan @ checkpointing's measured peak |" in markdown and "\ntarget " in markdown

    assert gpu.newest_result(tmp_path) == json_path
    section = gpu.render_readme_section(json_path)
    assert section.startswith("## GPU\n") and "python benchmarks/gpu.py" in section
    assert markdown.strip() in section
    readme = "# x\n\nintro\n\n## Usage\n\nu\n\n## Layout\n\nl\n"
    added = gpu.replace_readme_section(readme, section)
    assert added.index("## GPU") < added.index("## Layout") and "## Usage\n\nu\n" in added
    replaced = gpu.replace_readme_section(added, gpu.render_readme_section(None))
    assert "No GPU result yet" in replaced and "NVIDIA H200" not in replaced
    assert replaced.count("## GPU") == 1 and "## Usage\n\nu\n" in replaced
    assert gpu.replace_readme_section(replaced, gpu.render_readme_section(None)) == replaced


def test_failed_steps_render_with_their_errors(gpu):
    records = [dict(step="kernel_tests", status="failed", seconds=3.0,
                    error="kernel tests: {'failed': 2} exit 1 | first", details=dict(
                        counts={"passed": 10, "failed": 2}, failed=["a", "b"])),
               dict(step="layers", status="timeout", seconds=90.0, error="killed after 90 s"),
               dict(step="memory", status="skipped", seconds=0.0, error="the total budget was spent")]
    markdown = gpu.render_markdown(_result(gpu, records))
    assert "| kernel_tests | failed | 3.0 | kernel tests: {'failed': 2} exit 1 \\| first |" in markdown
    assert "| layers | timeout |" in markdown and "| memory | skipped |" in markdown
    assert "10 passed" in markdown


def test_readme_gpu_section_is_the_one_generated_from_the_newest_result(gpu):
    readme = gpu.README.read_text()
    expected = gpu.render_readme_section(gpu.newest_result())
    assert expected in readme, "run: python benchmarks/gpu.py --readme"
    assert readme.count("\n## GPU\n") == 1

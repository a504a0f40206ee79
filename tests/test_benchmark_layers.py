"""Smoke test of benchmarks/layers.py: a --quick CPU run has a sound row for every layer variant.

The byte counts are checked against the variants' own formulas (methods.md):
ASA and the 1-bit lossless masks keep ceil(N / 8) bytes, the compact max-pool
one byte per output element, the 4-bit approximate variants what
``quantized_nbytes`` says; the torch Linear/Conv baseline keeps its fp32 input.
No timing figure is checked beyond being positive.
"""

import inspect
import json
import math
from datetime import datetime

import pytest
import torch
from torch import nn

from aalconvert.kernels import quantized_nbytes
from aalconvert.nn import approx, ara, asa, lossless, recompute
from benchmark_scripts import load_benchmark

WEIGHTED_SUFFIXES = ("Linear", "Conv1d", "Conv2d", "Conv3d")
ONE_BIT_MASKS = ("MaskReLU", "MaskDropout")
APPROX_INPUT_COPIES = ("ApproxLinear", "ApproxConv1d", "ApproxConv2d", "ApproxGELU", "ApproxSiLU",
                       "ApproxSoftmax", "ApproxReLU")


def _load_script():
    return load_benchmark("layers")


def _variant_class_names() -> set[str]:
    """Every public nn.Module in aalconvert.nn's technique files that has ``from_module``."""
    names = set()
    for file in (approx, ara, asa, lossless, recompute):
        for name, obj in vars(file).items():
            if (inspect.isclass(obj) and issubclass(obj, nn.Module) and hasattr(obj, "from_module")
                    and obj.__module__.startswith("aalconvert.nn") and not name.startswith("_")):
                names.add(name)
    return names


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[dict, dict]:
    path = tmp_path_factory.mktemp("benchmark") / "layers.json"
    returned = _load_script().main(["--quick", "--device", "cpu", "--json", str(path)])
    return returned, json.loads(path.read_text())


@pytest.fixture(scope="module")
def rows(run) -> list[dict]:
    return run[1]["rows"]


def test_json_file_holds_the_returned_result_with_device_torch_version_and_date(run):
    returned, written = run
    assert written == json.loads(json.dumps(returned))
    assert written["device"] == "cpu" and written["kernels"] == "torch reference"
    assert written["torch_version"] == torch.__version__
    assert datetime.fromisoformat(written["date"]).tzinfo is not None
    assert written["batch"] == 2 and written["quick"] is True


def test_every_variant_class_has_a_row(rows):
    expected = _variant_class_names()
    assert len(expected) >= 20  # the technique files really were scanned
    assert expected <= {row["variant"] for row in rows}


def test_times_are_positive_and_ratio_is_variant_over_torch(rows):
    for row in rows:
        assert row["torch_ms"] > 0 and row["variant_ms"] > 0, row["label"]
        assert row["time_ratio"] == pytest.approx(row["variant_ms"] / row["torch_ms"])


def test_every_variant_keeps_fewer_bytes_than_the_torch_layer(rows):
    for row in rows:
        assert row["torch_bytes"] > 0, row["label"]
        assert row["kept_ratio"] == pytest.approx(row["variant_bytes"] / row["torch_bytes"])
        assert row["kept_ratio"] < 1, (row["label"], row["layer"])


def test_torch_linear_and_conv_keep_their_fp32_input(rows):
    weighted = [row for row in rows if row["variant"].endswith(WEIGHTED_SUFFIXES)]
    assert len({row["variant"] for row in weighted}) >= 12
    for row in weighted:
        assert row["torch_bytes"] == 4 * row["input_numel"], (row["label"], row["layer"])


def test_asa_keeps_one_bit_per_input_element(rows):
    asa_rows = [row for row in rows if row["variant"].startswith("ASA")]
    assert {"ASALinear", "ASAConv1d", "ASAConv2d"} <= {row["variant"] for row in asa_rows}
    assert any(row["input_numel"] % 8 for row in asa_rows if row["variant"] == "ASALinear")
    for row in asa_rows:
        assert row["variant_bytes"] == math.ceil(row["input_numel"] / 8), row["layer"]


def test_lossless_variants_keep_what_their_formulas_say(rows):
    for row in rows:
        if row["variant"] in ONE_BIT_MASKS:
            assert row["variant_bytes"] == math.ceil(row["input_numel"] / 8), row["layer"]
        elif row["variant"] == "CompactMaxPool2d":
            assert row["variant_bytes"] == math.prod(row["output_shape"]), row["layer"]


def test_approximate_variants_keep_a_4bit_copy_of_one_activation(rows):
    checked = [row for row in rows if row["variant"] in APPROX_INPUT_COPIES]
    assert {row["variant"] for row in checked} == set(APPROX_INPUT_COPIES)
    for row in checked:
        scale_dtype = torch.bfloat16 if row["variant"] == "ApproxReLU" else torch.float16
        expected = quantized_nbytes(row["input_numel"], 4, 64, scale_dtype)
        assert row["variant_bytes"] == expected, (row["variant"], row["layer"])


def test_shared_tensors_are_named_and_leave_nothing_else_kept(rows):
    for row in rows:
        if row["variant"].startswith(("ARA", "RecomputedInput")):
            assert row["not_counted"] and row["variant_bytes"] == 0, row["label"]
        else:
            assert row["not_counted"] == ""


def test_cpu_rows_carry_targets_but_no_verdict(rows):
    for row in rows:
        assert row["meets_target"] is None
        if row["variant"].startswith(("Approx", "SharedCopy")):  # the 4-bit variants
            assert row["target_time_ratio"] == 1.25
        elif row["variant"].startswith("RecomputedInput"):
            assert row["target_time_ratio"] is None
        else:
            assert row["target_time_ratio"] == 1.05


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal needs a machine without CUDA")
def test_asking_for_cuda_without_cuda_is_refused_before_measuring(capsys):
    with pytest.raises(SystemExit):
        _load_script().main(["--device", "cuda", "--quick"])
    assert "no CUDA device" in capsys.readouterr().err

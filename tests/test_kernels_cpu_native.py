"""The CPU path's compiled passes (kernels/cpu_native.py): built here, the reference's bytes, split across
threads alike, and a clear fallback where no compiler works.

tests/test_kernels_quantize.py holds the CPU path to the reference with these
passes and without them; this file covers what is particular to building and
running them.
"""

import shutil
import warnings

import pytest
import torch

from aalconvert.kernels import cpu_native, dequantize, quantize


def same_quantized(a, b) -> bool:
    return all(torch.equal(x.view(torch.uint8), y.view(torch.uint8)) for x, y in zip(a.tensors(), b.tensors()))


@pytest.fixture
def fresh_build(monkeypatch):
    """A build state of its own: the next ``library()`` call compiles again."""
    monkeypatch.setattr(cpu_native, "_state", {})
    monkeypatch.delenv(cpu_native.ENVIRONMENT_VARIABLE, raising=False)


@pytest.mark.skipif(not (shutil.which("cc") or shutil.which("gcc")), reason="no C compiler on this machine")
def test_the_kernels_build_where_a_compiler_exists(fresh_build):
    assert cpu_native.library() is not None, cpu_native.unavailable_reason()
    assert cpu_native.unavailable_reason() is None


def test_a_failing_compiler_falls_back_to_torch_ops_with_one_warning(fresh_build, monkeypatch):
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    x = torch.randn(5000) * 3
    with pytest.warns(RuntimeWarning, match="compiled CPU kernels are unavailable .*false failed"):
        fallback = quantize(x, 4, group_size=64, companding="sqrt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once per process, not per call
        again = quantize(x, 4, group_size=64, companding="sqrt")
        decoded = dequantize(again)
    assert "false failed" in cpu_native.unavailable_reason()
    reference = quantize(x, 4, group_size=64, companding="sqrt", backend="reference")
    assert same_quantized(fallback, reference) and same_quantized(again, reference)
    assert torch.equal(decoded, dequantize(reference, backend="reference"))


def test_the_environment_variable_chooses_torch_ops_without_building(fresh_build, monkeypatch):
    monkeypatch.setenv(cpu_native.ENVIRONMENT_VARIABLE, "torch")
    monkeypatch.setenv("CC", "false")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a choice, not a failure: no warning
        quantize(torch.randn(300), 4, group_size=64)
    assert cpu_native.library() is None
    assert cpu_native.unavailable_reason() == f"{cpu_native.ENVIRONMENT_VARIABLE}=torch"
    assert "library" not in cpu_native._state  # nothing was compiled


@pytest.mark.skipif(not (shutil.which("cc") or shutil.which("gcc")), reason="no C compiler on this machine")
@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("stochastic", [False, True])
def test_threads_split_the_groups_without_changing_a_byte(monkeypatch, bits, stochastic):
    x = torch.randn(40_000 + 13) * torch.linspace(0.01, 50, 40_013)
    x[::997] = float("nan")
    x[5:900] = 0.0  # constant and min-zero groups
    options = dict(group_size=96, stochastic=stochastic, seed=3)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = quantize(x, bits, **options)
        monkeypatch.setattr(cpu_native, "PARALLEL_MINIMUM", 1)
        torch.set_num_threads(3)
        split = quantize(x, bits, **options)
        decoded = dequantize(split)
    finally:
        torch.set_num_threads(threads)
    reference = quantize(x, bits, backend="reference", **options)
    assert same_quantized(alone, reference) and same_quantized(split, reference)
    expected = dequantize(reference, backend="reference")
    assert torch.equal(decoded.isnan(), expected.isnan())
    assert torch.equal(decoded.nan_to_num(), expected.nan_to_num())

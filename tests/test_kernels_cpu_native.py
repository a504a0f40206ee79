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


def adversarial_bounds(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Group (min, max) pairs over every magnitude fp32 has, and the edges of fp16 and bf16: subnormals,
    +-0, 65504 and its neighbours, ranges too wide for fp16 or bf16, equal bounds, inf and NaN."""
    generator = torch.Generator().manual_seed(seed)
    n = 20_000
    exponents = torch.randint(-149, 128, (n,), generator=generator).float()
    magnitudes = torch.rand(n, generator=generator) * 2.0 ** exponents.clamp(max=127)
    signs = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    low = magnitudes * signs
    edges = torch.tensor([0.0, -0.0, 65504.0, -65504.0, 65519.0, -65520.0, 6e-8, -6e-8, 3e-8, 1e-40, -1e-40,
                          3.3895e38, -3.3895e38, 3.4028e38, -3.4028e38, 1.0, -1.0])
    low[: edges.numel()] = edges
    widths = torch.rand(n, generator=generator) * 2.0 ** torch.randint(-149, 128, (n,), generator=generator).float()
    widths[torch.rand(n, generator=generator) < 0.1] = 0.0  # constant groups
    high = torch.maximum(low + widths, low)
    high[: edges.numel()] = edges.flip(0).abs()
    low[100:110] = torch.tensor([float("nan"), float("inf"), -float("inf")] * 3 + [float("nan")])
    high[105:115] = torch.tensor([float("nan"), float("inf")] * 5)
    return low, high


@pytest.mark.skipif(not (shutil.which("cc") or shutil.which("gcc")), reason="no C compiler on this machine")
@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("levels", [255, 15, 3])
@pytest.mark.parametrize("lift", [True, False])
def test_group_pairs_equal_the_torch_ones_on_adversarial_bounds(scale_dtype, levels, lift):
    from aalconvert.kernels.quantize import group_pairs

    for seed in range(3):
        low, high = adversarial_bounds(seed)
        finite = low.isfinite() & high.isfinite()
        mins, scales, min_value, scale_value, usable = group_pairs(low, high, finite, levels, scale_dtype)
        c_mins, c_scales, c_min_value, c_scale_value, flags = cpu_native.group_pairs(
            low, high, levels, scale_dtype, lift)
        assert torch.equal(c_mins.view(torch.int16), mins.view(torch.int16))
        assert torch.equal(c_scales.view(torch.int16), scales.view(torch.int16))
        assert torch.equal(flags & 1 == 1, usable)
        assert torch.equal(flags & 2 == 2, usable & (min_value == 0) & lift)
        # encoding reads the fp32 pair of the groups that get codes only
        assert torch.equal(c_min_value[usable].view(torch.int32), min_value[usable].view(torch.int32))
        assert torch.equal(c_scale_value[usable].view(torch.int32), scale_value[usable].view(torch.int32))


@pytest.mark.skipif(not (shutil.which("cc") or shutil.which("gcc")), reason="no C compiler on this machine")
@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16])
def test_decode_pairs_equal_the_torch_ones_on_every_16_bit_pattern(scale_dtype):
    from aalconvert.kernels.quantize import decoded_min_and_step

    every = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    for scales_raw in (every, every.flip(0), every.roll(12345)):
        mins, scales = every.view(scale_dtype), scales_raw.view(scale_dtype)
        expected = decoded_min_and_step(mins, scales)
        for got, want in zip(cpu_native.decode_pairs(mins, scales), expected):
            nan = want.isnan()
            assert torch.equal(got.isnan(), nan)
            assert torch.equal(got[~nan].view(torch.int32), want[~nan].view(torch.int32))

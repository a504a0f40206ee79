"""k-bit group quantization: the reference layout, its error bounds, and Triton and the CPU path held to it.

Without CUDA the Triton kernels run in the interpreter (tests/conftest.py), so
sizes stay small and hypothesis example counts low. ``backend="auto"`` on a CPU
tensor runs the CPU path (``aalconvert.kernels.quantize_cpu``).
"""

import math
import os
from unittest import mock

import numpy as np

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._subclasses.fake_tensor import FakeTensorMode

from aalconvert.kernels import QuantizedTensor, cpu_native, dequantize, quantize, quantized_nbytes
from aalconvert.kernels.quantize import compand, decoded_min_and_step

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SCALE_DTYPES = (torch.float16, torch.bfloat16)
BITS = (8, 4, 2)


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality of two tensors of one dtype (NaN payloads included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    def raw(t: torch.Tensor) -> torch.Tensor:  # a fresh row-major copy: any strides can be viewed
        return t.new_empty(t.shape).copy_(t).reshape(-1).view(torch.uint8)

    return torch.equal(raw(a), raw(b))


def same_values_nan_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality except that any NaN equals any NaN (payloads differ across backends)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    nan = a.isnan()
    if not torch.equal(nan, b.isnan()):
        return False
    return same_bytes(torch.where(nan, 0, a), torch.where(nan, 0, b))


def assert_backends_agree(x: torch.Tensor, **options) -> QuantizedTensor:
    """Triton and the CPU path give the reference's bytes, and decode them as it does."""
    before = x.clone()
    reference = quantize(x, backend="reference", **options)
    for backend in ("triton", "auto"):
        other = quantize(x, backend=backend, **options)
        for name, a, b in zip(("codes", "mins", "scales"), other.tensors(), reference.tensors()):
            assert same_bytes(a, b), f"{backend} {name} differ for {tuple(x.shape)} {x.dtype} {options}"
        decoded = dequantize(reference, backend=backend)
        assert same_values_nan_equal(decoded, dequantize(reference, backend="reference"))
    assert same_bytes(x, before), "quantizing changed its input"
    return reference


def group_steps(q: QuantizedTensor) -> torch.Tensor:
    """The step of each element's group, in the logical order of the original shape."""
    numel = math.prod(q.shape)
    _, steps = decoded_min_and_step(q.mins, q.scales)
    return steps.repeat_interleave(q.group_size)[:numel].view(q.shape)


def assert_within_half_step(x: torch.Tensor, q: QuantizedTensor, decoded: torch.Tensor) -> None:
    """|decoded - x| <= step / 2, plus fp32 rounding and the output dtype's own rounding.

    Companded: the same bound in the quantized domain ``sign(x) * sqrt(|x|)``.
    """
    x32, y32 = x.float(), decoded.float()
    if q.companding == "sqrt":
        x32, y32 = compand(x32), compand(y32)
    output_rounding = y32.abs() * torch.finfo(x.dtype).eps / 2
    bound = group_steps(q) / 2 * (1 + 1e-5) + output_rounding + 1e-30
    assert ((y32 - x32).abs() <= bound).all()


def awkward_tensor(shape, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=generator) * 3 + 1).to(dtype)


# ------------------------------------------------------------------ layout


def test_layout_packs_codes_little_endian_within_a_byte():
    q = quantize(torch.tensor([0.0, 1.0, 2.0, 3.0, 3.0, 2.0, 1.0, 0.0]), bits=2, group_size=8)
    assert q.mins.tolist() == [0.0] and q.scales.tolist() == [1.0]
    assert q.codes.tolist() == [0b11100100, 0b00011011]


def test_unused_high_bits_of_last_byte_are_zero():
    q = quantize(torch.full((5,), 3.0).index_fill(0, torch.tensor([0]), 0.0), bits=2, group_size=8)
    assert q.codes.tolist() == [0b11111100, 0b00000011]


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("numel", [0, 1, 7, 8, 513, 10**5 + 3])
@pytest.mark.parametrize("scale_dtype", SCALE_DTYPES)
def test_packed_size_and_nbytes_match_the_formula(bits, numel, scale_dtype):
    q = quantize(torch.randn(numel), bits, group_size=64, scale_dtype=scale_dtype)
    groups = math.ceil(numel / 64)
    assert q.codes.dtype == torch.uint8 and q.codes.numel() == math.ceil(numel * bits / 8)
    assert q.mins.dtype == q.scales.dtype == scale_dtype
    assert q.mins.numel() == q.scales.numel() == groups
    assert q.nbytes == quantized_nbytes(numel, bits, 64, scale_dtype)
    assert q.nbytes == math.ceil(numel * bits / 8) + 2 * groups * 2


@pytest.mark.parametrize("companding", ["none", "sqrt"])
def test_from_tensors_rebuilds_an_equal_quantized_tensor(companding):
    q = quantize(torch.randn(3, 50), 4, group_size=16, companding=companding)
    rebuilt = QuantizedTensor.from_tensors(
        q.tensors(), q.shape, q.dtype, q.bits, q.group_size, q.companding
    )
    assert torch.equal(dequantize(rebuilt), dequantize(q))
    assert q.nbytes == quantized_nbytes(150, 4, 16)  # companding adds no metadata


# ------------------------------------------------------------------ Triton == reference


@pytest.mark.parametrize("numel", [0, 1, 7, 8, 513, 10**5 + 3])
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_matches_reference_bytes_over_sizes(numel, dtype):
    assert_backends_agree(awkward_tensor((numel,), dtype), bits=4, group_size=256)


@pytest.mark.parametrize("dtype, bits", list(zip(DTYPES, BITS)))
def test_triton_matches_reference_bytes_with_sqrt_companding(dtype, bits):
    x = awkward_tensor((1031,), dtype, seed=bits)
    x[::7] = 0.0
    x[1::11] = -0.0
    x[2::13] = torch.finfo(dtype).tiny / 4  # subnormal (flushed to 0 in bfloat16's fp32 view)
    for scale_dtype in SCALE_DTYPES:
        assert_backends_agree(
            x, bits=bits, group_size=64, companding="sqrt", scale_dtype=scale_dtype
        )


@pytest.mark.parametrize("stochastic", [False, True])
def test_triton_matches_reference_bytes_on_large_stochastic_2bit(stochastic):
    x = awkward_tensor((10**5 + 3,), torch.bfloat16, seed=1)
    assert_backends_agree(
        x, bits=2, group_size=128, stochastic=stochastic, seed=2**40 + 7,
        scale_dtype=torch.bfloat16,
    )  # fmt: skip


@settings(max_examples=25, deadline=None)
@given(
    shape=st.lists(st.integers(0, 7), min_size=0, max_size=4),
    dtype=st.sampled_from(DTYPES),
    bits=st.sampled_from(BITS),
    group_size=st.sampled_from([8, 16, 24, 64, 256]),
    stochastic=st.booleans(),
    scale_dtype=st.sampled_from(SCALE_DTYPES),
    seed=st.integers(0, 2**63 - 1),
    layout=st.sampled_from(["contiguous", "transposed", "strided"]),
    sqrt=st.booleans(),
)
def test_triton_matches_reference_bytes_property(
    shape, dtype, bits, group_size, stochastic, scale_dtype, seed, layout, sqrt
):
    companding = "sqrt" if sqrt and not stochastic else "none"  # sqrt is nearest-only
    x = awkward_tensor(shape, dtype, seed=len(shape))
    if layout == "transposed" and x.dim() >= 2:
        x = x.transpose(0, -1)
    elif layout == "strided":
        every_other = tuple(slice(None, None, 2) for _ in shape)
        x = awkward_tensor([2 * d for d in shape], dtype)[every_other]
    assert_backends_agree(
        x, bits=bits, group_size=group_size, stochastic=stochastic,
        scale_dtype=scale_dtype, seed=seed, companding=companding,
    )  # fmt: skip


# ------------------------------------------------------------------ CPU path == reference


def assert_cpu_path_agrees(x: torch.Tensor, **options) -> None:
    """The CPU path (``auto`` on CPU), with its compiled passes and with its torch ops alone, gives the
    reference's bytes and decoding, input untouched."""
    before = x.clone()
    reference = quantize(x, backend="reference", **options)
    decoded = dequantize(reference, backend="reference")
    for kernels in ("native", "torch"):
        with mock.patch.dict(os.environ, {cpu_native.ENVIRONMENT_VARIABLE: kernels}):
            fast = quantize(x, **options)
            for name, a, b in zip(("codes", "mins", "scales"), fast.tensors(), reference.tensors()):
                assert same_bytes(a, b), f"{kernels}: {name} differ for {tuple(x.shape)} {x.dtype} {options}"
            assert same_values_nan_equal(dequantize(reference), decoded), f"{kernels}: decoding differs"
    assert same_bytes(x, before)


@settings(max_examples=200, deadline=None)
@given(
    numel=st.integers(0, 3000),
    dtype=st.sampled_from(DTYPES),
    bits=st.sampled_from(BITS),
    group_size=st.sampled_from([8, 24, 64, 256]),
    stochastic=st.booleans(),
    scale_dtype=st.sampled_from(SCALE_DTYPES),
    seed=st.integers(0, 2**63 - 1),
    sqrt=st.booleans(),
    specials=st.lists(
        st.tuples(st.integers(0, 2999), st.sampled_from(
            [math.nan, math.inf, -math.inf, 0.0, -0.0, 1e-40, -7e4, 3e38, 1e-7]
        )),
        max_size=6,
    ),  # fmt: skip
    scale=st.sampled_from([1e-6, 1.0, 1e4]),
)
def test_cpu_path_matches_reference_bytes_property(
    numel, dtype, bits, group_size, stochastic, scale_dtype, seed, sqrt, specials, scale
):
    x = (awkward_tensor((numel,), torch.float32, seed=numel) * scale).to(dtype)
    for index, value in specials:
        if index < numel:
            x[index] = value
    assert_cpu_path_agrees(
        x, bits=bits, group_size=group_size, stochastic=stochastic, scale_dtype=scale_dtype,
        seed=seed, companding="sqrt" if sqrt and not stochastic else "none",
    )  # fmt: skip


@pytest.mark.parametrize("companding", ["none", "sqrt"])
@pytest.mark.parametrize("bits", BITS)
def test_cpu_path_matches_reference_on_large_awkward_layouts(bits, companding):
    base = awkward_tensor((6, 37, 29, 11), torch.float32, seed=bits)
    for x in (base, base.transpose(1, 3), base[:, ::2], base.to(torch.bfloat16)):
        assert_cpu_path_agrees(x, bits=bits, group_size=64, companding=companding)


def test_the_environment_variable_sends_cpu_calls_to_the_reference(monkeypatch):
    from aalconvert.kernels import quantize_cpu

    def refuse(*args):
        raise AssertionError("the CPU path ran although AALCONVERT_KERNELS=reference")

    monkeypatch.setattr(quantize_cpu, "quantize_cpu", refuse)
    monkeypatch.setattr(quantize_cpu, "dequantize_cpu", refuse)
    monkeypatch.setenv("AALCONVERT_KERNELS", "reference")
    dequantize(quantize(torch.randn(300), 4, group_size=64))
    monkeypatch.setenv("AALCONVERT_KERNELS", "auto")
    with pytest.raises(AssertionError, match="CPU path ran"):
        quantize(torch.randn(300), 4, group_size=64)


@pytest.mark.parametrize("backend", ["triton", "auto", "reference"])
def test_channels_last_and_strided_inputs_quantize_in_logical_order(backend):
    x = awkward_tensor((2, 5, 3, 7), torch.float16)
    expected = quantize(x, 4, group_size=16, backend="reference")
    transposed = x.transpose(1, 3).contiguous().transpose(1, 3)
    for variant in (x.to(memory_format=torch.channels_last), transposed):
        q = quantize(variant, 4, group_size=16, backend=backend)
        assert all(same_bytes(a, b) for a, b in zip(q.tensors(), expected.tensors()))
        decoded = dequantize(q, backend=backend)
        assert decoded.is_contiguous() and decoded.shape == x.shape


# ------------------------------------------------------------------ error bounds


@pytest.mark.parametrize("companding", ["none", "sqrt"])
@pytest.mark.parametrize("backend", ["triton", "auto", "reference"])
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_nearest_rounding_errs_by_at_most_half_a_step(backend, bits, dtype, companding):
    x = awkward_tensor((3, 7, 61), dtype, seed=bits)
    q = quantize(x, bits, group_size=32, companding=companding, backend=backend)
    assert q.companding == companding
    decoded = dequantize(q, backend=backend)
    assert decoded.dtype == dtype and decoded.shape == x.shape
    assert_within_half_step(x, q, decoded)


def test_sqrt_companding_codes_are_uniform_codes_of_the_companded_tensor():
    x = awkward_tensor((1000,), torch.float32)
    companded = quantize(x, 4, group_size=64, companding="sqrt")
    uniform = quantize(compand(x), 4, group_size=64)
    assert all(same_bytes(a, b) for a, b in zip(companded.tensors(), uniform.tensors()))
    y = dequantize(uniform)
    assert torch.equal(dequantize(companded), y * y.abs())


def test_sqrt_companding_is_finer_near_zero_on_heavy_tails():
    # Student-t(3)-like values: a few outliers set the range, most values sit near 0.
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(64, 256, generator=generator) / torch.rand(64, 256, generator=generator).pow(0.5)
    errors = {
        c: (dequantize(quantize(x, 4, companding=c)) - x).pow(2).mean().item()
        for c in ("none", "sqrt")
    }
    assert errors["sqrt"] < 0.8 * errors["none"]


def test_half_step_bound_holds_far_from_zero_where_min_rounding_matters():
    # |min| >> range: rounding the min to fp16 the wrong way would cost many steps.
    x = 1000.0 + torch.linspace(0, 0.01, 512)
    for bits in BITS:
        q = quantize(x, bits, group_size=256, scale_dtype=torch.float16)
        assert (q.mins.float() <= x.view(2, 256).amin(1)).all()
        assert_within_half_step(x, q, dequantize(q))


@pytest.mark.parametrize("backend", ["triton", "auto", "reference"])
def test_stochastic_rounding_is_unbiased(backend):
    # 2-bit groups with min 0 and max 3 (step exactly 1): nearest would be off by
    # 0.25 or 0.3 on the fractional values. Each copy of the group draws its own
    # noise (the hash runs over element indices), so copies act as independent draws.
    group = torch.tensor([0.0, 3.0, 0.25, 1.7, 2.5, 0.9, 1.0, 2.1])
    draws = 256
    x = group.repeat(draws)
    q = quantize(x, 2, group_size=8, stochastic=True, seed=11, backend=backend)
    decoded = dequantize(q, backend=backend).view(draws, 8)
    fraction = group - group.floor()
    sigma = (fraction * (1 - fraction) / draws).sqrt()
    assert ((decoded.mean(0) - group).abs() <= 4 * sigma + 1e-6).all()
    assert ((decoded - group).abs() < 1).all()  # only the two neighbouring levels


def test_stochastic_rounding_is_unbiased_over_many_groups():
    x = torch.rand(8192, generator=torch.Generator().manual_seed(3))
    draws = 16
    error = torch.stack([
        dequantize(quantize(x, 2, group_size=256, stochastic=True, seed=s)) - x
        for s in range(draws)
    ])  # fmt: skip
    steps = quantize(x, 2, group_size=256).scales.float().repeat_interleave(256)
    sigma = (steps / 2).pow(2).mean().sqrt() / math.sqrt(x.numel() * draws)
    assert error.mean().abs() <= 5 * sigma


def test_stochastic_codes_are_reproducible_from_the_seed():
    x = torch.randn(1000)
    first = quantize(x, 2, stochastic=True, seed=123)
    again = quantize(x, 2, stochastic=True, seed=123)
    other = quantize(x, 2, stochastic=True, seed=124)
    assert torch.equal(first.codes, again.codes)
    assert not torch.equal(first.codes, other.codes)
    torch.manual_seed(7)
    drawn = quantize(x, 2, stochastic=True)
    torch.manual_seed(7)
    assert torch.equal(quantize(x, 2, stochastic=True).codes, drawn.codes)


def nonnegative_tensor(dtype: torch.dtype) -> torch.Tensor:
    """A ReLU output with positives far below half a step of their group (down to subnormals),
    a group of one constant, groups holding inf and NaN, and a group with negatives."""
    x = torch.randn(3, 1000, generator=torch.Generator().manual_seed(0)).relu()
    x[0, :50] *= 1e-6
    x[1, 5] = 1e-40 if dtype != torch.float16 else 1e-7  # subnormal in the input's dtype
    x[2, 7] = 3e-9
    x[2, 128:192] = 2.0
    x[2, 200], x[2, 300] = float("nan"), float("inf")
    x[1, 500:520] -= 3.0
    return x.to(dtype)


@pytest.mark.parametrize("companding", ["none", "sqrt"])
@pytest.mark.parametrize("scale_dtype", SCALE_DTYPES)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_nearest_rounding_keeps_the_sign_of_groups_with_min_zero(dtype, bits, scale_dtype, companding):
    x = nonnegative_tensor(dtype)
    q = assert_backends_agree(x, bits=bits, group_size=64, scale_dtype=scale_dtype, companding=companding)
    # In the quantized domain and fp32: squaring, or the cast to fp16, may flush tiny values.
    decoded = dequantize(QuantizedTensor.from_tensors(q.tensors(), q.shape, torch.float32, bits, 64))
    groups = x.float().reshape(-1)
    groups = torch.nn.functional.pad(groups, (0, -groups.numel() % 64), value=1.0).view(-1, 64)
    signed = ((groups.isfinite().all(1)) & (groups.amin(1) >= 0)).repeat_interleave(64)[: x.numel()]
    assert torch.equal((decoded.reshape(-1) > 0)[signed], (x.reshape(-1) > 0)[signed])
    assert signed.sum() >= x.numel() - 3 * 64  # only the NaN, inf and negative groups are left out


def test_stochastic_rounding_is_not_lifted():
    # Unbiased stays unbiased: a tiny positive may still round to code 0.
    x = torch.tensor([0.0, 1.0] + [1e-4] * 62).repeat(64)
    q = quantize(x, 2, group_size=64, stochastic=True, seed=3)
    assert (dequantize(q) == 0).sum() > 64


# ------------------------------------------------------------------ special groups


@pytest.mark.parametrize("backend", ["triton", "auto", "reference"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_constant_groups_decode_exactly(backend, dtype):
    x = torch.cat([torch.zeros(16), torch.full((16,), 1.5), torch.full((5,), -3.0)]).to(dtype)
    q = quantize(x, 2, group_size=16, backend=backend)
    assert q.scales.tolist() == [0.0, 0.0, 0.0]
    assert torch.equal(dequantize(q, backend=backend), x)


@pytest.mark.parametrize("backend", ["triton", "auto", "reference"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_companded_constant_groups_decode_exactly_where_the_root_is_representable(backend, dtype):
    x = torch.cat([torch.zeros(16), torch.full((16,), 2.25), torch.full((5,), -4.0)]).to(dtype)
    q = quantize(x, 2, group_size=16, companding="sqrt", backend=backend)
    assert q.scales.tolist() == [0.0, 0.0, 0.0]
    assert q.mins.tolist() == [0.0, 1.5, -2.0]
    assert torch.equal(dequantize(q, backend=backend), x)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("companding", ["none", "sqrt"])
@pytest.mark.parametrize("backend", ["triton", "auto", "reference"])
@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_inf_or_nan_decodes_its_group_to_nan_and_spares_the_others(backend, bad, companding):
    x = awkward_tensor((64,), torch.float32)
    x[20] = bad
    q = quantize(x, 4, group_size=16, companding=companding, backend=backend)
    decoded = dequantize(q, backend=backend)
    assert decoded[16:32].isnan().all()
    assert q.codes[8:16].eq(0).all()
    others = torch.cat([torch.arange(16), torch.arange(32, 64)])
    assert decoded[others].isfinite().all()
    if companding == "sqrt":
        x, decoded = compand(x), compand(decoded)
    error = (decoded - x).abs()[others]
    assert (error <= group_steps(q)[others] / 2 * (1 + 1e-5)).all()


@pytest.mark.parametrize("backend", ["triton", "auto", "reference"])
def test_groups_beyond_float16_range_keep_a_flagged_bfloat16_pair(backend):
    # fp16 mins round down, so a min below -65504 overflows; one above +65504 does not.
    x = torch.cat([torch.full((8,), -1e5), torch.full((8,), 1e5), torch.linspace(-1, 1, 8)])
    q = quantize(x, 8, group_size=8, scale_dtype=torch.float16, backend=backend)
    raw_scales = q.scales.view(torch.int16)
    assert raw_scales[0] < 0 and (raw_scales[1:] >= 0).all()  # only the first group is wide
    plain = quantize(x[8:], 8, group_size=8, scale_dtype=torch.float16, backend=backend)
    assert same_bytes(q.mins[1:], plain.mins) and same_bytes(q.scales[1:], plain.scales)
    wide = quantize(x[:8], 8, group_size=8, scale_dtype=torch.bfloat16, backend=backend)
    assert same_bytes(q.mins[:1].view(torch.bfloat16), wide.mins)
    with_fp16 = dequantize(q, backend=backend)
    assert with_fp16.isfinite().all()
    assert_within_half_step(x, q, with_fp16)
    q = quantize(x, 8, group_size=8, scale_dtype=torch.bfloat16, backend=backend)
    assert_within_half_step(x, q, dequantize(q, backend=backend))


@pytest.mark.parametrize("companding", ["none", "sqrt"])
@pytest.mark.parametrize("stochastic", [False, True])
@pytest.mark.parametrize("bits", BITS)
def test_huge_finite_values_decode_finite_with_float16_scales_on_both_backends(
    bits, stochastic, companding
):
    if stochastic and companding == "sqrt":
        pytest.skip("sqrt companding is nearest only")
    x = awkward_tensor((300,), torch.float32, seed=bits)
    x[3], x[70], x[140], x[200:216] = -7e4, -1e10, 3e38, -7e4 + torch.arange(16.0)
    q = assert_backends_agree(
        x, bits=bits, group_size=32, stochastic=stochastic, seed=9, companding=companding
    )
    decoded = dequantize(q)
    assert decoded.isfinite().all()
    if not stochastic:
        assert_within_half_step(x, q, decoded)


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize("bits", [0, 1, 3, 16, True])
def test_unsupported_bits_are_rejected(bits):
    with pytest.raises(ValueError, match="bits must be one of"):
        quantize(torch.randn(8), bits)


@pytest.mark.parametrize("group_size", [0, -8, 12, 7.5, True])
def test_group_size_must_be_a_positive_multiple_of_8(group_size):
    with pytest.raises(ValueError, match="positive multiple of 8"):
        quantize(torch.randn(8), 4, group_size=group_size)


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32, torch.bool])
def test_unsupported_input_dtypes_are_rejected(dtype):
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        quantize(torch.ones(8, dtype=dtype), 4)


def test_bad_scale_dtype_seed_and_backend_are_rejected():
    with pytest.raises(TypeError, match="scale_dtype"):
        quantize(torch.randn(8), 4, scale_dtype=torch.float32)
    with pytest.raises(ValueError, match="seed"):
        quantize(torch.randn(8), 4, stochastic=True, seed=-1)
    with pytest.raises(ValueError, match="backend must be one of"):
        quantize(torch.randn(8), 4, backend="cuda")


def test_companding_must_be_known_and_nearest_only():
    with pytest.raises(ValueError, match=r"companding must be one of \('none', 'sqrt'\)"):
        quantize(torch.randn(8), 4, companding="log")
    with pytest.raises(ValueError, match="nearest rounding only"):
        quantize(torch.randn(8), 4, stochastic=True, companding="sqrt")
    q = quantize(torch.randn(8), 4, group_size=8)
    wrong = QuantizedTensor(*q.tensors(), q.shape, q.dtype, 4, 8, companding="cube")
    with pytest.raises(ValueError, match="companding must be one of"):
        dequantize(wrong)


def test_dequantize_rejects_tensors_that_do_not_fit_the_shape():
    q = quantize(torch.randn(40), 4, group_size=8)
    wrong = QuantizedTensor(q.codes[:-1], q.mins, q.scales, q.shape, q.dtype, 4, 8)
    with pytest.raises(ValueError, match="codes must be uint8 with 20 bytes"):
        dequantize(wrong)
    wrong = QuantizedTensor(q.codes, q.mins[:-1], q.scales, q.shape, q.dtype, 4, 8)
    with pytest.raises(ValueError, match="mins must be"):
        dequantize(wrong)


# ------------------------------------------------------------------ torch.library


def test_quantize_and_dequantize_run_on_fake_tensors_with_the_right_shapes():
    with FakeTensorMode():
        x = torch.empty(3, 5, 513, dtype=torch.bfloat16)
        q = quantize(x, 2, group_size=64, scale_dtype=torch.bfloat16, companding="sqrt")
        decoded = dequantize(q)
    numel = 3 * 5 * 513
    assert q.codes.shape == (math.ceil(numel * 2 / 8),) and q.codes.dtype == torch.uint8
    assert q.mins.shape == q.scales.shape == (math.ceil(numel / 64),)
    assert q.scales.dtype == torch.bfloat16
    assert decoded.shape == x.shape and decoded.dtype == torch.bfloat16


def test_ops_are_registered_under_the_aalconvert_namespace():
    x = torch.randn(100)
    codes, mins, scales = torch.ops.aalconvert.quantize_groups(
        x, 4, 32, False, torch.float16, 0, "sqrt", "reference"
    )
    assert torch.equal(codes, quantize(x, 4, group_size=32, companding="sqrt").codes)
    torch.library.opcheck(
        torch.ops.aalconvert.quantize_groups.default,
        (x, 4, 32, False, torch.float16, 0, "sqrt", "reference"),
        test_utils=("test_schema", "test_faketensor"),
    )
    torch.library.opcheck(
        torch.ops.aalconvert.dequantize_groups.default,
        (codes, mins, scales, [100], torch.float32, 4, 32, "sqrt", "reference"),
        test_utils=("test_schema", "test_faketensor"),
    )


def test_companding_sqrt_is_correctly_rounded_like_triton_sqrt_rn():
    # torch's fp32 CPU sqrt is one ulp off on some values (2.984375 among them);
    # the reference must round as Triton's sqrt_rn does or the bytes differ.
    x = torch.cat([torch.tensor([2.984375]), torch.rand(10_000) * 100])
    correctly_rounded = torch.from_numpy(np.sqrt(x.numpy()))  # numpy's fp32 sqrt is IEEE's
    assert torch.equal(compand(x), correctly_rounded)
    assert_backends_agree(
        torch.tensor([2.984375], dtype=torch.float16), bits=4, group_size=8, stochastic=False,
        scale_dtype=torch.float16, seed=0, companding="sqrt",
    )  # fmt: skip


def test_dispatch_modes_and_functorch_still_see_the_custom_ops():
    # Plain eager calls skip the custom op's Python dispatch (kernels/dispatch.call_op);
    # anything that intercepts ops must still see the ops themselves.
    from torch.utils._python_dispatch import TorchDispatchMode

    from aalconvert.kernels import pack_bits, unpack_bits

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.add(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    x = torch.randn(300)
    with Record() as record:
        dequantize(quantize(x, 4, group_size=64))
        unpack_bits(pack_bits(x), x.shape)
    assert {
        "aalconvert.quantize_groups", "aalconvert.dequantize_groups",
        "aalconvert.pack_bits", "aalconvert.unpack_bits",
    } <= record.names  # fmt: skip
    plain = quantize(x, 4, group_size=64)
    batched = torch.func.vmap(lambda row: dequantize(quantize(row, 4, group_size=64)))(x.view(3, 100))
    assert batched.shape == (3, 100)
    assert torch.equal(dequantize(plain), dequantize(quantize(x, 4, group_size=64, backend="reference")))


@pytest.mark.parametrize("start, end", [(0, 1), (0, 4099), (12345, 70000), (2**32 - 3000, 2**32),
                                        (2**32 - 5, 2**32 + 5)])
def test_cpu_stochastic_noise_is_the_reference_hash_of_each_index(start, end):
    from aalconvert.kernels.quantize import seed_keys, uniform_from_index
    from aalconvert.kernels.quantize_cpu import _uniform

    for seed in (0, 2**62 + 12345):
        expected = uniform_from_index(torch.arange(start, end, dtype=torch.int64), *seed_keys(seed))
        assert torch.equal(_uniform(start, end, seed), expected)

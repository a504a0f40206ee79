"""Triton kernels for k-bit group quantization, byte-for-byte the layout of ``quantize.py``.

Each program takes ``GROUPS`` whole groups as a [GROUPS, BYTES, PER_BYTE] tile
(``PER_BYTE = 8 // BITS`` codes per output byte): one masked read of the input,
group min/max and the stored (min, scale) computed in registers, one masked
write of the packed codes and of the per-group metadata. Decoding is the
mirror image. Arithmetic follows the reference step by step (IEEE division via
``div_rn``, IEEE square root via ``sqrt_rn`` for companding, the same integer
hash), so results match it bit for bit.
Importing this module imports triton; ``quantize.py`` imports it only to launch.
"""

import math
import os

import torch
import triton
import triton.language as tl

from aalconvert.kernels.dispatch import launching
from aalconvert.kernels.quantize import NAN_BITS, SUPPORTED_INPUT_DTYPES, seed_keys

# Elements per program: enough work per program while a tile stays in registers.
ELEMENTS_PER_PROGRAM = 4096
MAX_GROUP_SIZE = 16384
_TRITON_SCALE_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def _mix32(h):
    h = h ^ (h >> 16)
    h = (h * 0x7FEB352D) & 0xFFFFFFFF
    h = h ^ (h >> 15)
    h = (h * 0x846CA68B) & 0xFFFFFFFF
    return h ^ (h >> 16)


@triton.jit
def _step_toward(stored, target, DIRECTION: tl.constexpr):
    """Raw int32 bits of fp16/bf16 ``stored``, moved one ulp to the right side of ``target``."""
    value = stored.to(tl.float32)
    if DIRECTION < 0:
        wrong = value > target
        smallest = -0x7FFF
        away_from_zero = value < 0
    else:
        wrong = value < target
        smallest = 0x0001
        away_from_zero = value > 0
    raw = stored.to(tl.int16, bitcast=True).to(tl.int32)
    moved = tl.where(value == 0, smallest, tl.where(away_from_zero, raw + 1, raw - 1))
    return tl.where(wrong, moved, raw)


@triton.jit
def _min_and_step(low, high, LEVELS: tl.constexpr, DTYPE: tl.constexpr):
    """(raw bits, fp32 value) of ``low`` rounded down to DTYPE, and of the step rounded up."""
    min_raw = _step_toward(low.to(DTYPE), low, -1)
    min_value = min_raw.to(tl.int16).to(DTYPE, bitcast=True).to(tl.float32)
    step = tl.div_rn(high - min_value, LEVELS * 1.0)
    scale_raw = _step_toward(step.to(DTYPE), step, 1)
    scale_value = scale_raw.to(tl.int16).to(DTYPE, bitcast=True).to(tl.float32)
    return min_raw, min_value, scale_raw, scale_value


@triton.jit
def _round_to_bfloat16(value):
    """fp32 -> bf16 rounding to nearest even by integer arithmetic, the same on every backend."""
    raw = value.to(tl.int32, bitcast=True)
    rounded = (raw + 0x7FFF + ((raw >> 16) & 1)) >> 16
    # NaN first: GPU maths yields NaN as 0x7FFFFFFF, whose rounding would overflow to -0.0.
    rounded = tl.where(value != value, 0x7FC0, rounded)
    return rounded.to(tl.int16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _quantize_kernel(
    x_ptr,
    codes_ptr,
    mins_ptr,
    scales_ptr,
    numel,
    num_groups,
    nbytes,
    key_low,
    key_high,
    BITS: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    BYTES_BLOCK: tl.constexpr,
    GROUPS: tl.constexpr,
    STOCHASTIC: tl.constexpr,
    SCALE_DTYPE: tl.constexpr,
    NAN_RAW: tl.constexpr,
    SQRT: tl.constexpr,
    WIDE: tl.constexpr,
):
    PER_BYTE: tl.constexpr = 8 // BITS
    BYTES_PER_GROUP: tl.constexpr = GROUP_SIZE * BITS // 8
    LEVELS: tl.constexpr = (1 << BITS) - 1
    pid = tl.program_id(0).to(tl.int64)
    group = pid * GROUPS + tl.arange(0, GROUPS)
    byte = tl.arange(0, BYTES_BLOCK)
    slot = tl.arange(0, PER_BYTE)
    element = (
        group[:, None, None] * GROUP_SIZE + byte[None, :, None] * PER_BYTE + slot[None, None, :]
    )
    valid = (byte[None, :, None] < BYTES_PER_GROUP) & (element < numel)
    x = tl.load(x_ptr + element, mask=valid, other=0.0)
    if x_ptr.dtype.element_ty == tl.bfloat16:  # widened by its bits: subnormals kept on every backend
        x = (x.to(tl.int16, bitcast=True).to(tl.int32) << 16).to(tl.float32, bitcast=True)
    else:
        x = x.to(tl.float32)
    if SQRT:
        root = tl.sqrt_rn(tl.abs(x))
        x = tl.where(x < 0, -root, root)

    low = tl.min(tl.min(tl.where(valid, x, float("inf")), axis=2), axis=1)
    high = tl.max(tl.max(tl.where(valid, x, float("-inf")), axis=2), axis=1)
    nonfinite = valid & ((x != x) | (tl.abs(x) == float("inf")))
    finite = tl.max(tl.max(nonfinite.to(tl.int32), axis=2), axis=1) == 0

    min_raw, min_value, scale_raw, scale_value = _min_and_step(low, high, LEVELS, SCALE_DTYPE)
    good = finite & (tl.abs(min_value) < float("inf")) & (tl.abs(scale_value) < float("inf"))
    if WIDE:  # fp16 groups out of range keep a bf16 pair, flagged by the scale's sign bit
        wide_min_raw, wide_min, wide_scale_raw, wide_scale = _min_and_step(
            low, high, LEVELS, tl.bfloat16
        )
        wide = finite & (good == 0)
        wide = wide & (tl.abs(wide_min) < float("inf")) & (tl.abs(wide_scale) < float("inf"))
        min_raw = tl.where(wide, wide_min_raw, min_raw)
        min_value = tl.where(wide, wide_min, min_value)
        scale_raw = tl.where(wide, wide_scale_raw - 0x8000, scale_raw)
        scale_value = tl.where(wide, wide_scale, scale_value)
        good = good | wide

    group_ok = group < num_groups
    min_raw = tl.where(good, min_raw, NAN_RAW).to(tl.int16)
    scale_raw = tl.where(good, scale_raw, NAN_RAW).to(tl.int16)
    tl.store(mins_ptr + group, min_raw.to(SCALE_DTYPE, bitcast=True), mask=group_ok)
    tl.store(scales_ptr + group, scale_raw.to(SCALE_DTYPE, bitcast=True), mask=group_ok)

    if STOCHASTIC:
        # key_low/key_high mix in as int64 without .to(): a compiled launch turns an integer
        # argument equal to 1 into a constant, which has no .to().
        h = _mix32((element & 0xFFFFFFFF) ^ key_low)
        h = _mix32(h ^ ((element >> 32) & 0xFFFFFFFF) ^ key_high)
        offset = (h >> 8).to(tl.float32) * (1.0 / 16777216.0)
    else:
        offset = 0.5
    usable = (good & (scale_value != 0))[:, None, None]
    safe_scale = tl.where(usable, scale_value[:, None, None], 1.0)
    scaled = tl.div_rn(x - min_value[:, None, None], safe_scale)
    code = tl.minimum(tl.maximum(tl.floor(scaled + offset), 0.0), LEVELS * 1.0)
    if not STOCHASTIC:  # sign preserving: x > 0 above a min of 0 never gets code 0
        lift = (min_value[:, None, None] == 0) & (x > 0)
        code = tl.where(lift, tl.maximum(code, 1.0), code)
    code = tl.where(valid & usable, code, 0.0).to(tl.int32)
    packed = tl.sum(code << (slot[None, None, :] * BITS), axis=2)

    out_byte = group[:, None] * BYTES_PER_GROUP + byte[None, :]
    out_mask = (byte[None, :] < BYTES_PER_GROUP) & (out_byte < nbytes)
    tl.store(codes_ptr + out_byte, packed.to(tl.uint8), mask=out_mask)


@triton.jit
def _dequantize_kernel(
    codes_ptr,
    mins_ptr,
    scales_ptr,
    out_ptr,
    numel,
    num_groups,
    nbytes,
    BITS: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    BYTES_BLOCK: tl.constexpr,
    GROUPS: tl.constexpr,
    SQRT: tl.constexpr,
    WIDE: tl.constexpr,
):
    PER_BYTE: tl.constexpr = 8 // BITS
    BYTES_PER_GROUP: tl.constexpr = GROUP_SIZE * BITS // 8
    CODE_MASK: tl.constexpr = (1 << BITS) - 1
    pid = tl.program_id(0).to(tl.int64)
    group = pid * GROUPS + tl.arange(0, GROUPS)
    byte = tl.arange(0, BYTES_BLOCK)
    slot = tl.arange(0, PER_BYTE)

    in_byte = group[:, None] * BYTES_PER_GROUP + byte[None, :]
    in_mask = (byte[None, :] < BYTES_PER_GROUP) & (in_byte < nbytes)
    packed = tl.load(codes_ptr + in_byte, mask=in_mask, other=0).to(tl.int32)
    code = (packed[:, :, None] >> (slot[None, None, :] * BITS)) & CODE_MASK

    group_ok = group < num_groups
    stored_min = tl.load(mins_ptr + group, mask=group_ok, other=0.0)
    stored_scale = tl.load(scales_ptr + group, mask=group_ok, other=0.0)
    min_value = stored_min.to(tl.float32)
    scale_value = stored_scale.to(tl.float32)
    if WIDE:  # fp16 scales: a set sign bit marks a group whose pair is bf16 bits
        scale_raw = stored_scale.to(tl.int16, bitcast=True)
        wide = scale_raw < 0
        wide_scale = (scale_raw & 0x7FFF).to(tl.int16).to(tl.bfloat16, bitcast=True)
        wide_min = stored_min.to(tl.int16, bitcast=True).to(tl.bfloat16, bitcast=True)
        min_value = tl.where(wide, wide_min.to(tl.float32), min_value)
        scale_value = tl.where(wide, wide_scale.to(tl.float32), scale_value)
    # code * scale is exact in fp32 (<= 8 + 11 significant bits) unless it overflows
    # near the fp32 maximum; the launch disables fusion so that case rounds as the reference.
    decoded = code.to(tl.float32) * scale_value[:, None, None] + min_value[:, None, None]
    if SQRT:
        decoded = decoded * tl.abs(decoded)  # one rounding, as in the reference

    element = (
        group[:, None, None] * GROUP_SIZE + byte[None, :, None] * PER_BYTE + slot[None, None, :]
    )
    valid = (byte[None, :, None] < BYTES_PER_GROUP) & (element < numel)
    if out_ptr.dtype.element_ty == tl.bfloat16:
        decoded = _round_to_bfloat16(decoded)
    tl.store(out_ptr + element, decoded.to(out_ptr.dtype.element_ty), mask=valid)


def _check_device(t: torch.Tensor, name: str) -> None:
    if not (t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        raise RuntimeError(
            f"{name}: the Triton kernel needs a CUDA tensor (or TRITON_INTERPRET=1 on CPU), "
            f"got one on {t.device}; pass backend='reference' to use the torch reference"
        )


def _tile(bits: int, group_size: int) -> tuple[int, int]:
    """(BYTES_BLOCK, GROUPS): padded bytes per group and whole groups per program."""
    if group_size > MAX_GROUP_SIZE:
        raise ValueError(
            f"the Triton kernels keep a group in registers and take group_size <= "
            f"{MAX_GROUP_SIZE}, got {group_size}; use a smaller group or backend='reference'"
        )
    bytes_block = triton.next_power_of_2(group_size * bits // 8)
    groups = max(1, ELEMENTS_PER_PROGRAM // (bytes_block * (8 // bits)))
    return bytes_block, groups


def quantize_triton(
    x: torch.Tensor,
    bits: int,
    group_size: int,
    stochastic: bool,
    scale_dtype: torch.dtype,
    seed: int,
    companding: str = "none",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes, mins, scales) of a float32/float16/bfloat16 tensor of any layout.

    Needs a CUDA tensor (or ``TRITON_INTERPRET=1``); reads ``x`` in logical
    row-major order (a channels_last or strided input is copied to that order).
    ``companding`` ("none" or "sqrt") as in ``quantize.py``.
    """
    if x.dtype not in SUPPORTED_INPUT_DTYPES:
        raise TypeError(f"quantize_triton takes float32/float16/bfloat16, got {x.dtype}")
    if scale_dtype not in _TRITON_SCALE_DTYPES:
        raise TypeError(f"scale_dtype must be torch.float16 or torch.bfloat16, got {scale_dtype}")
    _check_device(x, "quantize_triton")
    bytes_block, groups_per_program = _tile(bits, group_size)
    flat = x.reshape(-1).contiguous()
    numel = flat.numel()
    num_groups = math.ceil(numel / group_size)
    nbytes = math.ceil(numel * bits / 8)
    codes = torch.empty(nbytes, dtype=torch.uint8, device=x.device)
    mins = torch.empty(num_groups, dtype=scale_dtype, device=x.device)
    scales = torch.empty(num_groups, dtype=scale_dtype, device=x.device)
    if numel:
        key_low, key_high = seed_keys(seed)
        grid = (triton.cdiv(num_groups, groups_per_program),)
        with launching("_quantize_kernel", x.device):
            _quantize_kernel[grid](
                flat, codes, mins, scales, numel, num_groups, nbytes, key_low, key_high,
                BITS=bits, GROUP_SIZE=group_size, BYTES_BLOCK=bytes_block,
                GROUPS=groups_per_program, STOCHASTIC=stochastic,
                SCALE_DTYPE=_TRITON_SCALE_DTYPES[scale_dtype], NAN_RAW=NAN_BITS[scale_dtype],
                SQRT=companding == "sqrt", WIDE=scale_dtype == torch.float16,
                enable_fp_fusion=False,  # unfused, as the reference rounds
            )  # fmt: skip
    return codes, mins, scales


def dequantize_triton(
    codes: torch.Tensor,
    mins: torch.Tensor,
    scales: torch.Tensor,
    shape: list[int],
    dtype: torch.dtype,
    bits: int,
    group_size: int,
    companding: str = "none",
) -> torch.Tensor:
    """Decode (codes, mins, scales) into a contiguous tensor of ``shape`` and ``dtype``."""
    if dtype not in SUPPORTED_INPUT_DTYPES:
        raise TypeError(f"dequantize_triton decodes to float32/float16/bfloat16, got {dtype}")
    _check_device(codes, "dequantize_triton")
    bytes_block, groups_per_program = _tile(bits, group_size)
    numel = math.prod(shape)
    num_groups = math.ceil(numel / group_size)
    out = torch.empty(shape, dtype=dtype, device=codes.device)
    if numel:
        grid = (triton.cdiv(num_groups, groups_per_program),)
        with launching("_dequantize_kernel", codes.device):
            _dequantize_kernel[grid](
                codes.contiguous(), mins.contiguous(), scales.contiguous(), out,
                numel, num_groups, codes.numel(),
                BITS=bits, GROUP_SIZE=group_size, BYTES_BLOCK=bytes_block,
                GROUPS=groups_per_program, SQRT=companding == "sqrt",
                WIDE=mins.dtype == torch.float16, enable_fp_fusion=False,  # min + code * scale rounded twice, as the reference does
            )  # fmt: skip
    return out

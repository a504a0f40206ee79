"""k-bit group quantization of tensors kept for backward (ActNN style).

Layout (this torch reference defines it; the Triton kernel matches it byte for byte):

- The input is read in logical row-major order as N elements (strides and
  memory format do not matter). Groups are ``group_size`` consecutive elements;
  the last group may be partial. ``group_size`` is a multiple of 8 so that every
  group starts on a byte boundary of ``codes``.
- Per group, ``mins`` holds the group minimum rounded *down* to ``scale_dtype``
  and ``scales`` the step ``(max - min) / (2**bits - 1)`` (fp32) rounded *up* to
  ``scale_dtype``. Encoding uses these stored values, so every code lies in
  ``[0, 2**bits - 1]`` and nearest rounding decodes within half a step (but for
  the sign-preserving rule below).
- ``code = floor((x - min) / scale + u)`` clamped to ``[0, 2**bits - 1]``, with
  ``u = 0.5`` (nearest) or ``u`` uniform in ``[0, 1)`` (stochastic, unbiased).
  ``u`` is ``(hash(seed, i) >> 8) * 2**-24``: a counter-based 32-bit integer hash
  of the seed and the element index ``i``, computed in int64 masked to 32 bits, so
  the Triton kernel reproduces it exactly.
- Sign preserving (nearest rounding only): in a group whose stored min is 0 (+-0),
  an element ``x > 0`` gets code at least 1. Zero then decodes to exactly zero and
  nothing positive to zero, so the copy of a tensor ``>= 0`` (a ReLU's output)
  holds its exact mask ``x > 0``, and a ReLU can read its backward from the copy
  the next layer keeps (``aalconvert.nn.approx_shared_relu``). Such an element
  errs by less than one step (not half); stochastic rounding is left unbiased.
- Codes are packed densely over the whole tensor, little-endian within a byte:
  code ``i`` sits at bits ``(i % (8 // bits)) * bits`` of byte ``i // (8 // bits)``;
  unused high bits of the last byte are 0. ``codes`` has ``ceil(N * bits / 8)``
  bytes.
- Decoding is ``min + code * scale`` in fp32 (the product is exact), cast to the
  original dtype.

Companding (``companding="sqrt"``, nearest rounding only): the codes, mins and
scales are those of ``y = sign(x) * sqrt(|x|)`` (fp32, correctly rounded sqrt;
``-0`` maps to ``+0``) under exactly the rules above, and decoding squares the
decoded ``y`` back: ``x = y * |y|`` in fp32, then the cast. Levels are spaced
evenly in ``y``, so finely near zero and coarsely in the tails, which suits
heavy-tailed activations. The layout and size are unchanged; only the Python
attribute ``QuantizedTensor.companding`` says how to decode. Nearest rounding
errs by at most half a step of ``y``. Stochastic rounding is unbiased only in
the quantized domain, so it stays uniform (``"sqrt"`` with it is refused).

Wide groups (fp16 scales only): a finite group whose rounded-down min or
rounded-up step overflows fp16 (a minimum below -65504 or a range above about
1.6e7; with companding, below ``x = -65504**2`` or a range of ``y`` that wide)
keeps its min and step in bfloat16 instead, computed by exactly the rules above
with bf16 in place of fp16. ``mins`` then holds the bf16 bits of the min and
``scales`` the bf16 bits of the step with the sign bit set (a real fp16 step is
never negative, so the sign bit marks the group); decoding reads such a group's
pair as bf16. Such a group has bf16's 8-bit precision of min and step (coarser
than fp16's 11, but over a range fp16 cannot hold at all); every other group's
bytes are exactly the plain fp16 layout. So fp16 scales never turn a finite
input into NaN unless the group's range exceeds the fp32 maximum.

Special groups: a group whose elements all equal one value representable in
``scale_dtype`` gets scale 0 and decodes exactly. A group containing inf or NaN,
or whose rounded-down min or rounded-up step overflows (bf16: a range above the
fp32 maximum; fp16: also in bf16, as above), stores NaN as min and scale and
codes 0: the whole group decodes to NaN, and no other group is affected. With
companding these rules apply to ``y``: a constant group decodes exactly when
``sqrt(|x|)`` is representable in ``scale_dtype`` (0, 1, 2.25, 4, ...; other
constants decode within the rounding of ``y``).
"""

import math
from dataclasses import dataclass

import torch

from aalconvert.kernels.dispatch import call_op, triton_module, use_cpu_path, use_triton

SUPPORTED_BITS = (8, 4, 2)
SUPPORTED_INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SUPPORTED_SCALE_DTYPES = (torch.float16, torch.bfloat16)
# "none": levels evenly spaced in x; "sqrt": evenly spaced in sign(x) * sqrt(|x|).
COMPANDINGS = ("none", "sqrt")
SEED_LIMIT = 2**63
# The NaN stored as min and scale of a group holding inf/NaN (quiet NaN, no payload).
NAN_BITS = {torch.float16: 0x7E00, torch.bfloat16: 0x7FC0}
_MASK32 = 0xFFFFFFFF


@dataclass(frozen=True)
class QuantizedTensor:
    """A tensor quantized to ``bits`` per element with one (min, scale) per group."""

    codes: torch.Tensor
    mins: torch.Tensor
    scales: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    bits: int
    group_size: int
    companding: str = "none"

    @property
    def nbytes(self) -> int:
        """Bytes held by codes, mins and scales together."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(codes, mins, scales), to pass to ``ctx.save_for_backward``."""
        return self.codes, self.mins, self.scales

    @classmethod
    def from_tensors(
        cls,
        tensors: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        shape: torch.Size | tuple[int, ...],
        dtype: torch.dtype,
        bits: int,
        group_size: int,
        companding: str = "none",
    ) -> "QuantizedTensor":
        """Rebuild from ``tensors()`` (e.g. ``ctx.saved_tensors``) and the metadata."""
        codes, mins, scales = tensors
        return cls(codes, mins, scales, torch.Size(shape), dtype, bits, group_size, companding)


def quantized_nbytes(
    numel: int, bits: int, group_size: int, scale_dtype: torch.dtype = torch.float16
) -> int:
    """Bytes of a ``QuantizedTensor`` for ``numel`` elements: codes plus min and scale per group."""
    _check_bits_and_group_size(bits, group_size)
    groups = math.ceil(numel / group_size)
    return math.ceil(numel * bits / 8) + 2 * groups * _itemsize(scale_dtype)


def quantize(
    x: torch.Tensor,
    bits: int = 4,
    *,
    group_size: int = 256,
    stochastic: bool = False,
    scale_dtype: torch.dtype = torch.float16,
    seed: int | None = None,
    companding: str = "none",
    backend: str = "auto",
) -> QuantizedTensor:
    """Quantize ``x`` to ``bits`` (8, 4 or 2) per element in groups of ``group_size`` elements.

    Nearest rounding errs by at most half a step; stochastic rounding is unbiased
    and reproducible from ``seed`` (``None`` draws one from torch's default generator).
    ``companding="sqrt"`` (nearest only) quantizes ``sign(x) * sqrt(|x|)`` instead
    of ``x`` (see the module docstring).
    """
    check_quantize_arguments(x, bits, group_size, scale_dtype)
    check_companding(companding, stochastic)
    if seed is None:
        seed = int(torch.randint(0, SEED_LIMIT - 1, ()).item()) if stochastic else 0
    if not (isinstance(seed, int) and 0 <= seed < SEED_LIMIT):
        raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
    codes, mins, scales = call_op(
        torch.ops.aalconvert.quantize_groups, quantize_groups_impl,
        x, bits, group_size, stochastic, scale_dtype, seed, companding, backend,
    )  # fmt: skip
    return QuantizedTensor(codes, mins, scales, x.shape, x.dtype, bits, group_size, companding)


def dequantize(q: QuantizedTensor, *, backend: str = "auto") -> torch.Tensor:
    """Decode ``q`` into a contiguous tensor of its original shape and dtype."""
    check_quantized_tensors(q.codes, q.mins, q.scales, q.shape, q.bits, q.group_size)
    check_companding(q.companding, stochastic=False)
    return call_op(
        torch.ops.aalconvert.dequantize_groups, dequantize_groups_impl,
        q.codes, q.mins, q.scales, list(q.shape), q.dtype, q.bits, q.group_size,
        q.companding, backend,
    )  # fmt: skip


def check_companding(companding: str, stochastic: bool) -> None:
    """Raise a clear error for an unknown companding, or ``"sqrt"`` with stochastic rounding."""
    if companding not in COMPANDINGS:
        raise ValueError(f"companding must be one of {COMPANDINGS}, got {companding!r}")
    if companding == "sqrt" and stochastic:
        raise ValueError(
            "companding='sqrt' applies to nearest rounding only: stochastic rounding is "
            "unbiased in the quantized domain, so it stays uniform; pass companding='none'"
        )


def check_quantize_arguments(
    x: torch.Tensor, bits: int, group_size: int, scale_dtype: torch.dtype
) -> None:
    """Raise a clear error when ``quantize`` cannot take these arguments."""
    _check_bits_and_group_size(bits, group_size)
    if x.dtype not in SUPPORTED_INPUT_DTYPES:
        raise TypeError(
            f"quantize takes a float32, float16 or bfloat16 tensor, got {x.dtype}; "
            "convert it first (e.g. x.float())"
        )
    if scale_dtype not in SUPPORTED_SCALE_DTYPES:
        raise TypeError(f"scale_dtype must be torch.float16 or torch.bfloat16, got {scale_dtype}")


def check_quantized_tensors(
    codes: torch.Tensor,
    mins: torch.Tensor,
    scales: torch.Tensor,
    shape: torch.Size | tuple[int, ...],
    bits: int,
    group_size: int,
) -> None:
    """Raise a clear error when codes/mins/scales do not describe ``shape`` at ``bits``."""
    _check_bits_and_group_size(bits, group_size)
    numel = math.prod(shape)
    groups = math.ceil(numel / group_size)
    if codes.dtype != torch.uint8 or codes.numel() != math.ceil(numel * bits / 8):
        raise ValueError(
            f"codes must be uint8 with {math.ceil(numel * bits / 8)} bytes for shape "
            f"{tuple(shape)} at {bits} bits, got {codes.dtype} with {codes.numel()}"
        )
    for name, t in (("mins", mins), ("scales", scales)):
        if t.dtype not in SUPPORTED_SCALE_DTYPES or t.numel() != groups:
            raise ValueError(
                f"{name} must be float16/bfloat16 with {groups} groups for shape "
                f"{tuple(shape)} and group_size {group_size}, got {t.dtype} with {t.numel()}"
            )


def _check_bits_and_group_size(bits: int, group_size: int) -> None:
    if isinstance(bits, bool) or bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")
    if (
        isinstance(group_size, bool)
        or not isinstance(group_size, int)
        or group_size <= 0
        or group_size % 8
    ):
        raise ValueError(f"group_size must be a positive multiple of 8, got {group_size!r}")


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# ---------------------------------------------------------------- implementation


def quantize_groups_impl(
    x: torch.Tensor,
    bits: int,
    group_size: int,
    stochastic: bool,
    scale_dtype: torch.dtype,
    seed: int,
    companding: str,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes, mins, scales) of ``x``: the Triton kernel, the CPU path or the reference, per ``backend``."""
    if use_triton(x, backend):
        launcher = triton_module("triton_quantize", "_quantize_kernel").quantize_triton
        return launcher(x, bits, group_size, stochastic, scale_dtype, seed, companding)
    if use_cpu_path(x, backend):
        from aalconvert.kernels.quantize_cpu import quantize_cpu  # it imports this module

        return quantize_cpu(x, bits, group_size, stochastic, scale_dtype, seed, companding)
    return quantize_reference(x, bits, group_size, stochastic, scale_dtype, seed, companding)


def dequantize_groups_impl(
    codes: torch.Tensor,
    mins: torch.Tensor,
    scales: torch.Tensor,
    shape: list[int],
    dtype: torch.dtype,
    bits: int,
    group_size: int,
    companding: str,
    backend: str,
) -> torch.Tensor:
    """Decoded tensor of ``shape`` and ``dtype``: the Triton kernel, the CPU path or the reference."""
    if use_triton(codes, backend):
        launcher = triton_module("triton_quantize", "_dequantize_kernel").dequantize_triton
        return launcher(codes, mins, scales, shape, dtype, bits, group_size, companding)
    if use_cpu_path(codes, backend):
        from aalconvert.kernels.quantize_cpu import dequantize_cpu  # it imports this module

        return dequantize_cpu(codes, mins, scales, shape, dtype, bits, group_size, companding)
    return dequantize_reference(codes, mins, scales, shape, dtype, bits, group_size, companding)


# mix32's rounds (xor with the value shifted right, then multiply mod 2**32) and its last xor-shift;
# the Triton kernel spells the same constants out (``triton_quantize._mix32``).
MIX32_ROUNDS = ((16, 0x7FEB352D), (15, 0x846CA68B))
MIX32_LAST_SHIFT = 16


def mix32(h: torch.Tensor | int) -> torch.Tensor | int:
    """A 32-bit integer finalizer (xor-shift-multiply), on int64 values kept below 2**32."""
    for shift, multiplier in MIX32_ROUNDS:
        h = h ^ (h >> shift)
        h = (h * multiplier) & _MASK32
    return h ^ (h >> MIX32_LAST_SHIFT)


def seed_keys(seed: int) -> tuple[int, int]:
    """Two 32-bit keys derived from a 63-bit seed, mixed into every element's hash."""
    return mix32(seed & _MASK32), mix32(((seed >> 32) & _MASK32) ^ 0x5BD1E995)


def uniform_from_index(index: torch.Tensor, key_low: int, key_high: int) -> torch.Tensor:
    """Uniform fp32 values in [0, 1), multiples of 2**-24, one per int64 element index."""
    h = mix32((index & _MASK32) ^ key_low)
    h = mix32(h ^ ((index >> 32) & _MASK32) ^ key_high)
    return (h >> 8).to(torch.float32) * 2.0**-24


def step_toward(stored: torch.Tensor, target: torch.Tensor, direction: int) -> torch.Tensor:
    """Where ``stored`` (fp16/bf16) lies on the wrong side of fp32 ``target``, move it one ulp.

    ``direction`` -1 makes ``stored <= target`` (round down), +1 makes ``stored >= target``.
    """
    wrong = stored.float() > target if direction < 0 else stored.float() < target
    raw = stored.view(torch.int16).to(torch.int32)
    # Sign-magnitude: adding 1 to the raw bits moves away from zero on either side.
    away_from_zero = (stored > 0) == (direction > 0)
    smallest = 0x0001 if direction > 0 else -0x7FFF  # +-smallest subnormal, from +-0
    moved = torch.where(stored == 0, smallest, torch.where(away_from_zero, raw + 1, raw - 1))
    raw = torch.where(wrong, moved, raw)
    return raw.to(torch.int16).view(stored.dtype)


def quantize_reference(
    x: torch.Tensor,
    bits: int,
    group_size: int,
    stochastic: bool,
    scale_dtype: torch.dtype,
    seed: int,
    companding: str = "none",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pure-torch (codes, mins, scales) of ``x``; defines the layout."""
    flat = x.reshape(-1).to(torch.float32)
    if companding == "sqrt":
        flat = compand(flat)
    numel = flat.numel()
    groups = math.ceil(numel / group_size)
    pad = groups * group_size - numel
    levels = 2**bits - 1

    # The last group is padded with copies of its own first element, which change neither
    # its min, its max nor its finiteness; the padding's codes are dropped when packing.
    if pad:
        flat = torch.cat([flat, flat[(groups - 1) * group_size].expand(pad)])
    padded = flat.view(groups, group_size)
    low = padded.amin(dim=1)
    high = padded.amax(dim=1)
    finite = padded.isfinite().all(dim=1)

    mins, scales, min_value, scale_value, usable = group_pairs(low, high, finite, levels, scale_dtype)
    if stochastic:
        index = torch.arange(groups * group_size, device=x.device, dtype=torch.int64)
        offset = uniform_from_index(index, *seed_keys(seed)).view(groups, group_size)
    else:
        offset = 0.5
    scaled = (padded - min_value[:, None]) / scale_value[:, None]
    codes = torch.floor(scaled + offset).clamp(0, levels)
    if not stochastic:  # sign preserving (module docstring)
        codes = torch.where((min_value[:, None] == 0) & (padded > 0), codes.clamp_min(1), codes)
    codes = torch.where(usable[:, None], codes, 0).to(torch.uint8).reshape(-1)
    return pack_codes(codes, numel, bits), mins, scales


def group_pairs(
    low: torch.Tensor, high: torch.Tensor, finite: torch.Tensor, levels: int, scale_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per group from its fp32 min, max and finiteness: the stored (mins, scales), the fp32
    (min, step) that encoding divides by, and whether the group gets codes at all (not a
    NaN group and not a constant one)."""
    mins, scales = _min_and_step(low, high, levels, scale_dtype)
    good = finite & mins.isfinite() & scales.isfinite()
    min_value, scale_value = mins.float(), scales.float()
    min_raw, scale_raw = mins.view(torch.int16), scales.view(torch.int16)
    needs_wide = finite & ~good if scale_dtype == torch.float16 else None
    if needs_wide is not None and needs_wide.any():  # the bf16 pair, flagged by the scale's sign bit
        wide_mins, wide_scales = _min_and_step(low, high, levels, torch.bfloat16)
        wide = needs_wide & wide_mins.isfinite() & wide_scales.isfinite()
        min_value = torch.where(wide, wide_mins.float(), min_value)
        scale_value = torch.where(wide, wide_scales.float(), scale_value)
        min_raw = torch.where(wide, wide_mins.view(torch.int16), min_raw)
        flagged = (wide_scales.view(torch.int16).to(torch.int32) - 0x8000).to(torch.int16)
        scale_raw = torch.where(wide, flagged, scale_raw)
        good = good | wide
    if not good.all():
        nan = torch.tensor(NAN_BITS[scale_dtype], dtype=torch.int16, device=low.device)
        min_raw, scale_raw = torch.where(good, min_raw, nan), torch.where(good, scale_raw, nan)
    mins, scales = min_raw.view(scale_dtype), scale_raw.view(scale_dtype)
    return mins, scales, min_value, scale_value, good & (scale_value != 0)


def dequantize_reference(
    codes: torch.Tensor,
    mins: torch.Tensor,
    scales: torch.Tensor,
    shape: list[int],
    dtype: torch.dtype,
    bits: int,
    group_size: int,
    companding: str = "none",
) -> torch.Tensor:
    """Pure-torch decoding of (codes, mins, scales) into ``shape`` and ``dtype``."""
    numel = math.prod(shape)
    groups = math.ceil(numel / group_size)
    unpacked = unpack_codes(codes, bits)
    # Pad or crop the codes to whole groups so each row meets its (min, scale).
    unpacked = torch.nn.functional.pad(unpacked, (0, groups * group_size - unpacked.numel()))
    unpacked = unpacked.view(groups, group_size).to(torch.float32)
    min_value, scale_value = decoded_min_and_step(mins, scales)
    decoded = unpacked * scale_value[:, None] + min_value[:, None]
    if companding == "sqrt":
        decoded = decoded.mul_(decoded.abs())
    return decoded.reshape(-1)[:numel].to(dtype).reshape(shape)


def _min_and_step(
    low: torch.Tensor, high: torch.Tensor, levels: int, scale_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group: ``low`` rounded down to ``scale_dtype`` and the step from it rounded up."""
    mins = step_toward(low.to(scale_dtype), low, -1)
    step = (high - mins.float()) / levels
    return mins, step_toward(step.to(scale_dtype), step, +1)


def decoded_min_and_step(
    mins: torch.Tensor, scales: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 (min, step) of each group as decoding uses them (a wide fp16 group's pair read as bf16)."""
    min_value, scale_value = mins.float(), scales.float()
    wide = scales.view(torch.int16) < 0 if scales.dtype == torch.float16 else None
    if wide is not None and wide.any():
        scale_raw = scales.view(torch.int16)
        wide_scale = (scale_raw & 0x7FFF).view(torch.bfloat16).float()
        min_value = torch.where(wide, mins.view(torch.bfloat16).float(), min_value)
        scale_value = torch.where(wide, wide_scale, scale_value)
    return min_value, scale_value


def compand(x: torch.Tensor) -> torch.Tensor:
    """``sign(x) * sqrt(|x|)`` of fp32 ``x`` (``-0`` gives ``+0``): the domain ``"sqrt"`` quantizes."""
    # torch's fp32 sqrt on CPU is not always correctly rounded (about 17% of values
    # one ulp off in torch 2.13), so take it in fp64 and round once: a 53-bit
    # sqrt rounded to 24 bits is the correctly rounded fp32 sqrt, as Triton's
    # sqrt_rn is. Adding +0 turns -0 into +0.
    root = x.abs().double().sqrt_().float()
    return root.copysign_(x).add_(0.0)


def unpack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """One uint8 code per slot of the packed bytes (``pack_codes``' layout, little-endian)."""
    if bits == 8:
        return codes
    shifts = torch.arange(0, 8, bits, device=codes.device, dtype=torch.uint8)
    return ((codes.view(-1, 1) >> shifts) & (2**bits - 1)).reshape(-1)


def pack_codes(codes: torch.Tensor, numel: int, bits: int) -> torch.Tensor:
    per_byte = 8 // bits
    nbytes = math.ceil(numel * bits / 8)
    codes = torch.nn.functional.pad(codes[:numel], (0, nbytes * per_byte - numel))
    codes = codes.view(nbytes, per_byte)
    packed = codes[:, 0].clone()
    for j in range(1, per_byte):
        packed |= codes[:, j] << (j * bits)
    return packed

"""The k-bit group quantizer for CPU tensors: the reference's bytes in fewer passes.

``quantize_reference`` defines the layout one readable step at a time; on CPU,
where it also ran every training step, that cost more than the step's own
matmuls (a ViT example spent 45 % of an ``approx4`` step in it). This is the
same arithmetic, in the same fp32 rounding order, arranged for memory traffic:

- the companding root comes from numpy's float32 sqrt, which is IEEE's
  correctly rounded one (torch's CPU fp32 sqrt is an ulp off on about 0.7 % of
  values, so the reference takes it in fp64);
- a group's finiteness is read off its min and max (``amin``/``amax`` propagate
  NaN, and an infinity is its group's min or max) instead of a separate pass;
- full groups are a view, and only the short last group is handled apart,
  instead of padding a copy of the whole tensor;
- codes are computed in place on one buffer and truncated to ``uint8``, which
  equals the reference's floor because every scaled value is at least 0;
- stochastic rounding's noise hashes each element's index in numpy's wrapping
  uint32 arithmetic, in place, where the reference's int64 torch ops masked
  to 32 bits took nine tenths of a 4-bit quantization.

Tests hold it to the reference byte for byte (``tests/test_kernels_quantize.py``).
"""

import math

import numpy as np
import torch

from aalconvert.kernels import cpu_native
from aalconvert.kernels.quantize import (
    MIX32_LAST_SHIFT,
    MIX32_ROUNDS,
    decoded_min_and_step,
    dequantize_reference,
    group_pairs,
    quantize_reference,
    seed_keys,
    uniform_from_index,
    unpack_codes,
)


def quantize_cpu(
    x: torch.Tensor,
    bits: int,
    group_size: int,
    stochastic: bool,
    scale_dtype: torch.dtype,
    seed: int,
    companding: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes, mins, scales) of CPU tensor ``x``, byte for byte ``quantize_reference``'s."""
    if x.numel() == 0:
        return quantize_reference(x, bits, group_size, stochastic, scale_dtype, seed, companding)
    flat = x.reshape(-1).to(torch.float32).contiguous()
    if cpu_native.library() is not None:
        return _quantize_native(flat, bits, group_size, stochastic, scale_dtype, seed, companding)
    owned = flat.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()
    if companding == "sqrt":
        flat, owned = _compand(flat), True
    numel = flat.numel()
    levels = 2**bits - 1
    rows = _group_rows(flat, group_size)
    low, high = _group_bounds(rows)
    codes = torch.empty(math.ceil(numel * bits / 8), dtype=torch.uint8)
    finite = low.isfinite() & high.isfinite()
    mins, scales, min_value, scale_value, usable = group_pairs(low, high, finite, levels, scale_dtype)
    start_group = start = 0
    for row in rows:
        end_group = start_group + row.shape[0]
        end = start + row.numel()
        offset = 0.5
        if stochastic:
            offset = _uniform(start, end, seed).view(row.shape)
        unused = ~usable[start_group:end_group]
        lifted = None if stochastic else _sign_preserving_lift(row, min_value[start_group:end_group], unused)
        # A buffer of our own (a converted or companded copy) is overwritten in place.
        scaled = row.sub_(min_value[start_group:end_group, None]) if owned else torch.sub(
            row, min_value[start_group:end_group, None]
        )
        scaled.div_(scale_value[start_group:end_group, None]).add_(offset)
        if lifted is not None:  # max(floor(s), 1) = floor(max(s, 1))
            torch.maximum(scaled, lifted, out=scaled)
        if unused.any():  # NaN and constant groups: codes 0, whatever the division gave
            scaled[unused] = 0
        scaled.floor_().clamp_(0, levels)
        codes[start * bits // 8 : math.ceil(end * bits / 8)] = _bytes_of_codes(scaled, bits)
        start_group, start = end_group, end
    return codes, mins, scales


def _quantize_native(
    flat: torch.Tensor,
    bits: int,
    group_size: int,
    stochastic: bool,
    scale_dtype: torch.dtype,
    seed: int,
    companding: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``quantize_cpu`` through the compiled passes: bounds, pairs, then codes, with no tensor of the
    input's size in between (companded values are made chunk by chunk inside the passes)."""
    companded = companding == "sqrt"
    if companded:
        low, high = cpu_native.companded_bounds(flat, group_size)
    else:
        low, high = _group_bounds(_group_rows(flat, group_size))
    mins, scales, min_value, scale_value, flags = cpu_native.group_pairs(
        low, high, 2**bits - 1, scale_dtype, lift=not stochastic)
    codes = torch.empty(math.ceil(flat.numel() * bits / 8), dtype=torch.uint8)
    noise = _uniform(0, flat.numel(), seed) if stochastic else None
    cpu_native.encode_groups(flat, group_size, bits, companded, min_value, scale_value, flags, noise, codes)
    return codes, mins, scales


def _uniform(start: int, end: int, seed: int) -> torch.Tensor:
    """``uniform_from_index`` of the indices ``start`` to ``end``, the same values.

    Below 2**32 an index's high word is 0, so the second round mixes in the key
    alone; ``mix32``'s multiply-then-mask is uint32's own wrapping multiply."""
    key_low, key_high = seed_keys(seed)
    if end > 2**32:
        return uniform_from_index(torch.arange(start, end, dtype=torch.int64), key_low, key_high)
    h = np.arange(start, end, dtype=np.uint32)
    shifted = np.empty_like(h)
    h ^= np.uint32(key_low)
    _mix32_in_place(h, shifted)
    h ^= np.uint32(key_high)
    _mix32_in_place(h, shifted)
    h >>= np.uint32(8)
    uniform = h.astype(np.float32)
    uniform *= np.float32(2.0**-24)
    return torch.from_numpy(uniform)


def _mix32_in_place(h: np.ndarray, shifted: np.ndarray) -> None:
    """``quantize.mix32`` on uint32 ``h``, in place (``shifted``: a buffer of its size)."""
    for shift, multiplier in MIX32_ROUNDS:
        np.right_shift(h, shift, out=shifted)
        h ^= shifted
        h *= np.uint32(multiplier)
    np.right_shift(h, MIX32_LAST_SHIFT, out=shifted)
    h ^= shifted


def _sign_preserving_lift(row: torch.Tensor, min_value: torch.Tensor, unused: torch.Tensor) -> torch.Tensor | None:
    """1 where nearest rounding must give at least code 1 (``x > 0`` in a usable group whose
    stored min is 0: ``quantize.py``'s sign-preserving rule), else 0 or -1 (NaN only in unused
    groups, whose codes are zeroed); None when no group has min 0.

    ``sign(x - t)`` with ``t`` 0 or inf per group: two passes, half the cost of a bool mask
    combined per group and converted."""
    zero_min = (min_value == 0) & ~unused
    if not zero_min.any():
        return None
    threshold = torch.where(zero_min, 0.0, float("inf"))
    return torch.sub(row, threshold[:, None]).sign_()


def _bytes_of_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Whole-number fp32 codes combined per byte, little-endian, still in fp32 (exact below 256).

    Combining before the one conversion to uint8 halves (4 bits) or quarters (2 bits)
    the elements converted, the slowest pass on CPU.
    """
    per_byte = 8 // bits
    flat = codes.view(-1)
    if flat.numel() % per_byte:  # only a short last group: its high bits are 0
        flat = torch.nn.functional.pad(flat, (0, per_byte - flat.numel() % per_byte))
    lanes = flat.view(-1, per_byte)
    if per_byte == 1:
        return flat
    combined = torch.add(lanes[:, 0], lanes[:, 1], alpha=2**bits)
    for lane in range(2, per_byte):
        combined.add_(lanes[:, lane], alpha=2 ** (lane * bits))
    return combined


def dequantize_cpu(
    codes: torch.Tensor,
    mins: torch.Tensor,
    scales: torch.Tensor,
    shape: list[int],
    dtype: torch.dtype,
    bits: int,
    group_size: int,
    companding: str,
) -> torch.Tensor:
    """``dequantize_reference`` of CPU tensors: unpack, then scale and shift in place."""
    numel = math.prod(shape)
    if numel == 0:
        return dequantize_reference(codes, mins, scales, shape, dtype, bits, group_size, companding)
    if cpu_native.library() is not None:
        min_value, scale_value = cpu_native.decode_pairs(mins.contiguous(), scales.contiguous())
        values = cpu_native.decode_groups(codes.contiguous(), numel, group_size, bits, min_value, scale_value,
                                          companding == "sqrt")
        return values.to(dtype).reshape(shape)
    min_value, scale_value = decoded_min_and_step(mins, scales)
    values = unpack_codes(codes, bits)[:numel].to(torch.float32)
    start_group = 0
    for row in _group_rows(values, group_size):
        end_group = start_group + row.shape[0]
        row.mul_(scale_value[start_group:end_group, None])
        row.add_(min_value[start_group:end_group, None])
        start_group = end_group
    if companding == "sqrt":
        decoded = values.numpy()  # numpy's abs: several times torch's on CPU
        with np.errstate(all="ignore"):  # overflow to inf, as torch's product gives, unwarned
            np.multiply(decoded, np.abs(decoded), out=decoded)
    return values.to(dtype).reshape(shape)


def _group_bounds(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group, its min and max (NaN where it holds one: ``amin``/``amax`` propagate it)."""
    return torch.cat([row.amin(dim=1) for row in rows]), torch.cat([row.amax(dim=1) for row in rows])


def _group_rows(flat: torch.Tensor, group_size: int) -> list[torch.Tensor]:
    """Views of ``flat`` as (groups, group_size) rows: the full groups, then the short last one."""
    full = flat.numel() // group_size * group_size
    rows = [flat[:full].view(-1, group_size)] if full else []
    if full < flat.numel():
        rows.append(flat[full:].view(1, -1))
    return rows


def _compand(flat: torch.Tensor) -> torch.Tensor:
    """``sign(x) * sqrt(|x|)`` of fp32 ``flat``, correctly rounded, ``-0`` giving ``+0``."""
    source = flat.detach().numpy()
    root = np.abs(source)
    np.sqrt(root, out=root)
    np.copysign(root, source, out=root)
    root += 0.0
    return torch.from_numpy(root)

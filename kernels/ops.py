"""The kernels as torch.library custom ops, with fake implementations.

Fake tensors, ``torch.compile`` and FSDP see ``aalconvert::pack_bits``,
``aalconvert::unpack_bits``, ``aalconvert::quantize_groups`` and
``aalconvert::dequantize_groups`` as opaque ops with known output shapes.
Registering them does not import triton: the real implementations import it
only when they launch a kernel.
"""

import math

import torch

from aalconvert.kernels.bitpack import pack_bits_impl, packed_nbytes, unpack_bits_impl
from aalconvert.kernels.quantize import dequantize_groups_impl, quantize_groups_impl


@torch.library.custom_op("aalconvert::pack_bits", mutates_args=())
def pack_bits_op(x: torch.Tensor, backend: str) -> torch.Tensor:
    """``x > 0`` (or a bool ``x``) packed into ceil(numel / 8) uint8 bytes."""
    return pack_bits_impl(x, backend)


@pack_bits_op.register_fake
def _(x: torch.Tensor, backend: str) -> torch.Tensor:
    return x.new_empty(packed_nbytes(x.numel()), dtype=torch.uint8)


@torch.library.custom_op("aalconvert::unpack_bits", mutates_args=())
def unpack_bits_op(
    packed: torch.Tensor, shape: list[int], decode: str, dtype: torch.dtype, backend: str
) -> torch.Tensor:
    """Bits from ``pack_bits`` decoded into a contiguous tensor of ``shape`` and ``dtype``."""
    return unpack_bits_impl(packed, shape, decode, dtype, backend)


@unpack_bits_op.register_fake
def _(
    packed: torch.Tensor, shape: list[int], decode: str, dtype: torch.dtype, backend: str
) -> torch.Tensor:
    return packed.new_empty(shape, dtype=dtype)


@torch.library.custom_op("aalconvert::quantize_groups", mutates_args=())
def quantize_groups_op(
    x: torch.Tensor,
    bits: int,
    group_size: int,
    stochastic: bool,
    scale_dtype: torch.dtype,
    seed: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes, mins, scales) of ``x`` quantized to ``bits`` in groups of ``group_size``."""
    return quantize_groups_impl(x, bits, group_size, stochastic, scale_dtype, seed, backend)


@quantize_groups_op.register_fake
def _(
    x: torch.Tensor,
    bits: int,
    group_size: int,
    stochastic: bool,
    scale_dtype: torch.dtype,
    seed: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    numel = x.numel()
    groups = math.ceil(numel / group_size)
    codes = x.new_empty(math.ceil(numel * bits / 8), dtype=torch.uint8)
    return codes, x.new_empty(groups, dtype=scale_dtype), x.new_empty(groups, dtype=scale_dtype)


@torch.library.custom_op("aalconvert::dequantize_groups", mutates_args=())
def dequantize_groups_op(
    codes: torch.Tensor,
    mins: torch.Tensor,
    scales: torch.Tensor,
    shape: list[int],
    dtype: torch.dtype,
    bits: int,
    group_size: int,
    backend: str,
) -> torch.Tensor:
    """The tensor of ``shape`` and ``dtype`` that (codes, mins, scales) encode."""
    return dequantize_groups_impl(codes, mins, scales, shape, dtype, bits, group_size, backend)


@dequantize_groups_op.register_fake
def _(
    codes: torch.Tensor,
    mins: torch.Tensor,
    scales: torch.Tensor,
    shape: list[int],
    dtype: torch.dtype,
    bits: int,
    group_size: int,
    backend: str,
) -> torch.Tensor:
    return codes.new_empty(shape, dtype=dtype)

"""1-bit packing of masks and signs.

Byte layout (the reference defines it, Triton matches it byte for byte):
the input is read in logical row-major order as N elements; element ``i`` is
bit ``i % 8`` (least significant first) of byte ``i // 8``. A bit is 1 where a
bool input is True or a float input is ``> 0``; so 0, -0.0, negatives and NaN
give 0. Unused high bits of the last byte are 0. The packed tensor is uint8
of ``ceil(N / 8)`` bytes, whatever the input's shape, strides or dtype.

Unpacking decodes each bit as ``bool`` (False/True), ``binary`` (0/1) or
``sign`` (-1/+1, so x <= 0 decodes to -1) in the caller's dtype.
"""

import math
import sys

import numpy as np
import torch

from aalconvert.kernels.dispatch import call_op, triton_module, use_cpu_path, use_triton

DECODINGS = ("bool", "binary", "sign")
_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)
# Packing eight 0/1 bytes at once: read them as one little-endian int64 v (byte j
# is bit j); v * _GATHER has bit j of v's byte j at bit 56 + j, with no other
# term reaching bits 56..63, so (v * _GATHER) >> 56 is the packed byte (the
# product wraps modulo 2**64, which leaves those bits alone). Unpacking looks
# each byte up in a 256 x 8 table. Both are several times faster on CPU than a
# per-bit multiply-and-sum and give the same bytes (tests/test_kernels_bitpack.py).
_GATHER = 0x0102040810204080
_UNPACK_TABLE = (torch.arange(256, dtype=torch.uint8).view(-1, 1) & _BIT_WEIGHTS) != 0
assert sys.byteorder == "little", "the int64 view of eight mask bytes assumes a little-endian machine"


def packed_nbytes(numel: int) -> int:
    """Bytes that ``pack_bits`` produces for ``numel`` elements."""
    return math.ceil(numel / 8)


def _bits_of(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.bool else x > 0


def _pack_reference(x: torch.Tensor) -> torch.Tensor:
    bits = _bits_of(x).reshape(-1)
    pad = (-bits.numel()) % 8
    # whole, 8-byte aligned int64 words on a stride-1 buffer (reshape leaves an empty view's stride)
    if pad or bits.storage_offset() % 8 or bits.stride(0) != 1:
        bits = torch.cat([bits, bits.new_zeros(pad)])
    words = bits.view(torch.uint8).view(torch.int64)
    return ((words * _GATHER) >> 56).to(torch.uint8)


def _unpack_reference(packed: torch.Tensor, numel: int) -> torch.Tensor:
    table = _UNPACK_TABLE.to(packed.device)
    return table.index_select(0, packed.int()).reshape(-1)[:numel]


# The CPU path: numpy's packbits/unpackbits with little-endian bit order are this
# layout exactly, and run 4-5 times faster than the reference's torch ops.


def _pack_cpu(x: torch.Tensor) -> torch.Tensor:
    bits = _bits_of(x).reshape(-1).detach()
    return _owned_by_torch(np.packbits(bits.numpy(), bitorder="little"))


def _unpack_cpu(packed: torch.Tensor, numel: int) -> torch.Tensor:
    bits = np.unpackbits(packed.detach().numpy(), count=numel, bitorder="little")
    return _owned_by_torch(bits).view(torch.bool)


def _owned_by_torch(array: np.ndarray) -> torch.Tensor:
    """``array`` copied into torch's allocator, where memory accounting (the profiler, inspect) sees it."""
    return torch.empty(array.shape, dtype=torch.uint8).copy_(torch.from_numpy(array))


def pack_bits(x: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Pack ``x > 0`` (or a bool ``x``) into ``ceil(x.numel() / 8)`` uint8 bytes."""
    check_pack_input(x)
    return call_op(torch.ops.aalconvert.pack_bits, pack_bits_impl, x, backend)


def unpack_bits(
    packed: torch.Tensor,
    shape: torch.Size | tuple[int, ...],
    *,
    decode: str = "bool",
    dtype: torch.dtype = torch.float32,
    backend: str = "auto",
) -> torch.Tensor:
    """Unpack bytes from ``pack_bits`` into a contiguous tensor of ``shape``.

    ``decode`` is ``bool`` (dtype ignored), ``binary`` (0/1) or ``sign`` (-1/+1).
    """
    if decode not in DECODINGS:
        raise ValueError(f"decode must be one of {DECODINGS}, got {decode!r}")
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack_bits takes the uint8 tensor from pack_bits, got {packed.dtype}")
    numel = math.prod(shape)
    if packed.numel() != packed_nbytes(numel):
        raise ValueError(
            f"{packed.numel()} packed bytes cannot hold shape {tuple(shape)}: "
            f"expected {packed_nbytes(numel)}"
        )
    out_dtype = torch.bool if decode == "bool" else dtype
    return call_op(
        torch.ops.aalconvert.unpack_bits, unpack_bits_impl, packed, list(shape), decode, out_dtype, backend
    )


def check_pack_input(x: torch.Tensor) -> None:
    """Raise a clear error when ``pack_bits`` cannot take ``x``."""
    if x.dtype != torch.bool and not x.is_floating_point():
        raise TypeError(
            f"pack_bits takes a bool or floating-point tensor, got {x.dtype}; "
            "compare it first (e.g. x != 0)"
        )


def pack_bits_impl(x: torch.Tensor, backend: str) -> torch.Tensor:
    """Packed bits of ``x``: the Triton kernel, the CPU path or the reference, per ``backend``."""
    if use_triton(x, backend):
        return triton_module("triton_bitpack", "_pack_bits_kernel").pack_bits_triton(x)
    return _pack_cpu(x) if use_cpu_path(x, backend) else _pack_reference(x)


def unpack_bits_impl(
    packed: torch.Tensor, shape: list[int], decode: str, dtype: torch.dtype, backend: str
) -> torch.Tensor:
    """Decoded bits of ``packed`` in ``shape`` and ``dtype``: the Triton kernel, the CPU path or the reference."""
    if use_triton(packed, backend):
        launcher = triton_module("triton_bitpack", "_unpack_bits_kernel").unpack_bits_triton
        return launcher(packed, tuple(shape), decode, dtype)
    unpack = _unpack_cpu if use_cpu_path(packed, backend) else _unpack_reference
    bits = unpack(packed, math.prod(shape)).reshape(shape)
    if decode == "bool":
        return bits
    if decode == "binary":
        return bits.to(dtype)
    return bits.to(dtype).mul_(2).sub_(1)

"""Triton kernels for 1-bit packing, byte-for-byte the layout of ``bitpack.py``.

Each program handles ``BLOCK_BYTES`` output bytes as a [BLOCK_BYTES, 8] tile of
input elements: one masked read of the input, one masked write of the bytes.
Importing this module imports triton; ``bitpack.py`` imports it only to launch.
"""

import math
import os

import torch
import triton
import triton.language as tl

from aalconvert.kernels.dispatch import launching

BLOCK_BYTES = 1024
_DECODE_CODES = {"bool": 0, "binary": 1, "sign": 2}


@triton.jit
def _pack_bits_kernel(x_ptr, packed_ptr, numel, nbytes, BLOCK_BYTES: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    byte = pid * BLOCK_BYTES + tl.arange(0, BLOCK_BYTES)
    bit = tl.arange(0, 8)
    element = byte[:, None] * 8 + bit[None, :]
    x = tl.load(x_ptr + element, mask=element < numel, other=0)
    # Compare in fp32: the interpreter compares bf16 as raw integers.
    weighted = tl.where(x.to(tl.float32) > 0, 1 << bit[None, :], 0)
    packed = tl.sum(weighted, axis=1)
    tl.store(packed_ptr + byte, packed.to(tl.uint8), mask=byte < nbytes)


@triton.jit
def _unpack_bits_kernel(
    packed_ptr, out_ptr, numel, nbytes, DECODE: tl.constexpr, BLOCK_BYTES: tl.constexpr
):
    pid = tl.program_id(0).to(tl.int64)
    byte = pid * BLOCK_BYTES + tl.arange(0, BLOCK_BYTES)
    bit = tl.arange(0, 8)
    packed = tl.load(packed_ptr + byte, mask=byte < nbytes, other=0).to(tl.int32)
    bits = (packed[:, None] >> bit[None, :]) & 1
    if DECODE == 2:
        values = bits * 2 - 1
    else:
        values = bits
    element = byte[:, None] * 8 + bit[None, :]
    # Through fp32: the interpreter converts integers to bf16 wrongly; exact for 0, +-1.
    values = values.to(tl.float32).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + element, values, mask=element < numel)


def _check_device(t: torch.Tensor, name: str) -> None:
    if not (t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        raise RuntimeError(
            f"{name}: the Triton kernel needs a CUDA tensor (or TRITON_INTERPRET=1 on CPU), "
            f"got one on {t.device}; pass backend='reference' to use the torch reference"
        )


def pack_bits_triton(x: torch.Tensor) -> torch.Tensor:
    """Pack a bool or floating-point tensor of any layout; reads it in logical row-major order."""
    if x.dtype != torch.bool and not x.is_floating_point():
        raise TypeError(f"pack_bits_triton takes a bool or floating-point tensor, got {x.dtype}")
    _check_device(x, "pack_bits_triton")
    flat = x.reshape(-1).contiguous()
    if flat.dtype == torch.bool:
        flat = flat.view(torch.uint8)
    numel = flat.numel()
    nbytes = math.ceil(numel / 8)
    packed = torch.empty(nbytes, dtype=torch.uint8, device=x.device)
    if nbytes:
        grid = (triton.cdiv(nbytes, BLOCK_BYTES),)
        with launching("_pack_bits_kernel", x.device):
            _pack_bits_kernel[grid](flat, packed, numel, nbytes, BLOCK_BYTES=BLOCK_BYTES)
    return packed


def unpack_bits_triton(
    packed: torch.Tensor, shape: tuple[int, ...], decode: str, dtype: torch.dtype
) -> torch.Tensor:
    """Unpack uint8 bytes into a contiguous tensor of ``shape``: ``decode`` bool, binary or sign."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack_bits_triton takes uint8 bytes, got {packed.dtype}")
    if decode not in _DECODE_CODES:
        raise ValueError(f"decode must be one of {tuple(_DECODE_CODES)}, got {decode!r}")
    _check_device(packed, "unpack_bits_triton")
    numel = math.prod(shape)
    nbytes = math.ceil(numel / 8)
    out_dtype = torch.uint8 if decode == "bool" else dtype
    out = torch.empty(shape, dtype=out_dtype, device=packed.device)
    if numel:
        packed = packed.contiguous()
        grid = (triton.cdiv(nbytes, BLOCK_BYTES),)
        with launching("_unpack_bits_kernel", packed.device):
            _unpack_bits_kernel[grid](
                packed, out, numel, nbytes, DECODE=_DECODE_CODES[decode], BLOCK_BYTES=BLOCK_BYTES
            )
    return out.view(torch.bool) if decode == "bool" else out

"""The kernels as torch.library custom ops, with fake implementations.

Fake tensors, ``torch.compile`` and FSDP see ``aalconvert::pack_bits``,
``aalconvert::unpack_bits``, ``aalconvert::quantize_groups`` and
``aalconvert::dequantize_groups`` as opaque ops with known output shapes.
Each op is the backend-dispatching ``*_impl`` function itself (its type hints
are the op's schema). Registering them does not import triton: the real
implementations import it only when they launch a kernel.
"""

import math

import torch

from aalconvert.kernels.bitpack import pack_bits_impl, packed_nbytes, unpack_bits_impl
from aalconvert.kernels.quantize import dequantize_groups_impl, quantize_groups_impl

pack_bits_op = torch.library.custom_op("aalconvert::pack_bits", pack_bits_impl, mutates_args=())
unpack_bits_op = torch.library.custom_op(
    "aalconvert::unpack_bits", unpack_bits_impl, mutates_args=()
)
quantize_groups_op = torch.library.custom_op(
    "aalconvert::quantize_groups", quantize_groups_impl, mutates_args=()
)
dequantize_groups_op = torch.library.custom_op(
    "aalconvert::dequantize_groups", dequantize_groups_impl, mutates_args=()
)


@pack_bits_op.register_fake
def _(x: torch.Tensor, backend: str) -> torch.Tensor:
    return x.new_empty(packed_nbytes(x.numel()), dtype=torch.uint8)


@unpack_bits_op.register_fake
def _(
    packed: torch.Tensor, shape: list[int], decode: str, dtype: torch.dtype, backend: str
) -> torch.Tensor:
    return packed.new_empty(shape, dtype=dtype)


@quantize_groups_op.register_fake
def _(
    x: torch.Tensor,
    bits: int,
    group_size: int,
    stochastic: bool,
    scale_dtype: torch.dtype,
    seed: int,
    companding: str,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    numel = x.numel()
    groups = math.ceil(numel / group_size)
    codes = x.new_empty(math.ceil(numel * bits / 8), dtype=torch.uint8)
    return codes, x.new_empty(groups, dtype=scale_dtype), x.new_empty(groups, dtype=scale_dtype)


@dequantize_groups_op.register_fake
def _(
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
    return codes.new_empty(shape, dtype=dtype)

"""Bit packing and k-bit quantization: Triton kernels on CUDA, torch references elsewhere.

Every op dispatches on the tensor's device. Set ``AALCONVERT_KERNELS=reference``
(or pass ``backend="reference"``) to force the pure-torch reference. The ops are
registered with torch.library (``aalconvert::...``, see ``ops``) so fake tensors
and torch.compile see them; importing this package does not import triton.
"""

from aalconvert.kernels.bitpack import pack_bits, packed_nbytes, unpack_bits
from aalconvert.kernels.quantize import (
    QuantizedTensor,
    dequantize,
    quantize,
    quantized_nbytes,
)
from aalconvert.kernels import ops  # noqa: F401  (importing registers the custom ops)

__all__ = [
    "pack_bits",
    "unpack_bits",
    "packed_nbytes",
    "QuantizedTensor",
    "quantize",
    "dequantize",
    "quantized_nbytes",
]

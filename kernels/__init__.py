"""Bit packing and k-bit quantization: Triton kernels on CUDA, torch references elsewhere.

Every op dispatches on the tensor's device. Set ``AALCONVERT_KERNELS=reference``
(or pass ``backend="reference"``) to force the pure-torch reference.
"""

from aalconvert.kernels.bitpack import pack_bits, packed_nbytes, unpack_bits

__all__ = ["pack_bits", "unpack_bits", "packed_nbytes"]

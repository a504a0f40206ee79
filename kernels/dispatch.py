"""Choose between the Triton kernel and the torch reference for one call."""

import os

import torch

BACKENDS = ("auto", "triton", "reference")


def use_triton(tensor: torch.Tensor, backend: str) -> bool:
    """True when this call should run the Triton kernel.

    ``auto`` picks Triton for CUDA tensors unless ``AALCONVERT_KERNELS=reference``;
    ``triton`` forces it (CPU tensors then need ``TRITON_INTERPRET=1``).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "reference":
        return False
    if backend == "triton":
        return True
    if os.environ.get("AALCONVERT_KERNELS", "auto") == "reference":
        return False
    return tensor.is_cuda

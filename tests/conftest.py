"""Test-wide setup.

Without CUDA, Triton kernels run in the interpreter on CPU tensors. The suite's
tensors are tiny, so intra-op threads only contend on a small machine: one thread.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(1)

"""Test-wide setup.

Without CUDA, Triton kernels run in the interpreter on CPU tensors. The suite's
tensors are tiny, so intra-op threads only contend on a small machine: one thread.
The example models live in ``examples/`` at the repository root. pytest-xdist's
workers set COLUMNS=80, which rich obeys: the tests read reports at the width a
file or pipe gets, as a run without workers does.
"""

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # examples/ lives at the repo root

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(1)
for name in ("COLUMNS", "LINES"):
    os.environ.pop(name, None)

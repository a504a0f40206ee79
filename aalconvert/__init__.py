"""aalconvert: make PyTorch models train in less memory.

Public API only. Importing this package must not import triton or touch CUDA.
"""

__version__ = "0.1.0"

from aalconvert.api import convert, inspect, revert  # noqa: E402
from aalconvert.report import Report  # noqa: E402

__all__ = ["convert", "revert", "inspect", "Report", "__version__"]

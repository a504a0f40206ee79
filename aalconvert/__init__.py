"""aalconvert: make PyTorch models train in less memory.

Public API only: convert, revert, inspect, plan (fit a memory budget), Report,
BudgetPlan. Importing this package must not import triton or touch CUDA.
"""

__version__ = "0.1.0"

from aalconvert.api import convert, inspect, revert  # noqa: E402
from aalconvert.budget import BudgetPlan, plan_budget as plan  # noqa: E402
from aalconvert.report import Report  # noqa: E402

# ``plan`` (the budget planner) shadows the aalconvert.plan submodule as an attribute;
# ``from aalconvert.plan import Plan`` still reaches the submodule.
__all__ = ["convert", "revert", "inspect", "plan", "BudgetPlan", "Report", "__version__"]

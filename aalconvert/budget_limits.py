"""What a planned step must stay under: its predicted peak and, where asked, the bytes it keeps for backward.

The step budget (``budget=``) bounds the peak of one training step on one
device, parameters, gradients and optimizer state included. That is not
always what runs out: a pipeline schedule holds several micro-batches'
activations beside one set of gradients, and FSDP / ZeRO shard the gradients
and optimizer state that make a single device's peak. ``kept_budget=`` bounds
what the forward keeps for backward instead (or as well), in bytes or as a
fraction of what BP keeps, the way torch's ``activation_memory_budget`` is set.
The kept budget has no headroom: the bytes kept are predicted to the byte
(tests/test_budget.py measures them), and it is a target for the activations,
not a device's capacity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from aalconvert.errors import ConversionError
from aalconvert.report import Totals, format_bytes
from aalconvert.sizes import parse_size


def kept_budget_bytes(kept_budget: str | int | float, bp_kept: int) -> int:
    """Bytes in ``kept_budget``: a size ("2GiB", bytes), or a fraction of ``bp_kept`` (0.25, "25%")."""
    fraction = _fraction(kept_budget)
    if fraction is None:
        return parse_size(kept_budget)  # type: ignore[arg-type]
    return math.floor(fraction * bp_kept)


def check_kept_budget(kept_budget: str | int | float) -> None:
    """Raise ConversionError for a kept budget that is neither a size nor a fraction, before any work."""
    if _fraction(kept_budget) is None:
        parse_size(kept_budget)  # type: ignore[arg-type]


def _fraction(kept_budget: object) -> float | None:
    """The fraction of BP's kept bytes in ``kept_budget`` (a float, or a string ending in %), else None."""
    if isinstance(kept_budget, str) and kept_budget.strip().endswith("%"):
        text = kept_budget.strip()[:-1]
        try:
            value = float(text) / 100
        except ValueError:
            raise ConversionError(
                f"bad kept budget {kept_budget!r}: a percentage is a number before '%', e.g. '25%'") from None
    elif isinstance(kept_budget, float):
        value = kept_budget
    else:
        return None
    if not 0 < value <= 1 or math.isnan(value):
        raise ConversionError(
            f"a kept budget given as a fraction of what BP keeps must be in (0, 1] (e.g. 0.25 or '25%'), got "
            f"{kept_budget!r}; for bytes pass an int or a size such as '2GiB'")
    return value


@dataclass(frozen=True)
class Limits:
    """The most a plan's step may peak at (``peak``, the budget less headroom) and keep for backward
    (``kept``); None where not asked."""

    peak: int | None
    kept: int | None = None

    def hold(self, totals: Totals) -> bool:
        """Whether a plan with these predicted totals stays under every limit."""
        return ((self.peak is None or totals.peak_converted_bytes <= self.peak)
                and (self.kept is None or totals.converted_bytes <= self.kept))

    def over(self, totals: Totals) -> str:
        """What these totals exceed, in words ("3.1 MiB over the budget"), or "" when they hold."""
        parts = []
        if self.peak is not None and totals.peak_converted_bytes > self.peak:
            parts.append(f"{format_bytes(totals.peak_converted_bytes - self.peak)} over the budget")
        if self.kept is not None and totals.converted_bytes > self.kept:
            parts.append(f"{format_bytes(totals.converted_bytes - self.kept)} kept over the kept budget")
        return " and ".join(parts)

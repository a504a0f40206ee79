"""The largest batch whose predicted training-step peak fits a memory size, per rule set.

Each probe is one ``aalconvert.inspect`` on fake tensors (nothing is
allocated), so batches far beyond the machine can be tried. The peak grows
with the batch (activations and transients scale with it, parameters and
optimizer state do not), so the search starts from the linear guess that one
probe gives and brackets the answer with doubling steps, then bisects.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import nn

from aalconvert.api import inspect
from aalconvert.bisection import first_true
from aalconvert.report import Report, format_bytes
from aalconvert.sizes import parse_size

RULE_SETS: tuple[str, ...] = ("bp", "exact", "auto", "auto+approx8", "auto+approx4")
"""What ``--max-batch`` compares: plain backprop, lossless only, the paper's recipe, with k-bit copies."""

InputsForBatch = Callable[[int], tuple]


@dataclass(frozen=True)
class BatchFit:
    """The largest batch (0: none) for one rule set, and the predicted peak there (bytes; 0 when none)."""

    rules: str
    largest_batch: int
    peak_bytes: int
    probes: int


def largest_batch(peak_at: Callable[[int], int], memory: int, start: int, limit: int = 1 << 24) -> int:
    """The largest batch b >= 1 with ``peak_at(b) <= memory`` (0 when even 1 does not fit).

    ``peak_at`` must not decrease with the batch. ``start`` is the first probe
    (a good guess saves probes); ``limit`` caps the search.
    """
    start = max(1, min(start, limit))
    if peak_at(start) <= memory:
        low, high = start, None  # low fits
        step = 1
        while high is None:
            probe = min(low + step, limit)
            if probe == low:
                return low
            if peak_at(probe) <= memory:
                low, step = probe, step * 2
            else:
                high = probe
    else:
        high, low = start, None  # high does not fit
        step = 1
        while low is None:
            probe = max(high - step, 1)
            if peak_at(probe) <= memory:
                low = probe
            elif probe == 1:
                return 0
            else:
                high, step = probe, step * 2
    return first_true(low, high, lambda batch: peak_at(batch) > memory) - 1


def fit_batches(
    model: nn.Module,
    inputs_for_batch: InputsForBatch,
    memory: str | int,
    *,
    rule_sets: Sequence[str] = RULE_SETS,
    optimizer: str | None = None,
    labels: str | None = "auto",
    batch_size: int = 8,
    progress: Callable[[str], None] = lambda text: None,
) -> list[BatchFit]:
    """Per rule set, the largest batch whose predicted peak of one training step fits ``memory``.

    ``inputs_for_batch(b)`` builds the model's positional inputs for batch b;
    ``batch_size`` is the first probe. ``progress`` receives a line per probe
    (the CLI shows it on stderr).
    """
    memory_bytes = parse_size(memory)
    fits = []
    for rules in rule_sets:
        reports: dict[int, Report] = {}

        def peak_at(batch: int, rules: str = rules, reports: dict[int, Report] = reports) -> int:
            if batch not in reports:
                chosen = "exact" if rules == "bp" else rules.split("+")
                reports[batch] = inspect(model, inputs_for_batch(batch), chosen,
                                         optimizer=optimizer, labels=labels)
            totals = reports[batch].totals
            peak = totals.peak_bp_bytes if rules == "bp" else totals.peak_converted_bytes
            progress(f"{rules}: batch {batch} -> predicted peak {format_bytes(peak)}")
            return peak

        guess = _linear_guess(peak_at, batch_size, memory_bytes, reports)
        batch = largest_batch(peak_at, memory_bytes, guess)
        peak = peak_at(batch) if batch else 0
        fits.append(BatchFit(rules, batch, peak, len(reports)))
    return fits


def _linear_guess(peak_at: Callable[[int], int], batch: int, memory: int, reports: dict[int, Report]) -> int:
    """The batch at which ``memory`` is reached if what grows with the batch grows linearly.

    From one point, everything but parameters, gradients and optimizer state
    counts as growing, a convolution's weight-sized workspace too, which puts
    the guess low (resnet_basic's BP under 64 MiB: 300 for 527, twice the
    probes). The line through the peaks at ``batch`` and twice it cancels what
    does not grow, but is flat where a non-growing part makes the peak at small
    batches (approx: 2833 for 555); so it is taken up to twice the first guess.
    """
    peak = peak_at(batch)
    totals = reports[batch].totals
    per_sample = (peak - totals.fixed_bytes) / batch
    if per_sample <= 0:
        return batch
    first = max(1, int((memory - totals.fixed_bytes) // per_sample))
    slope = (peak_at(2 * batch) - peak) / batch
    second = batch + int((memory - peak) // slope) if slope > 0 else first
    return min(max(first, second), 2 * first)

"""The one bisection the planner and the batch search share."""

from collections.abc import Callable


def first_true(low: int, high: int, predicate: Callable[[int], bool]) -> int:
    """The smallest ``n`` in ``(low, high]`` with ``predicate(n)``, for a predicate that is false
    at ``low``, true at ``high`` and monotone in between (false, then true)."""
    while high - low > 1:
        middle = (low + high) // 2
        if predicate(middle):
            high = middle
        else:
            low = middle
    return high

"""Run one computation in several threads at once on a shared model, for the thread-safety tests."""

import threading
from collections.abc import Callable, Sequence
from typing import Any


def run_in_threads(compute: Callable[[Any], Any], batches: Sequence[Any], repeats: int) -> list:
    """``compute(batch)`` ``repeats`` times in one thread per batch, all at once; the last results.

    The first error raised in any thread is raised here.
    """
    results: dict[int, Any] = {}
    errors: list[BaseException] = []

    def work(index: int) -> None:
        try:
            for _ in range(repeats):
                results[index] = compute(batches[index])
        except BaseException as error:  # raised below, in the test's thread
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(batches))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return [results[index] for index in range(len(batches))]

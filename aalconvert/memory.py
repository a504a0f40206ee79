"""What a forward keeps for backward, measured on real tensors.

methods.md section 5: add up the distinct storages that saved tensors point
to, excluding parameters; shared storage counts once. Saved tensors are seen
through ``torch.autograd.graph.saved_tensors_hooks``, so every variant in
``aalconvert.nn`` must save through ``ctx.save_for_backward``.
"""

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class SavedTensors:
    """Distinct storages kept for backward by one forward (bytes per storage pointer)."""

    storages: dict[int, int] = field(default_factory=dict)
    output: Any = None

    @property
    def nbytes(self) -> int:
        """Total bytes kept, each storage counted once."""
        return sum(self.storages.values())


def measure_saved(
    forward: Callable[[], Any], exclude: Iterable[torch.Tensor] = ()
) -> SavedTensors:
    """Run ``forward()`` and record the storages autograd keeps for backward.

    ``exclude`` lists tensors (typically ``model.parameters()``) whose storages
    are not activations and are not counted. The forward's output is returned
    in ``.output`` so the caller can run backward on it.
    """
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    result = SavedTensors()

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        pointer = storage.data_ptr()
        if pointer not in excluded and storage.nbytes() > 0:
            result.storages[pointer] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result.output = forward()
    return result

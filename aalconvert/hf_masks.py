"""Hugging Face causal masks on fake tensors: the attention path the real forward takes.

Without an attention mask, a transformers decoder checks its position ids for
packed sequences (several documents in one row); finding none, it lets
``F.scaled_dot_product_attention`` apply the causal mask itself
(``is_causal=True``, no mask tensor). A fake tensor has no values to check, so in
a step simulated on fake tensors it assumes packing, and every attention layer
gets an explicit boolean mask: another kernel call, which makes a float copy of
the mask per layer and keeps more beside it (3 MiB, 3.6 % of the step's peak, on
a four-layer Llama of width 256 at 4 x 128 tokens). Position ids the model makes
itself (when the caller passes none) count up from the first token, so they are
never packed: while ``causal_masks_as_in_eager`` is active and the caller gave
no position ids, the check answers "not packed" as the real one would. Position
ids the caller passes are checked as transformers does (on fakes: packed).
"""

import contextlib
import inspect
import sys
from collections.abc import Iterator
from typing import Any

from torch import nn
from torch._subclasses import FakeTensor

_MODULE = "transformers.masking_utils"
_PACKING_CHECK = "find_packed_sequence_indices"
POSITIONS = "position_ids"


def passes_positions(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> bool:
    """Whether a call ``model(*args, **kwargs)`` gives position ids (True when that cannot be told)."""
    if kwargs.get(POSITIONS) is not None:
        return True
    try:
        signature = inspect.signature(model.forward)
        bound = signature.bind_partial(*args, **kwargs)
    except (TypeError, ValueError):
        return True
    if POSITIONS in signature.parameters:
        return bound.arguments.get(POSITIONS) is not None
    # A forward taking *args / **kwargs (a wrapper) may hand on position ids it got there.
    return any(bound.arguments.get(name) for name, parameter in signature.parameters.items()
               if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD))


@contextlib.contextmanager
def causal_masks_as_in_eager(positions_given: bool) -> Iterator[None]:
    """Within the block, fake position ids the model made itself are not taken for packed sequences.

    Does nothing when ``positions_given`` or when transformers' masking
    utilities are not imported (or have no such check: other versions).
    """
    module = sys.modules.get(_MODULE)
    check = getattr(module, _PACKING_CHECK, None)
    if positions_given or check is None:
        yield
        return

    def not_packed_when_fake(position_ids, *args, **kwargs):
        if isinstance(position_ids, FakeTensor):
            return None
        return check(position_ids, *args, **kwargs)

    setattr(module, _PACKING_CHECK, not_packed_when_fake)
    try:
        yield
    finally:
        setattr(module, _PACKING_CHECK, check)

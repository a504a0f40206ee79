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

An all-ones ``attention_mask`` is dropped the same way in a real step, after
transformers reads it (``_ignore_causal_mask_sdpa``,
``_ignore_bidirectional_mask_sdpa``). On a fake mask whose storage an active
``known_ones.OnesStorages`` knows to hold only ones, those checks answer as
on a real all-ones mask of its shape and dtype; on any other fake mask they
answer as transformers does (keep the mask).
"""

import contextlib
import inspect
import sys
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn
from torch._subclasses import FakeTensor
from torch.utils._python_dispatch import _disable_current_modes

from aalconvert.known_ones import OnesStorages

_MODULE = "transformers.masking_utils"
_PACKING_CHECK = "find_packed_sequence_indices"
_MASK_SKIP_CHECKS = ("_ignore_causal_mask_sdpa", "_ignore_bidirectional_mask_sdpa")  # first argument: the mask
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
    """Within the block, fake position ids the model made itself are not taken for packed sequences,
    and a fake mask known to hold only ones is dropped as a real one would be.

    Does nothing when transformers' masking utilities are not imported (or
    have no such checks: other versions); position ids are left to the
    check when ``positions_given``.
    """
    module = sys.modules.get(_MODULE)
    originals = {name: getattr(module, name, None) for name in (_PACKING_CHECK, *_MASK_SKIP_CHECKS)}
    replacements = {name: _answered_on_ones(check) for name, check in originals.items()
                    if name in _MASK_SKIP_CHECKS and check is not None}
    if not positions_given and originals[_PACKING_CHECK] is not None:
        replacements[_PACKING_CHECK] = _not_packed_when_fake(originals[_PACKING_CHECK])
    for name, replacement in replacements.items():
        setattr(module, name, replacement)
    try:
        yield
    finally:
        for name in replacements:
            setattr(module, name, originals[name])


def masks_of_ones_followed(known: Iterable[torch.Tensor]) -> contextlib.AbstractContextManager:
    """``OnesStorages`` over ``known`` where transformers' mask checks are loaded to ask it, else
    nothing: the mode sees every op of a simulated step (about 7 % of an estimate's time)."""
    if all(getattr(sys.modules.get(_MODULE), name, None) is None for name in _MASK_SKIP_CHECKS):
        return contextlib.nullcontext()
    return OnesStorages(known)


def _not_packed_when_fake(check: Any) -> Any:
    def not_packed_when_fake(position_ids, *args, **kwargs):
        if isinstance(position_ids, FakeTensor):
            return None
        return check(position_ids, *args, **kwargs)

    return not_packed_when_fake


def _answered_on_ones(check: Any) -> Any:
    def answered_on_ones(padding_mask, *args, **kwargs):
        if isinstance(padding_mask, FakeTensor) and OnesStorages.active_holds(padding_mask):
            with _disable_current_modes():  # the check reads values: a real mask, outside the fake mode
                ones = torch.ones(padding_mask.shape, dtype=padding_mask.dtype)
                return bool(check(ones, *args, **kwargs))
        return check(padding_mask, *args, **kwargs)

    return answered_on_ones

"""Reading ``ctx.saved_tensors`` with torch's in-place-modification error made actionable."""

from collections.abc import Callable

import torch

from aalconvert.errors import SavedTensorModifiedError


def saved_tensors_or_raise(ctx, explain: Callable[[str], str]) -> tuple[torch.Tensor, ...]:
    """``ctx.saved_tensors``; SavedTensorModifiedError with ``explain(torch_message)`` if one was modified.

    Only torch's "modified by an inplace operation" RuntimeError is translated;
    any other error propagates unchanged.
    """
    try:
        return ctx.saved_tensors
    except RuntimeError as error:
        if "modified by an inplace operation" not in str(error):
            raise
        raise SavedTensorModifiedError(explain(str(error))) from error

"""Reading ``ctx.saved_tensors`` with torch's in-place-modification error made actionable."""

from collections.abc import Callable, Iterable

import torch
from torch import nn

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


def parameter_versions(modules: Iterable[nn.Module]) -> tuple[tuple[torch.Tensor, int], ...]:
    """The Parameters of ``modules`` and their version counters now, for a forward run again in
    backward (a chain rebuild, a norm's rerun) that reads them there; () under torch.compile,
    which cannot guard on version counters."""
    if torch.compiler.is_compiling():
        return ()
    return tuple((p, p._version) for module in modules for p in module.parameters())


def raise_if_parameters_changed(versions: tuple[tuple[torch.Tensor, int], ...], where: str) -> None:
    """SavedTensorModifiedError if a Parameter of ``versions`` was modified in place since: running
    the forward again would read its new values, where torch's backward uses what the forward
    saw (or raises)."""
    for parameter, version in versions:
        if parameter._version != version:
            raise SavedTensorModifiedError(
                f"{where}: a Parameter ({parameter.type()} {list(parameter.shape)}) of a module whose "
                "forward runs again in backward was modified in place between forward and backward "
                "(e.g. optimizer.step() before backward); the rerun would use its new values. Step the "
                "optimizer after backward, or convert without that module"
            )

"""Zoo linear layers with a transposed weight (Hugging Face ``Conv1D`` in GPT-2) and their variants' base.

``Conv1D`` computes ``y = x @ W + b`` with ``W`` stored as (in, out), so none of
the ``nn.Linear`` variants apply to it. ``is_transposed_linear`` recognises it
without importing transformers; ``TransposedLinearVariant`` is the base of the
ASA and approximate variants built from one. A variant is a plain
``nn.Module`` (not a subclass of the zoo class, which aalconvert never
imports) holding the very same Parameters under the same names and
remembering the zoo class, so ``to_module()`` gives back an instance of it and
pickling needs nothing special.
"""

from typing import ClassVar

from torch import nn

from aalconvert.errors import ConversionError
from aalconvert.nn.rebuild import rebuild_as
from aalconvert.trace import is_linear_like

ZOO_CLASS_ATTRIBUTE = "zoo_class"


def transposed_linear_problem(module: nn.Module) -> str | None:
    """Why ``module`` is not a zoo transposed linear, or None when it is one.

    One is a zoo linear-like class named ``Conv1D`` (``aalconvert.trace.is_linear_like``)
    with a 2-D Parameter ``weight`` of shape (in, out) whose ``out`` equals its
    ``nf`` and a Parameter ``bias`` of shape (out,).
    """
    if type(module).__name__ != "Conv1D" or not is_linear_like(module):
        return f"{type(module).__name__} is not a zoo Conv1D (transformers.pytorch_utils.Conv1D)"
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    if not isinstance(weight, nn.Parameter) or isinstance(weight, nn.parameter.UninitializedParameter) or weight.dim() != 2:
        return "its weight is not an initialised 2-D Parameter of shape (in, out)"
    if weight.shape[1] != getattr(module, "nf", None):
        return f"its weight has shape {tuple(weight.shape)} but nf={getattr(module, 'nf', None)!r}"
    if not isinstance(bias, nn.Parameter) or tuple(bias.shape) != (weight.shape[1],):
        shape = None if bias is None else tuple(bias.shape)
        return f"its bias has shape {shape}, expected ({weight.shape[1]},)"
    return None


def is_transposed_linear(module: nn.Module) -> bool:
    """True for a zoo ``Conv1D`` (``y = x @ W + b``, ``W`` of shape (in, out)) that variants can replace."""
    return transposed_linear_problem(module) is None


class TransposedLinearVariant(nn.Module):
    """Base of the variants of a zoo transposed linear; subclasses list their options in ``OPTIONS``.

    The variant shares the zoo module's Parameters, buffers, hooks and plain
    attributes (``nf``, ``nx``); ``zoo_class`` is the class ``to_module`` gives back.
    """

    OPTIONS: ClassVar[tuple[str, ...]]
    zoo_class: type[nn.Module]

    @classmethod
    def rebuild_from(cls, module: nn.Module) -> "TransposedLinearVariant":
        """A ``cls`` instance sharing ``module``'s state; ConversionError if it is no zoo transposed linear."""
        if isinstance(module, TransposedLinearVariant):
            raise ConversionError(f"{type(module).__name__} is already converted; convert the zoo layer itself")
        problem = transposed_linear_problem(module)
        if problem is not None:
            raise ConversionError(f"{cls.__name__}.from_module cannot convert {type(module).__name__}: {problem}")
        new = rebuild_as(cls, module)
        setattr(new, ZOO_CLASS_ATTRIBUTE, type(module))
        return new

    @property
    def in_features(self) -> int:
        """Input features (the weight's first dimension)."""
        return self.weight.shape[0]

    @property
    def out_features(self) -> int:
        """Output features (the weight's second dimension)."""
        return self.weight.shape[1]

    def to_module(self) -> nn.Module:
        """An instance of the original zoo class holding this variant's Parameters (options dropped)."""
        return rebuild_as(self.zoo_class, self, drop=(*self.OPTIONS, ZOO_CLASS_ATTRIBUTE))

    def describe_options(self) -> str:
        """The variant's options as ``extra_repr`` shows them."""
        return ", ".join(f"{name}={getattr(self, name)!r}" for name in self.OPTIONS)

    def extra_repr(self) -> str:
        return (
            f"{self.zoo_class.__name__}, in_features={self.in_features}, "
            f"out_features={self.out_features}, {self.describe_options()}"
        )

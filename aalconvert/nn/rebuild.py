"""Building a layer variant around an existing module's state (design.md: variants share Parameters).

Every variant's ``from_module`` and ``to_module`` goes through ``rebuild_as``, so
the original and the rebuilt module hold the very same Parameter, buffer and
submodule objects (state_dict keys and optimizers built before conversion keep
working) while their registries stay independent.
"""

from collections.abc import Sequence
from typing import ClassVar, TypeVar

from torch import nn

ModuleT = TypeVar("ModuleT", bound=nn.Module)


def rebuild_as(cls: type[ModuleT], module: nn.Module, drop: Sequence[str] = ()) -> ModuleT:
    """A ``cls`` instance sharing ``module``'s Parameters, buffers, submodules, hooks and mode.

    The registries (dicts and sets) are copied, not shared, so that later
    registrations on one module do not appear on the other; the tensors inside
    are the same objects. Attributes named in ``drop`` (a variant's own options)
    are not carried over. Nothing is allocated.
    """
    new = cls.__new__(cls)
    state = {key: value for key, value in module.__dict__.items() if key not in drop}
    for key, value in state.items():
        if isinstance(value, (dict, set)):
            state[key] = type(value)(value)
    new.__dict__.update(state)
    return new


def mixed_class(mixin: type, base: type, name: str, cache: dict, **attributes) -> type:
    """The class deriving from ``mixin`` then ``base``, made once per pair and kept in ``cache``.

    It reports ``mixin``'s module as its own (aalconvert's tracer keeps aalconvert
    modules as leaves) and carries ``attributes`` (say, the class to turn back into).
    """
    key = (mixin, base)
    if key not in cache:
        variant = type(name, (mixin, base), dict(attributes))
        variant.__module__ = mixin.__module__
        variant.__qualname__ = name
        cache[key] = variant
    return cache[key]


class OwnClassVariant:
    """Base of mixins put before the converted module's own class (isinstance checks hold),
    sharing its state: ``variant_of`` makes the subclass once per class, ``to_module`` gives
    the original class back, and pickling stores the original and converts it again on load
    (the subclass is made at run time and cannot be pickled by name). Subclasses validate in
    their own ``from_module(module)`` and call ``variant_of``."""

    torch_class: ClassVar[type[nn.Module]]
    _variant_classes: ClassVar[dict[tuple[type, type], type]] = {}

    @classmethod
    def variant_of(cls, module: nn.Module) -> nn.Module:
        """``module`` as a subclass of ``cls`` and of its own class, sharing everything it holds."""
        torch_class = type(module)
        variant = mixed_class(cls, torch_class, f"{cls.__name__}[{torch_class.__name__}]", cls._variant_classes,
                              torch_class=torch_class)
        return rebuild_as(variant, module)

    def to_module(self) -> nn.Module:
        """An instance of the original class holding the same Parameters, buffers and submodules."""
        return rebuild_as(self.torch_class, self)

    def __reduce_ex__(self, protocol: int) -> tuple:
        mixin = next(c for c in type(self).__bases__ if issubclass(c, OwnClassVariant))
        return (mixin.from_module, (self.to_module(),))

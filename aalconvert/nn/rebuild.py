"""Building a layer variant around an existing module's state (design.md: variants share Parameters).

Every variant's ``from_module`` and ``to_module`` goes through ``rebuild_as``, so
the original and the rebuilt module hold the very same Parameter, buffer and
submodule objects (state_dict keys and optimizers built before conversion keep
working) while their registries stay independent.
"""

from collections.abc import Sequence
from typing import TypeVar

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

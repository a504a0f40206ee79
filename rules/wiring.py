"""Run-time wiring between modules: swap a module, carry a tensor to later layers.

Conversion keeps the user's own module tree and forward code. Where a variant
needs a tensor its call site does not pass (an ARA layer needs its group's
anchor, a recompute layer its chain's input), a ``TensorSlot`` takes the tensor
in a forward pre-hook where it appears, hands it to the consuming layers as a
keyword argument, and lets go of it after the last consumer has run, so it
never outlives the forward (backward keeps it through ``save_for_backward``).
"""

import weakref
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from aalconvert.errors import WiringError


def swap_module(root: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at qualified ``name`` in ``root``; return the root (``new`` when name is "")."""
    if name == "":
        return new
    root.set_submodule(name, new)
    return root


class TensorSlot:
    """Carries the first positional input of one module to other modules' ``keyword`` argument."""

    def __init__(self, keyword: str) -> None:
        self.keyword = keyword
        self.tensor: torch.Tensor | None = None
        self.handles: list[RemovableHandle] = []

    def wire(self, source: nn.Module, consumers: Sequence[nn.Module]) -> None:
        """Capture ``source``'s input; give it to every consumer; release after the last."""
        self.handles.append(source.register_forward_pre_hook(self._capture))
        for consumer in consumers:
            self.handles.append(
                consumer.register_forward_pre_hook(self._inject, with_kwargs=True)
            )
        self.handles.append(consumers[-1].register_forward_hook(self._release))

    def _capture(self, module: nn.Module, args: tuple) -> None:
        self.tensor = args[0]

    def _inject(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if self.tensor is None:
            raise WiringError(
                f"{type(module).__name__} ran without its {self.keyword!r}: the module that "
                "provides it did not run first in this forward. This happens when activation "
                "checkpointing (or a direct call) splits one converted group, e.g. an ARA group "
                "across checkpoint regions: checkpoint whole groups, or skip= these layers"
            )
        return args, {**kwargs, self.keyword: self.tensor}

    def _release(self, module: nn.Module, args: tuple, output: object) -> None:
        self.tensor = None

    def remove(self) -> None:
        """Undo ``wire``: remove every hook this slot registered."""
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.tensor = None


class SharedPack:
    """Lets layers that read the same tensor in one forward share one packed copy of it.

    ``pack`` maps a layer's input to what it saves (e.g. a 1-bit sign mask). The
    layer receives it as ``keyword``. Only a weak reference to the input is held,
    and a cached pack is reused only for the very same tensor at the same version
    (under torch.compile, which cannot guard on version counters, for the same
    tensor). The cache is not pickled: a loaded model packs afresh.
    """

    def __init__(self, keyword: str, pack: Callable[[torch.Tensor], torch.Tensor]):
        self.keyword = keyword
        self.pack = pack
        self.handles: list[RemovableHandle] = []
        self._source: weakref.ref | None = None
        self._version = -1
        self._packed: torch.Tensor | None = None

    def wire(self, consumers: Sequence[nn.Module]) -> None:
        for consumer in consumers:
            self.handles.append(
                consumer.register_forward_pre_hook(self._inject, with_kwargs=True)
            )

    def _inject(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if not torch.is_grad_enabled():
            return None
        x = args[0]
        cached = self._source() if self._source is not None else None
        compiling = torch.compiler.is_compiling()
        if cached is not x or (not compiling and self._version != x._version):
            self._packed = self.pack(x)
            self._source = weakref.ref(x)
            self._version = -1 if compiling else x._version
        return args, {**kwargs, self.keyword: self._packed}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_source": None, "_version": -1, "_packed": None}

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self._source, self._packed = None, None


def wiring_of(module: nn.Module) -> set:
    """The slots and shared packs whose hooks sit on ``module`` itself."""
    found = set()
    for hooks in (module._forward_pre_hooks, module._forward_hooks):
        for hook in hooks.values():
            owner = getattr(hook, "__self__", None)
            if isinstance(owner, (TensorSlot, SharedPack)):
                found.add(owner)
    return found


def is_wired(module: nn.Module) -> bool:
    """True when a previous conversion already wired hooks on ``module``."""
    return bool(wiring_of(module))


def remove_wiring(model: nn.Module) -> None:
    """Remove every slot and shared pack that conversion wired into ``model``."""
    for module in model.modules():
        for owner in wiring_of(module):
            owner.remove()

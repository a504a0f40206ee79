"""Run-time wiring between modules: swap a module, carry a tensor to later layers.

Conversion keeps the user's own module tree and forward code. Where a variant
needs a tensor its call site does not pass (an ARA layer needs its group's
anchor, a recompute layer its chain's input), a ``TensorSlot`` takes the tensor
in a forward pre-hook where it appears, hands it to the consuming layers as a
keyword argument, and lets go of it after the last consumer has run, so it
never outlives the forward (backward keeps it through ``save_for_backward``).
"""

import threading
import weakref
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.nn.modules import module as torch_module
from torch.utils.hooks import RemovableHandle

from aalconvert.errors import WiringError
from aalconvert.memory import others_global_hooks


def swap_module(root: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at qualified ``name`` in ``root``; return the root (``new`` when name is "")."""
    if name == "":
        return new
    root.set_submodule(name, new)
    return root


class _TracedState:
    """A plain object whose attributes Dynamo can set (it cannot trace SimpleNamespace's)."""


class _PerThread:
    """Run-time state of one slot, kept per thread (threads and ``nn.DataParallel`` replicas
    share a converted model's hooks, so they must not share what one forward captured).

    While torch.compile traces, a plain object stands in: Dynamo cannot trace
    ``threading.local``, and a compiled graph carries the tensor as data anyway.
    Pickling (torch.save, deepcopy) drops the state: a forward captures afresh.
    """

    def __init__(self) -> None:
        self._local = threading.local()
        self._traced = _TracedState()

    def get(self) -> object:
        return self._traced if torch.compiler.is_compiling() else self._local

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()


class _Wiring:
    """What every slot and shared pack shares: its hook handles, and how to let go of them.

    Copies (deepcopy, pickle) drop the handles: they would point at the original
    modules' registries; ``remove_wiring`` clears a copy's hooks from the registries.
    """

    aalconvert_wiring = True
    handles: list[RemovableHandle]
    state: _PerThread  # what the current forward captured, per thread

    def remove(self) -> None:
        """Undo ``wire``: remove every hook this object registered, and what it holds."""
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.state = _PerThread()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "handles": []}


class TensorSlot(_Wiring):
    """Carries the first positional input of one module to other modules' ``keyword`` argument.

    The tensor is held from the source's pre-hook until the last consumer has
    run, and let go of even when a forward raises on the way (an ``always_call``
    hook on the last consumer, and one on ``root`` when given).
    """

    def __init__(self, keyword: str) -> None:
        self.keyword = keyword
        self.state = _PerThread()
        self.handles: list[RemovableHandle] = []

    @property
    def tensor(self) -> torch.Tensor | None:
        """What this thread's forward captured and has not released yet."""
        return getattr(self.state.get(), "tensor", None)

    def wire(self, source: nn.Module, consumers: Sequence[nn.Module], root: nn.Module | None = None) -> None:
        """Capture ``source``'s input; give it to every consumer; release after the last."""
        self.handles.append(source.register_forward_pre_hook(self._capture))
        for consumer in consumers:
            self.handles.append(
                consumer.register_forward_pre_hook(self._inject, with_kwargs=True)
            )
        for module in (consumers[-1], root):
            if module is not None:
                self.handles.append(module.register_forward_hook(self._release, always_call=True))

    def _capture(self, module: nn.Module, args: tuple) -> None:
        self.state.get().tensor = args[0]

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
        self.state.get().tensor = None


class ChainSlot(_Wiring):
    """Hands a recompute layer its chain's input ``z``, only when its input really is ``chain(z)``.

    ``chain`` is the modules that turn ``z`` into the layer's input. Each chain
    module's output is checked to have been computed, in this forward, from the
    previous one's (the first's from ``z``), and the layer gets ``z`` (keyword
    ``chain_input``) and the chain's last output (``chain_output``), which the
    layer compares with the input it is finally called with. A direct call with
    another tensor (manifold mixup), a forward hook that replaces an output (on a
    chain module, global, or on a child a chain module runs in its own forward,
    such as a fused batch norm's ``act``), an in-place op on a chain tensor
    between the modules (``h = norm(x); h.mul_(2); layer(h)``: the same object,
    other values; seen by its version counter), a user's hook that runs where
    this wiring cannot see its effect (a forward hook before the link's, a
    pre-hook after the check on a later chain module or on the layer), a
    chain run out of order, or a layer that runs under other saved-tensor hooks
    than the chain start did breaks the link, and the layer then keeps its input
    as BP does: exact in every case.

    The last matters for ``torch.utils.checkpoint`` (a Hugging Face model's
    ``gradient_checkpointing_enable()``, say) around part of a chain: a region
    that starts between the chain start and the layer runs the layer again in
    backward without the chain start, and the recomputation must save what the
    forward saved (torch checks the count and the shapes, not which tensor is
    which). Checkpointing's hooks are pushed for the region, so the chain start
    and the layer see different ones, and the layer keeps its input in both runs.

    ``z`` itself is held from the chain start until the layer has run, and let
    go then, or when the root's forward ends (also on error). What the chain
    start saves of ``z`` may be another object over the same storage (a
    saved-tensor hook's detached alias) or only a k-bit copy, so ``z``'s own
    object would otherwise die before the layer runs. This costs no memory: the
    storage is the chain start's. The chain's outputs are followed by weak
    references only.
    """

    def __init__(self) -> None:
        self.state = _PerThread()
        self.handles: list[RemovableHandle] = []

    def wire(self, chain: Sequence[nn.Module], consumer: nn.Module, root: nn.Module | None = None) -> None:
        """Follow ``chain`` (first hooks of their modules: they see what the module itself got
        and returned, before any user hook changes it) and feed ``consumer``."""
        self.handles.append(chain[0].register_forward_pre_hook(self._capture, prepend=True))
        for module in chain[1:]:
            self.handles.append(module.register_forward_pre_hook(self._check_entry, prepend=True))
        for module in chain:
            self.handles.append(module.register_forward_hook(self._link, prepend=True))
        self.handles.append(consumer.register_forward_pre_hook(self._inject, with_kwargs=True))
        for module in (consumer, root):
            if module is not None:
                self.handles.append(module.register_forward_hook(self._release, always_call=True))

    def _capture(self, module: nn.Module, args: tuple) -> None:
        state = self.state.get()
        state.chain_input = args[0]
        state.last, state.last_version = _reference(args[0]), _version(args[0])
        state.saved_hooks = _saved_tensor_hooks()

    def _check_entry(self, module: nn.Module, args: tuple) -> None:
        """Before a later chain module runs: its input must be the previous one's output, unchanged
        (an in-place chain module changes it itself, so this is checked before it runs), and no
        user's pre-hook may run after this check (it could change that input in place)."""
        state = self.state.get()
        if not (args and self._unchanged(state, args[0])) or _user_hooks_beside(
                module._forward_pre_hooks, self._check_entry, after=True):
            state.last = None

    def _link(self, module: nn.Module, args: tuple, output: object) -> None:
        state = self.state.get()
        last = getattr(state, "last", None)
        linked = (
            last is not None
            and bool(args)
            and _dereference(last) is args[0]
            and isinstance(output, torch.Tensor)
            and not _global_forward_hooks()  # they run before ours and may change the output
            and not _hooked_inside(module)
            and not _user_hooks_beside(module._forward_hooks, self._link, after=False)  # prepended later
        )
        state.last = _reference(output) if linked else None
        state.last_version = _version(output) if linked else None

    def _inject(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        state = self.state.get()
        z = getattr(state, "chain_input", None)
        x = _dereference(getattr(state, "last", None))
        if z is None or x is None or not self._unchanged(state, x) or _user_hooks_beside(
                module._forward_pre_hooks, self._inject, after=True):  # a later one may change x in place
            return None
        if _saved_tensor_hooks() is not getattr(state, "saved_hooks", None):  # a checkpoint region between
            return None
        return args, {**kwargs, "chain_input": z, "chain_output": x}

    @staticmethod
    def _unchanged(state: object, tensor: object) -> bool:
        """``tensor`` is the chain's last output and no in-place op has changed it since."""
        last = _dereference(getattr(state, "last", None))
        return last is tensor and getattr(state, "last_version", None) == _version(tensor)

    def _release(self, module: nn.Module, args: tuple, output: object) -> None:
        self.state.get().chain_input = None

    @property
    def tensor(self) -> torch.Tensor | None:
        """The chain input this thread's forward holds (None once let go)."""
        return getattr(self.state.get(), "chain_input", None)


def _saved_tensor_hooks() -> Callable | None:
    """The pack function of the innermost ``saved_tensors_hooks`` in force (None: none; None under
    torch.compile, which traces checkpoint regions into its own graph)."""
    if torch.compiler.is_compiling():
        return None
    hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
    return None if hooks is None else hooks[0]


def _global_forward_hooks() -> bool:
    """Whether a ``register_module_forward_hook`` or ``register_module_forward_pre_hook`` hook
    that may change inputs or outputs is active.

    Global hooks run before a module's own, so a chain link cannot see what they
    do (to a chain module, or to a child a chain module runs); only aalconvert's
    observers (marked ``aalconvert_observer``, they return nothing) are trusted.
    """
    return others_global_hooks(torch_module._global_forward_hooks, torch_module._global_forward_pre_hooks)


def _hooked_inside(module: nn.Module) -> bool:
    """Whether a module that ``module``'s own forward calls (a fused batch norm's ``act`` and
    ``drop``) has a user's forward hook: a chain rebuild runs those children without their
    hooks, so a hook that changed a value would not be rebuilt. aalconvert's own hooks (the
    packer's pass-through, wiring that hands on kept tensors) change no value."""
    return any(
        not _aalconverts(hook)
        for child in module.modules() if child is not module
        for hook in (*child._forward_hooks.values(), *child._forward_pre_hooks.values())
    )


def _reference(tensor: torch.Tensor) -> object:
    """A weak reference, except under torch.compile (Dynamo keeps tensors as graph values)."""
    return tensor if torch.compiler.is_compiling() else weakref.ref(tensor)


def _dereference(reference: object) -> torch.Tensor | None:
    return reference() if isinstance(reference, weakref.ref) else reference


def _version(tensor: torch.Tensor) -> int:
    """The version counter (bumped by every in-place op); 0 under torch.compile, which cannot
    guard on it (its graph has no in-place op between a chain and its layer: the rules' trace
    refuses such chains), and for inference tensors, which have none (and no backward)."""
    return 0 if torch.compiler.is_compiling() or tensor.is_inference() else tensor._version


def _user_hooks_beside(registry: dict, ours: Callable, after: bool) -> bool:
    """Whether ``registry`` (a module's hook dict) holds a hook not aalconvert's that runs after
    ``ours`` (``after``) or before it: one that could change a tensor where ``ours`` cannot see."""
    seen_ours = False
    for hook in registry.values():
        if hook == ours:
            seen_ours = True
        elif seen_ours == after and not _aalconverts(hook):
            return True
    return False


def _aalconverts(hook: Callable) -> bool:
    """aalconvert's own hooks (the packer's pass-through, wiring that hands on kept tensors)
    change no value."""
    return getattr(hook, "__module__", "").startswith("aalconvert.")


class SharedPack(_Wiring):
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
        self.state = _PerThread()  # per thread: another thread's pack must never be handed out

    def wire(self, consumers: Sequence[nn.Module]) -> None:
        for consumer in consumers:
            self.handles.append(
                consumer.register_forward_pre_hook(self._inject, with_kwargs=True)
            )

    def _inject(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if not torch.is_grad_enabled():
            return None
        x = args[0]
        state = self.state.get()
        source = getattr(state, "source", None)
        cached = source() if source is not None else None
        compiling = torch.compiler.is_compiling()
        if cached is not x or (not compiling and getattr(state, "version", -1) != x._version):
            state.packed = self.pack(x)
            state.source = weakref.ref(x)
            state.version = -1 if compiling else x._version
        return args, {**kwargs, self.keyword: state.packed}


def wiring_owner(hook: Callable) -> object | None:
    """The slot or shared pack ``hook`` belongs to, or None for anyone else's hook."""
    owner = getattr(hook, "__self__", None)
    return owner if getattr(owner, "aalconvert_wiring", False) else None


def wiring_of(module: nn.Module) -> set:
    """The slots and shared packs whose hooks sit on ``module`` itself."""
    found = set()
    for hooks in (module._forward_pre_hooks, module._forward_hooks):
        for hook in hooks.values():
            owner = wiring_owner(hook)
            if owner is not None:
                found.add(owner)
    return found


def is_wired(module: nn.Module) -> bool:
    """True when a previous conversion already wired hooks on ``module``."""
    return bool(wiring_of(module))


def remove_wiring(model: nn.Module) -> None:
    """Remove every slot and shared pack that conversion wired into ``model``.

    Hooks are taken out of each module's own registries: a module rebuilt after
    wiring (``rebuild_as`` copies the registries) holds hooks that the original
    handles no longer reach.
    """
    for module in model.modules():
        owners = wiring_of(module)
        for registry in (module._forward_pre_hooks, module._forward_hooks):
            for key in [key for key, hook in registry.items() if wiring_owner(hook) is not None]:
                del registry[key]
                for flags in (
                    module._forward_pre_hooks_with_kwargs,
                    module._forward_hooks_with_kwargs,
                    module._forward_hooks_always_called,
                ):
                    flags.pop(key, None)
        for owner in owners:
            owner.remove()

"""What a forward keeps for backward: measured on real tensors, estimated on fake ones.

methods.md section 5: add up the distinct storages that saved tensors point
to, excluding parameters; shared storage counts once. Saved tensors are seen
through ``torch.autograd.graph.saved_tensors_hooks``, so every variant in
``aalconvert.nn`` must save through ``ctx.save_for_backward``. The estimate runs the same
forward on fake tensors (``torch._subclasses.FakeTensorMode``: shapes and
dtypes only, no memory, no compute), so a model larger than the machine can
be studied; ``saved_by_module`` also says which module kept each storage.
"""

import copy
import numbers
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch._subclasses import FakeTensorMode
from torch.utils import _pytree as pytree

from aalconvert.known_ones import FollowedStorages, remember_if_all_ones, written_tensors


@dataclass
class SavedTensors:
    """Distinct storages kept for backward by one forward: storage key -> bytes.

    The key is the storage's data pointer for real tensors; fake and meta
    storages have no data, so theirs is the storage's identity (``storage_key``).
    """

    storages: dict[int, int] = field(default_factory=dict)
    output: Any = None

    @property
    def nbytes(self) -> int:
        """Total bytes kept, each storage counted once."""
        return sum(self.storages.values())


def storage_key(storage: torch.UntypedStorage) -> int:
    """A key telling storages apart: the data pointer of real storage, else the storage's identity.

    Fake and meta storages have no data, and reading a fake storage's data
    pointer warns (and will fail in later torch), so they are told apart by the
    identity of the storage object torch keeps (``_cdata``), which real and fake
    storages alike have. Keep the storage alive while its key is in use: a freed
    storage's address or identity may be reused.
    """
    if storage.device.type == "meta":
        return storage._cdata
    return storage.data_ptr()


def measure_saved(
    forward: Callable[[], Any], exclude: Iterable[torch.Tensor] = ()
) -> SavedTensors:
    """Run ``forward()`` and record the storages autograd keeps for backward.

    ``exclude`` lists tensors (typically ``model.parameters()``) whose storages
    are not activations and are not counted. The forward's output is returned
    in ``.output`` so the caller can run backward on it. Works on real and
    fake tensors (see :func:`storage_key`).
    """
    excluded = {storage_key(t.untyped_storage()) for t in exclude}
    result = SavedTensors()
    alive: list[torch.UntypedStorage] = []  # a freed storage's key could be reused mid-forward

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        key = storage_key(storage)
        if key not in excluded and storage.nbytes() > 0 and key not in result.storages:
            result.storages[key] = storage.nbytes()
            alive.append(storage)
        # Detached: a saved output handed back with its grad_fn would make a reference cycle that
        # keeps the graph's tensors alive after backward frees them, until the garbage collector runs.
        return tensor.detach()

    pack.aalconvert_observer = True  # unpack is the identity: it takes any number of unpacks
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            result.output = forward()
    finally:
        alive.clear()  # every saved tensor keeps the pack hook, and so this list, until backward frees it
    return result


@dataclass
class SavedByModule:
    """What one forward keeps for backward, attributed to the module that saved it first.

    ``bytes_by_module``: qualified module name ("" = the root) -> bytes of the
    distinct storages first saved while that module was the innermost one
    running. ``outputs``: module name -> (shape, dtype) of the first tensor its
    first call returned. ``counted_at``: module name -> the module where a
    storage it also kept was counted (its first saver), for modules that
    kept a storage another module had saved before.
    """

    bytes_by_module: dict[str, int] = field(default_factory=dict)
    outputs: dict[str, tuple[tuple[int, ...], torch.dtype]] = field(default_factory=dict)
    counted_at: dict[str, str] = field(default_factory=dict)
    step_bytes: int | None = None
    """The most bytes alive at once in a simulated training step (forward, loss, backward), above its
    start (``aalconvert.step_memory``); None where that step could not be simulated."""

    @property
    def nbytes(self) -> int:
        """Total bytes kept, each storage counted once."""
        return sum(self.bytes_by_module.values())


def others_global_hooks(*registries: dict) -> bool:
    """Whether one of torch's global module-hook ``registries`` holds a hook other than
    aalconvert's observers (``saved_by_module``'s, marked ``aalconvert_observer``: they return
    nothing, so a variant that skips a module's call or trusts its output changes no value)."""
    return any(not getattr(hook, "aalconvert_observer", False) for registry in registries for hook in registry.values())


def tensors_in(value: Any) -> Iterator[torch.Tensor]:
    """The tensors in ``value`` (a tensor, or tuples, lists and dicts of them, nested), in order."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from tensors_in(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from tensors_in(item)


def _first_tensor(value: Any) -> torch.Tensor | None:
    return next(tensors_in(value), None)


def saved_by_module(
    model: nn.Module, forward: Callable[[], Any], exclude: Iterable[torch.Tensor] = ()
) -> SavedByModule:
    """Run ``forward()`` (a call of ``model``) and attribute every saved storage to a module.

    Works on real, fake and meta tensors alike: storages are told apart by
    their identity, not their address (fake and meta storages have none).
    Global module hooks track which of ``model``'s modules is running; they are
    registered only for the duration of the call. ``exclude`` (parameters) is
    not counted. Shared storage counts once, for the module that saved it first.
    """
    names = {id(module): name for name, module in model.named_modules()}
    excluded = {t.untyped_storage()._cdata for t in exclude}
    first_saver: dict[int, str] = {}
    alive: list[torch.UntypedStorage] = []  # a freed storage's identity could be reused mid-forward
    result = SavedByModule()
    running: list[str] = []

    def enter(module: nn.Module, args: tuple) -> None:
        if id(module) in names:
            running.append(names[id(module)])

    def leave(module: nn.Module, args: tuple, output: Any) -> None:
        if id(module) not in names:
            return
        name = running.pop()
        tensor = _first_tensor(output)
        if tensor is not None and name not in result.outputs:
            result.outputs[name] = (tuple(int(s) for s in tensor.shape), tensor.dtype)

    def count(tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in excluded or storage.nbytes() == 0:
            return
        saver = running[-1] if running else ""
        if key in first_saver:
            if first_saver[key] != saver:
                result.counted_at.setdefault(saver, first_saver[key])
            return
        first_saver[key] = saver
        alive.append(storage)
        result.bytes_by_module[saver] = result.bytes_by_module.get(saver, 0) + storage.nbytes()

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        count(tensor)
        return tensor.detach()  # see measure_saved

    leave.aalconvert_observer = True  # returns nothing: recompute chains may trust outputs under it
    enter.aalconvert_observer = True  # returns nothing: fused ops may skip a module's call under it
    handles = [
        nn.modules.module.register_module_forward_pre_hook(enter),
        nn.modules.module.register_module_forward_hook(leave),
    ]
    pack.aalconvert_observer = True  # unpack is the identity: it takes any number of unpacks
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            forward()
    finally:
        for handle in handles:
            handle.remove()
        alive.clear()  # every saved tensor keeps the pack hook, and so this list, until backward frees it
    return result


def fake_copy(model: nn.Module, fake_mode: FakeTensorMode, device: torch.device) -> nn.Module:
    """A copy of ``model``'s module tree whose parameters and buffers are fake tensors on ``device``.

    Nothing is allocated and ``model`` is not touched; meta parameters work too.
    Tied parameters stay tied (one fake per Parameter object).
    """
    memo: dict[int, torch.Tensor] = {}
    with fake_mode:
        for p in model.parameters():
            if id(p) not in memo:
                fake = torch.empty_strided(p.shape, p.stride(), dtype=p.dtype, device=device)
                memo[id(p)] = nn.Parameter(fake, requires_grad=p.requires_grad)
        for b in model.buffers():
            if id(b) not in memo:
                memo[id(b)] = torch.empty_strided(b.shape, b.stride(), dtype=b.dtype, device=device)
    return copy.deepcopy(model, memo)


def fake_inputs(inputs: tuple, fake_mode: FakeTensorMode, device: torch.device) -> tuple:
    """``inputs`` with every tensor made fake (meta tensors become fakes on ``device``); an input
    of all ones is noted as such (``known_ones``: masks that a model drops after reading them)."""
    converted = []
    for value in inputs:
        if isinstance(value, torch.Tensor) and value.is_meta:
            with fake_mode:
                value = torch.empty_strided(
                    value.shape, value.stride(), dtype=value.dtype, device=device
                )
        elif isinstance(value, torch.Tensor):
            real, value = value, fake_mode.from_tensor(value)
            remember_if_all_ones(real, value)
        converted.append(value)
    return tuple(converted)


_BERNOULLI = frozenset({torch.ops.aten.bernoulli_.float, torch.ops.aten.bernoulli_.Tensor,
                        torch.ops.aten.bernoulli.default, torch.ops.aten.bernoulli.p})
# A Python number reaches a dispatch mode as itself, also through the .Tensor overloads.
_SCALE_IN_PLACE = frozenset({torch.ops.aten.div_.Scalar, torch.ops.aten.mul_.Scalar,
                             torch.ops.aten.div_.Tensor, torch.ops.aten.mul_.Tensor})


class TwoValuedStorages(FollowedStorages):
    """Tells which fake storages hold only 0 and one positive value, from the ops that made them.

    A real saved-tensor packer reads the values of what an op saves to find
    float masks it can keep in 1 bit (``aalconvert.nn.saved_pack.two_levels``):
    CPU dropout, functional or inside ``scaled_dot_product_attention``'s math
    path, saves ``empty_like(x).bernoulli_(1 - p).div_(1 - p)``. Fake tensors
    have no values, so this mode follows them instead: a storage written by
    ``bernoulli`` holds 0 and 1, an in-place ``div_``/``mul_`` by a positive
    number keeps it two-valued, and any other write into it forgets it.
    ``TwoValuedStorages.active_holds`` asks the innermost active instance.
    """

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        output = func(*args, **kwargs)
        if func in _BERNOULLI:
            for tensor in pytree.tree_leaves(output):
                if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
                    self.storages[tensor.untyped_storage()] = True
            return output
        scale = args[1] if len(args) > 1 else None
        keeps = (func in _SCALE_IN_PLACE and isinstance(scale, numbers.Real) and not isinstance(scale, bool)
                 and 0 < scale < float("inf"))
        if not keeps:
            for tensor in written_tensors(func, args, kwargs):
                self.storages.pop(tensor.untyped_storage(), None)
        return output

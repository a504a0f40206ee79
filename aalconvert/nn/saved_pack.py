"""k-bit copies of the activations torch's own ops save for backward (saved-tensor hooks).

Leaf swaps and traced forwards reach the modules and calls a rule knows. What
they leave -- ``F.scaled_dot_product_attention`` in any caller,
``nn.MultiheadAttention``, Hugging Face attention and norms, layer scale,
drop-path, anything a module computes with functional ops -- reaches autograd
through torch's ops, which save their tensors through one general door:
``torch.autograd.graph.saved_tensors_hooks``. While a ``SavedTensorPacker`` is
active (``begin`` / ``end``), each saved activation is packed into a k-bit copy
(``ApproxOptions``, the quantizer of every approx variant) and decoded when
backward asks for it, so torch's own backward formulas (SDPA's fused backward
included) run on the decoded copy. The forward is untouched.

What is packed: floating tensors of at least ``min_numel`` elements that
require grad (activations on the differentiable path). Everything else stays
as it is: statistics an op saves beside its inputs and outputs (SDPA's
logsumexp, a norm's mean and rstd: torch marks them non-differentiable, and a
k-bit normaliser would scale every gradient of its row), masks and indices,
constants, the model's inputs, and Parameters, buffers and their views (a copy
of a tensor that stays alive anyway would only add memory), and log-softmax
outputs (a loss computed inside the model): their backward exponentiates them,
so a k-bit error of a step in log space would scale a probability by e^step;
and the inputs ``torch.utils.checkpoint`` keeps of a block it runs again in
backward (a block recomputed from a k-bit input is approximate throughout).
A functional ReLU's own save of its output keeps 1 bit, exactly what its
backward reads. One
tensor saved by several ops is packed once, and so is one storage saved through
several views that each cover it whole (``matmul`` saves a reshaped view of its
operand); a small view (under ``min_numel``) is kept as a compact copy rather
than with its whole storage.

The packer sees tensors, not the ops that save them: an activation an op
divides by or takes the logarithm of is quantized like any other (its relative
error grows near zero). Models do that in norms (``x / rms``) over statistics
that are small tensors and mostly stay exact by ``min_numel``.

Hooks that were active when the packer began (``torch.utils.checkpoint``,
``save_on_cpu``, aalconvert's own measurement) still see every saved tensor:
they get the packed parts instead of the tensor. While a converted variant
runs (``keep``), its saves are its own decision and pass through unpacked.

Without options (the lossless rules) only what one bit holds exactly is packed:
masks, and float tensors holding 0 and one other value; gradients stay
bit-identical.

With or without options, a saved product ``a * b`` whose factors are saved
anyway (attention probabilities after CPU dropout: softmax keeps its output,
the multiply its noise) is not kept: ``RebuiltProduct`` multiplies the two
again in backward, to the same bits.
"""

import sys
import threading
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from types import FrameType
from typing import Any

import torch
import torch.autograd.function
import torch.utils.checkpoint
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor

from aalconvert.errors import SavedTensorModifiedError
from aalconvert.kernels import pack_bits, unpack_bits
from aalconvert.memory import TwoValuedStorages, storage_key
from aalconvert.nn.approx_common import (
    ApproxOptions,
    SavedLayout,
    compact,
    compress,
    functorch_active,
    restore,
    should_quantize,
)

# Saved outputs of these autograd nodes stay exact (see the module docstring).
_EXACT_OUTPUTS = frozenset({"LogSoftmaxBackward0"})

_CHECKPOINT_FILE = torch.utils.checkpoint.__file__
_AUTOGRAD_FUNCTION_FILE = torch.autograd.function.__file__

_Hooks = tuple[Callable[[torch.Tensor], Any], Callable[[Any], torch.Tensor]]


@dataclass(frozen=True)
class TwoLevels:
    """A mask, or a float tensor holding only 0 and one other value: 1 bit per element, exact.

    Dropout keeps such tensors (a bool mask; on CPU, SDPA's math path keeps its
    mask scaled by ``1 / (1 - p)``), and so do ``masked_fill`` and ``where``.
    """

    numel: int
    dtype: torch.dtype  # torch.bool for a mask

    def decode(self, parts: tuple[torch.Tensor, ...]) -> torch.Tensor:
        if self.dtype == torch.bool:
            return unpack_bits(parts[0], (self.numel,), decode="bool")
        return unpack_bits(parts[0], (self.numel,), decode="binary", dtype=self.dtype) * parts[1]


def two_levels(flat: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], TwoLevels] | None:
    """The 1-bit form of a bool tensor, or of a float one whose values are 0 and one positive
    finite value; None for any other tensor. Fake and meta tensors have no values: a float one
    is taken as two-valued where ``aalconvert.memory.TwoValuedStorages.active_holds`` says how it was made
    (CPU dropout's mask, during ``inspect``), so the estimate packs what the real run packs."""
    if flat.dtype == torch.bool:
        return (pack_bits(flat),), TwoLevels(flat.numel(), torch.bool)
    if not flat.is_floating_point():
        return None
    value = flat.amax()
    if isinstance(flat, FakeTensor) or flat.is_meta:
        two_valued = TwoValuedStorages.active_holds(flat)
    else:
        two_valued = bool(torch.isfinite(value) & (value > 0)) and bool(((flat == 0) | (flat == value)).all()) \
            and not bool(torch.signbit(flat).any())  # a -0.0 would come back as +0.0
    if not two_valued:
        return None
    return (pack_bits(flat), value.clone()), TwoLevels(flat.numel(), flat.dtype)


@dataclass(frozen=True)
class PositiveMask(TwoLevels):
    """A ReLU's save of its own output kept as ``output > 0``: what its backward reads, not the
    output's values (nothing else may read it as the output)."""


@dataclass(frozen=True)
class PackedSave:
    """One saved tensor as its packed parts, and how to give back a tensor of its shape and strides.

    ``parts`` went through the hooks that were active outside the packer
    (``outer``), if any. ``stride`` is None when the tensor was packed from a
    contiguous copy (a view that does not cover its memory densely).
    """

    parts: tuple[Any, ...]
    layout: SavedLayout | TwoLevels
    shape: torch.Size
    stride: tuple[int, ...] | None
    outer: _Hooks | None

    def unpack(self) -> torch.Tensor:
        parts = self.parts if self.outer is None else tuple(self.outer[1](p) for p in self.parts)
        flat = self.layout.decode(parts) if isinstance(self.layout, TwoLevels) else restore(parts, self.layout)
        if self.stride is None:
            return flat.view(self.shape)
        return flat.as_strided(self.shape, self.stride)


@dataclass(frozen=True)
class VersionChecked:
    """A saved tensor the packer leaves as it is, with its version when saved.

    torch checks a saved tensor's version counter when backward reads it, but
    not while saved-tensor hooks are set: this check is torch's, done by the
    packer instead, with torch's message (``saved.saved_tensors_or_raise`` and
    users' code recognize it). Without it a weight stepped or an activation
    changed in place between forward and backward would be read with its new
    values where torch raises.
    """

    tensor: torch.Tensor
    version: int

    def unpack(self) -> torch.Tensor:
        _raise_if_modified(self.tensor, self.version, self.tensor.shape)
        return self.tensor

    @property
    def current(self) -> bool:
        """Whether the tensor is unchanged since it was saved."""
        return self.tensor._version == self.version


def _raise_if_modified(tensor: torch.Tensor, version: int, shape: torch.Size) -> None:
    """torch's check of a saved tensor's version counter, with torch's message (``shape``: the
    saved tensor's, which a storage-free version watch does not have)."""
    if tensor._version != version:
        raise SavedTensorModifiedError(
            "one of the variables needed for gradient computation has been modified by an inplace "
            f"operation: [{tensor.type()} {list(shape)}] is at version "
            f"{tensor._version}; expected version {version} instead (checked by aalconvert's "
            "saved-tensor hooks, as torch would without them): do not modify it in place between "
            "forward and backward (clone it first, or step the optimizer after backward)"
        )


def _current(entry: Any) -> bool:
    """Whether a saved entry still holds what was saved: a tensor kept as it is may have been
    changed in place since (a rebuild from it would then differ from the forward)."""
    return not isinstance(entry, VersionChecked) or entry.current


def _version_watch(tensor: torch.Tensor) -> torch.Tensor:
    """An alias of ``tensor`` with no storage that shares its version counter: it tells whether
    ``tensor`` was changed in place without keeping its memory alive (a freed tensor may have
    been changed before it was freed). Emptying the alias counts as a write; the count is set back."""
    version = tensor._version
    watch = tensor.detach()
    with torch.no_grad():
        watch.set_()
    torch._C._autograd._unsafe_set_version_counter((watch,), (version,))
    return watch


@dataclass(frozen=True)
class RebuiltProduct:
    """A saved ``a * b`` rebuilt in backward from the entries ``a`` and ``b`` were saved as.

    Dropout on the CPU (functional, or inside SDPA's math path) multiplies the
    attention probabilities by a noise of 0 and ``1 / (1 - p)``; the matmul that
    reads the product saves it, while softmax saves its output and the multiply
    saves the noise (1 bit here). Multiplying the two again in backward gives the
    very bits of the forward (one rounding per element, whatever the order), so
    the L x L product need not be kept: methods.md section 4, cheap
    recomputation. The product's version counter is watched for torch's check.
    """

    factors: tuple[Any, Any]  # the entries of the multiply's two operands, in its order
    watch: torch.Tensor  # ``_version_watch`` of the product
    version: int
    shape: torch.Size
    stride: tuple[int, ...]

    def unpack(self) -> torch.Tensor:
        _raise_if_modified(self.watch, self.version, self.shape)
        first, second = (entry.unpack() for entry in self.factors)
        return (first * second).as_strided(self.shape, self.stride)


@dataclass(frozen=True)
class PassedOn:
    """A saved tensor the packer leaves as it is, handed to the hooks active outside it."""

    packed: Any
    unpack_hook: Callable[[Any], torch.Tensor]

    def unpack(self) -> torch.Tensor:
        return self.unpack_hook(self.packed)


def _covers_memory_densely(tensor: torch.Tensor) -> bool:
    """True when ``tensor``'s elements fill ``numel`` consecutive slots of its storage, in some order."""
    expected = 1
    for stride, size in sorted((s, n) for n, s in zip(tensor.shape, tensor.stride()) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _memory_order(tensor: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...] | None]:
    """A 1-D tensor of ``tensor``'s elements in memory order, and the strides that undo it.

    A tensor covering its memory densely (contiguous, channels-last, transposed)
    is read as it lies, and ``as_strided`` with its strides restores it; any other
    view is copied contiguously first and comes back contiguous (None).
    """
    if tensor.is_contiguous():
        return tensor.reshape(-1), tuple(tensor.stride())
    if _covers_memory_densely(tensor):
        return tensor.as_strided((tensor.numel(),), (1,), tensor.storage_offset()), tuple(tensor.stride())
    return tensor.contiguous().reshape(-1), None


def _saved_by_checkpoint(caller: FrameType | None) -> bool:
    """Whether the save that called the pack hook is ``torch.utils.checkpoint`` keeping a block's inputs.

    A checkpointed block runs its forward again in backward from these inputs.
    A k-bit copy there would make every tensor the block recomputes from it
    approximate, ReLU masks and batch statistics included: on the ResNet
    example, 4-bit block inputs turn the gradient's cosine to BP's from 0.99 to
    0.80, against the exact gradients a checkpoint promises. Checkpoint saves
    them in Python: directly (non-reentrant, ``save_inputs``) or through its
    autograd Function's ``apply`` (reentrant); the hook is called from there.
    """
    if caller is not None and caller.f_code.co_filename == _AUTOGRAD_FUNCTION_FILE \
            and caller.f_code.co_name == "apply":
        caller = caller.f_back
    return caller is not None and caller.f_code.co_filename == _CHECKPOINT_FILE


def _plain(tensor: torch.Tensor) -> bool:
    """A dense tensor of torch's own types (or a fake one, for estimates), not a subclass or wrapper."""
    return (
        (type(tensor) in (torch.Tensor, nn.Parameter) or isinstance(tensor, FakeTensor))
        and tensor.layout == torch.strided
        and not tensor.is_nested
    )


def _same(entry: tuple, tensor: torch.Tensor) -> bool:
    """Whether a ``(weak reference, version, ...)`` entry was made for this very tensor as it is now."""
    return entry[0]() is tensor and entry[1] == tensor._version


def _cache_key(tensor: torch.Tensor) -> tuple:
    """Where the packer's cache files ``tensor``: under its storage when it covers that storage
    whole and densely (any such view packs to the same bytes in memory order), else under itself."""
    if tensor.numel() * tensor.element_size() == tensor.untyped_storage().nbytes() and _covers_memory_densely(
        tensor
    ):
        return ("storage", storage_key(tensor.untyped_storage()), tensor.dtype)
    return ("tensor", id(tensor))


def _packed_for(entry: tuple, tensor: torch.Tensor) -> Any:
    """The cached packing of ``entry`` as ``tensor`` reads it, or None when the entry is stale.

    A storage entry's source tensor must still be alive (so its storage was not freed
    and reused) and unchanged since (views share one version counter).
    """
    source, version, packed = entry
    source = source()
    if source is None or version != tensor._version:
        return None
    if source is tensor:
        return packed
    if storage_key(source.untyped_storage()) != storage_key(tensor.untyped_storage()):
        return None
    if packed is _NOT_TWO_VALUED:
        return packed
    return replace(packed, shape=tensor.shape, stride=tuple(tensor.stride()))


# A cache entry's value for a tensor whose values were read and found not two-valued: saved
# again (Llama's rotary cos and sin, by every layer), it is passed on without reading them again.
_NOT_TWO_VALUED = object()


class SavedTensorPacker:
    """Packs what torch's ops save for backward while a forward runs between ``begin`` and ``end``.

    State is per thread: threads sharing a model pack their own forwards.
    ``begin`` calls nest (a module called inside another packed call); the
    saved-tensor hooks are pushed by the outermost and popped by its ``end``.
    """

    def __init__(self, options: ApproxOptions | None) -> None:
        """``options``: how activations are quantized; None packs only what 1 bit holds exactly
        (masks and 0-or-one-value tensors), for the lossless rules."""
        self.options = options
        self.min_numel = (options or ApproxOptions()).min_numel
        self._local = threading.local()

    def _state(self) -> threading.local:
        state = self._local
        if not hasattr(state, "modes"):
            state.modes, state.context = [], None
            self._forget(state, set(), None)
        return state

    @staticmethod
    def _forget(state: threading.local, excluded: set, outer: _Hooks | None) -> None:
        """A fresh forward's state: nothing cached or seen yet."""
        state.cache, state.relu_outputs, state.excluded, state.outer = {}, {}, excluded, outer
        state.saves = {}  # node sequence number -> [(weak entry, its node's type if its own output)]
        state.first_node = torch._C._autograd._get_sequence_nr()

    def begin(self, keep_as_is: Iterable[torch.Tensor]) -> None:
        """Start packing in this thread; ``keep_as_is`` (Parameters, buffers, inputs) are never packed."""
        state = self._state()
        if not state.modes:
            self._forget(state, {storage_key(t.untyped_storage()) for t in keep_as_is if _plain(t)},
                         torch._C._autograd._top_saved_tensors_default_hooks(False))
            state.context = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
            state.context.__enter__()
        state.modes.append(True)

    def keep(self) -> None:
        """From here until the matching ``end``, saves pass through unpacked (a variant's own)."""
        self._state().modes.append(False)

    def end(self) -> None:
        """Close the innermost ``begin`` or ``keep``; the outermost lets go of the hooks and the cache."""
        state = self._state()
        if not state.modes:
            return
        state.modes.pop()
        if not state.modes and state.context is not None:
            context, state.context = state.context, None
            self._forget(state, set(), None)
            context.__exit__(None, None, None)

    @property
    def active(self) -> bool:
        """Whether this thread's current forward packs what it saves."""
        modes = self._state().modes
        return bool(modes) and modes[-1]

    def is_activation(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor``, saved now, is an activation this packer may pack (module docstring)."""
        return tensor.requires_grad and type(tensor.grad_fn).__name__ not in _EXACT_OUTPUTS and self._own(tensor)

    def _own(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` was made by this forward (not a Parameter, buffer or input) and is
        a plain tensor the packer can read, while packing is on."""
        return (
            self.active
            and _plain(tensor)
            and not functorch_active(tensor)
            and storage_key(tensor.untyped_storage()) not in self._state().excluded
        )

    def _pack(self, tensor: torch.Tensor) -> Any:
        state = self._state()
        if _saved_by_checkpoint(sys._getframe(1)):  # what a block recomputes from stays exact
            return self._passed_on(tensor, state)
        entry = self._rebuilt_product(tensor, state)
        if entry is None:
            entry = self._entry(tensor, state)
        self._note_save(tensor, entry, state)
        return entry

    @staticmethod
    def _note_save(tensor: torch.Tensor, entry: Any, state: threading.local) -> None:
        """File ``entry`` under the autograd node saving it, for ``_rebuilt_product``.

        torch numbers autograd nodes per thread as it makes them, and one of its
        own ops saves right after its node is made (its result after computing it,
        with no node made in between): the saver is the last node made. Only what
        can be a factor is filed (an op's own result, a tensor needing no
        gradient), by weak reference: an entry dies with the graph that saved it.
        """
        saver = torch._C._autograd._get_sequence_nr() - 1
        maker = tensor.grad_fn
        own_output = maker is not None and maker._sequence_nr() == saver
        if not (own_output or maker is None) or isinstance(getattr(entry, "layout", None), PositiveMask):
            return
        state.saves.setdefault(saver, []).append(
            (weakref.ref(entry), type(maker).__name__ if own_output else None))

    def _rebuilt_product(self, tensor: torch.Tensor, state: threading.local) -> RebuiltProduct | None:
        """A ``RebuiltProduct`` for ``tensor`` when it is (a view of the whole of) ``a * b`` where
        ``a`` is the saved result of the op that made it and ``b`` what the multiply saved, both
        saved through this packer in this forward; else None.

        Which node saved what comes from ``state.saves``; a product whose operands were saved
        under other hooks (a checkpointed block, a variant's own) is left to ``_entry``. Hooks
        outside the packer must take any number of unpacks of one entry: aalconvert's
        observers (marked ``aalconvert_observer``) do, a checkpoint's do not.
        """
        product = tensor if tensor._base is None else tensor._base
        node = product.grad_fn
        if (
            type(node).__name__ != "MulBackward0"
            or product._version != 0  # written since the multiply made it (under no_grad)
            or not product.is_contiguous()
            or product.numel() != tensor.numel()
            or tensor.numel() < max(self.min_numel, 1)
            or (state.outer is not None and not getattr(state.outer[0], "aalconvert_observer", False))
            or not self._own(tensor)
            or _cache_key(tensor)[0] != "storage"
        ):
            return None
        operands = [edge for edge, _ in node.next_functions]
        if len(operands) != 2 or (operands[0] is None) == (operands[1] is None):
            return None  # one operand needs a gradient, the multiply saved the other
        maker = operands[0] if operands[0] is not None else operands[1]
        if not hasattr(type(maker), "_saved_result"):  # not a built-in op that saves its result
            return None
        made, multiplier = self._only_save(state, maker, own_output=True), self._only_save(state, node)
        if made is None or multiplier is None or not all(map(_current, (made, multiplier))):
            return None
        factors = (made, multiplier) if operands[0] is not None else (multiplier, made)
        return RebuiltProduct(factors, _version_watch(product), tensor._version, tensor.shape,
                              tuple(tensor.stride()))

    @staticmethod
    def _only_save(state: threading.local, node: Any, own_output: bool = False) -> Any:
        """The entry of the one tensor ``node`` saved through this packer in this forward, when it
        saved just one and it was (``own_output``) or was not its own output; else None.

        Numbers are per thread: a node made in another thread (a tensor handed over mid-forward)
        may carry the number of one of this forward's; its type must match too, and its number
        fall in this forward's range."""
        number = node._sequence_nr()
        saves = state.saves.get(number, ())
        if number < state.first_node or len(saves) != 1:
            return None
        entry, maker = saves[0][0](), saves[0][1]
        if maker != (type(node).__name__ if own_output else None):
            return None
        return entry

    def _entry(self, tensor: torch.Tensor, state: threading.local) -> Any:
        """What ``tensor`` is saved as: itself (version-checked), a 1-bit or k-bit ``PackedSave``."""
        if self.options is None and tensor.requires_grad:  # lossless: activations stay as they are
            return self._passed_on(tensor, state)
        if self._relu_saving_its_output(tensor, state):
            return self._relu_mask(tensor, state)
        key = _cache_key(tensor)
        cached = state.cache.get(key)
        reused = None if cached is None else _packed_for(cached, tensor)
        if reused is _NOT_TWO_VALUED:
            return self._passed_on(tensor, state)
        if reused is not None:
            return reused
        packed = self._packed(tensor, state)
        if isinstance(packed, PackedSave):
            state.cache[key] = (weakref.ref(tensor), tensor._version, packed)
        return packed

    def _relu_saving_its_output(self, tensor: torch.Tensor, state: threading.local) -> bool:
        """Whether this is a ReLU's own save of its output (under the approx rules).

        A ReLU saves its output when it makes it, before any other op can save
        that tensor; its backward reads only which values are positive, so one
        bit holds that exactly, where a k-bit copy would turn small positive
        values into zeros. A later save of the same tensor (the layer reading it)
        is packed as usual.
        """
        if self.options is None or type(tensor.grad_fn).__name__ != "ReluBackward0":
            return False
        seen = state.relu_outputs.get(id(tensor))
        if seen is not None and _same(seen, tensor):
            return False
        if not (self.is_activation(tensor) and tensor.numel() >= max(self.min_numel, 1)):
            return False
        state.relu_outputs[id(tensor)] = (weakref.ref(tensor), tensor._version)
        return True

    def _relu_mask(self, tensor: torch.Tensor, state: threading.local) -> PackedSave:
        """``tensor > 0`` in 1 bit, decoded as 0 and 1 (all a ReLU's backward reads)."""
        flat, stride = _memory_order(tensor.detach())
        return self._handed_out((pack_bits(flat), flat.new_ones(())), PositiveMask(flat.numel(), flat.dtype),
                                tensor, stride, state)

    def _packed(self, tensor: torch.Tensor, state: threading.local) -> Any:
        """A k-bit or 1-bit ``PackedSave`` of ``tensor``, or ``tensor`` (a compact copy of a small view)."""
        large = tensor.numel() >= max(self.min_numel, 1)
        quantizing = self.options is not None
        activation = self.is_activation(tensor)
        if quantizing and activation and should_quantize(tensor, self.options):
            if tensor.is_contiguous():  # the tensor itself: a layer reading it shares this copy
                parts, layout = compress(tensor, self.options)
                stride = tuple(tensor.stride())
            else:
                flat, stride = _memory_order(tensor.detach())
                parts, layout = compress(flat, self.options)
        elif large and not tensor.requires_grad and self._own(tensor):
            flat, stride = _memory_order(tensor.detach())
            found = two_levels(flat)
            if found is None:
                source = tensor if tensor._base is None else tensor._base  # outlives a layer's view of it
                state.cache[_cache_key(tensor)] = (weakref.ref(source), tensor._version, _NOT_TWO_VALUED)
                return self._passed_on(tensor, state)
            parts, layout = found
        else:  # a small view is copied rather than keeping its storage, where values may change
            kept = compact(tensor) if quantizing and activation else tensor
            return self._passed_on(kept, state)
        if sum(part.untyped_storage().nbytes() for part in parts) >= tensor.untyped_storage().nbytes():
            return self._passed_on(tensor, state)  # an expanded view: its storage is smaller already
        return self._handed_out(parts, layout, tensor, stride, state)

    @staticmethod
    def _handed_out(parts: tuple, layout: SavedLayout | TwoLevels, tensor: torch.Tensor,
                    stride: tuple[int, ...] | None, state: threading.local) -> PackedSave:
        """The ``PackedSave`` of ``tensor``'s parts, which the hooks outside the packer see first."""
        if state.outer is not None:
            parts = tuple(state.outer[0](part) for part in parts)
        return PackedSave(parts, layout, tensor.shape, stride, state.outer)

    @staticmethod
    def _passed_on(tensor: torch.Tensor, state: threading.local) -> Any:
        """``tensor`` as it is, detached: a saved output handed back with its ``grad_fn`` would
        hold its own node alive (a reference cycle that outlives a forward without backward);
        autograd restores the graph links of what the unpack hook returns."""
        kept = tensor.detach() if tensor.requires_grad else tensor  # shares the version counter
        if state.outer is not None:  # their unpack gives the tensor back; torch checks nothing there either
            return PassedOn(state.outer[0](kept), state.outer[1])
        return VersionChecked(kept, kept._version)

    @staticmethod
    def _unpack(packed: Any) -> torch.Tensor:
        return packed.unpack()  # every entry (VersionChecked, PassedOn, PackedSave, RebuiltProduct)

    def __getstate__(self) -> dict:
        return {"options": self.options}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["options"])

"""Which fake storages hold only ones: followed from real inputs and from the ops that made them.

A Hugging Face model given an all-ones ``attention_mask`` (what a tokenizer
returns for unpadded rows) reads the mask's values to drop it: with no token
masked, ``F.scaled_dot_product_attention`` applies the causal mask itself
(``is_causal=True``) and no mask tensor is made. Fake tensors have no values,
so an estimate would build and keep an explicit mask per attention layer
that the real step never makes (Llama and OPT: +14-15 % of BP's bytes kept at
4 x 128 tokens). The values of the example inputs are known before they are
made fake (``remember_if_all_ones``), and the ops between them and the mask
are few and simple (a cast to bool, a slice, an index), so this mode follows
them: a storage holds only ones when it was made by ``ones``/``full(1)``, or
copied, cast, indexed or compared (``== 1``, ``!= 0``, ``> 0``) from storages
that do; any other write into it forgets it. ``OnesStorages.active_holds``
asks the innermost active one; without one, nothing is known (the
estimate then keeps the mask, on the safe side).
"""

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode, _get_current_dispatch_mode_stack
from torch.utils.weak import WeakIdKeyDictionary

aten = torch.ops.aten
_MADE_OF_ONES = frozenset({aten.ones.default, aten.ones_like.default, aten.new_ones.default})
_FILLED = {aten.full.default: 1, aten.new_full.default: 2, aten.full_like.default: 1,
           aten.scalar_tensor.default: 0}  # op -> position of its fill value
_COPIES_OF_FIRST = frozenset({aten._to_copy.default, aten.clone.default, aten.index.Tensor,
                              aten.index_select.default, aten.repeat.default, aten.gather.default,
                              aten.lift_fresh_copy.default, aten.expand_copy.default})
_COMPARISONS = {aten.eq.Scalar: lambda v: v == 1, aten.ne.Scalar: lambda v: v == 0,
                aten.gt.Scalar: lambda v: v < 1, aten.ge.Scalar: lambda v: v <= 1}
_BOTH_ONES = frozenset({aten.logical_and.default, aten.bitwise_and.Tensor, aten.mul.Tensor})

_INPUTS_OF_ONES: WeakIdKeyDictionary = WeakIdKeyDictionary()  # fake input storage -> True


def _covers_storage(tensor: torch.Tensor) -> bool:
    return tensor.is_contiguous() and tensor.storage_offset() == 0 and (
        tensor.numel() * tensor.element_size() == tensor.untyped_storage().nbytes())


def remember_if_all_ones(real: torch.Tensor, fake: torch.Tensor) -> None:
    """Note ``fake``'s storage as all ones when ``real`` (its real counterpart) is all ones and fills its storage."""
    if real.is_meta or real.is_complex() or real.numel() == 0 or not _covers_storage(real):
        return
    if bool(real.eq(1).all()):
        _INPUTS_OF_ONES[fake.untyped_storage()] = True


class FollowedStorages(TorchDispatchMode):
    """A dispatch mode that follows which fake storages hold values of one known kind (fake tensors have
    none to read), from the ops that wrote them; ``active_holds`` asks the innermost active one."""

    def __init__(self) -> None:
        super().__init__()
        self.storages: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def holds(self, tensor: torch.Tensor) -> bool:
        return tensor.untyped_storage() in self.storages

    @classmethod
    def active_holds(cls, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` lies in a storage the innermost active mode of this class follows; False
        when none is active (nothing is known)."""
        modes = [mode for mode in _get_current_dispatch_mode_stack() if isinstance(mode, cls)]
        return bool(modes) and modes[-1].holds(tensor)


class OnesStorages(FollowedStorages):
    """Follows which fake storages hold only ones while it is active (module docstring)."""

    def __init__(self, known: Iterable[torch.Tensor]) -> None:
        super().__init__()
        for tensor in known:
            if tensor.untyped_storage() in _INPUTS_OF_ONES:
                self.storages[tensor.untyped_storage()] = True

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        ones = self._makes_ones(func, args, kwargs)
        if not (ones or self.storages):  # nothing to follow or to forget: most ops of most models
            return func(*args, **kwargs)
        written = list(written_tensors(func, args, kwargs)) if func._schema.is_mutable else []
        output = func(*args, **kwargs)
        for tensor in written:  # in place: all ones only if it was, or the write covers the storage
            if ones and (self.holds(tensor) or _covers_storage(tensor)):
                self.storages[tensor.untyped_storage()] = True
            else:
                self.storages.pop(tensor.untyped_storage(), None)
        if ones and not written:
            for tensor in pytree.tree_leaves(output):
                if isinstance(tensor, torch.Tensor) and _covers_storage(tensor):
                    self.storages[tensor.untyped_storage()] = True
        return output

    def _makes_ones(self, func: Any, args: tuple, kwargs: dict) -> bool:
        if func in _MADE_OF_ONES:
            return True
        if func in _FILLED:
            position = _FILLED[func]
            return len(args) > position and _is_one(args[position])
        if func is aten.fill_.Scalar:
            return _is_one(args[1])
        if func is aten.copy_.default:
            return isinstance(args[1], torch.Tensor) and self.holds(args[1])
        first = args[0] if args else None
        if func in _COPIES_OF_FIRST:
            return isinstance(first, torch.Tensor) and self.holds(first)
        if func in _COMPARISONS:
            return (isinstance(first, torch.Tensor) and self.holds(first) and len(args) > 1
                    and isinstance(args[1], (bool, int, float)) and _COMPARISONS[func](args[1]))
        if func in _BOTH_ONES:
            return all(isinstance(a, torch.Tensor) and self.holds(a) for a in args[:2])
        if func is aten.cat.default:
            return all(self.holds(t) for t in first)
        return False


def _is_one(value: Any) -> bool:
    return isinstance(value, (bool, int, float)) and value == 1


def written_tensors(func: Any, args: tuple, kwargs: dict) -> Iterator[torch.Tensor]:
    """The tensors an op writes into (its mutable arguments, ``out=`` included)."""
    schema = func._schema
    for index, argument in enumerate(schema.arguments):
        if argument.alias_info is None or not argument.alias_info.is_write:
            continue
        value = args[index] if index < len(args) and not argument.kwarg_only else kwargs.get(argument.name)
        yield from (t for t in pytree.tree_leaves(value) if isinstance(t, torch.Tensor))

"""The loss head: a language model's vocabulary projection whose logits exist only inside the loss.

methods.md section 6. ``cross_entropy(hidden @ W^T, labels)`` keeps a tokens x
vocabulary log-softmax for backward (fp32 when the logits are upcast) and the
logits exist in full; with a 32k-256k vocabulary that is often the largest
tensor of a training step. ``LossHeadLinear`` stands in for the model's output
projection (``lm_head``): in a training forward it returns ``DeferredLogits``,
a tensor with the logits' shape, dtype and device but no storage, which
remembers ``hidden``, the weight and the bias. Hugging Face's loss functions
(and a user's own) shift, flatten and upcast it, and finally call
``F.cross_entropy`` on it: that call becomes
``aalconvert.nn.functional.linear_cross_entropy`` on the remembered tensors,
which forms the logits chunk by chunk and keeps no tensor with a tokens x
vocabulary shape (or, with ``gradients_in_forward``, forms the head's
gradients during forward and keeps those: see that module). Loss and
gradients equal the unfused head's up to fp32 rounding.

Everything else done with the deferred logits computes them first, once, as
the plain layer would have (same op, same autocast state, cached), so any
other use is exact, at BP's memory. Refused with a clear error rather than
given a different number: an in-place op on them, and computing them after the
weight or ``hidden`` changed in place (read ``output.logits`` before
``optimizer.step()``). Under ``torch.compile``, a ``torch.func`` transform,
``no_grad``, in eval mode, or when nothing needs a gradient, the layer is the
plain ``nn.Linear``.
"""

import operator
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_map_only

from aalconvert.nn.approx_common import functorch_active
from aalconvert.nn.linear_cross_entropy import linear_cross_entropy
from aalconvert.nn.rebuild import rebuild_as
from aalconvert.trace import writes_in_place

_METADATA = frozenset({
    "shape", "dtype", "device", "requires_grad", "is_cuda", "ndim", "layout", "is_leaf", "grad_fn",
    "grad", "is_sparse", "is_quantized", "is_meta", "is_nested", "names", "is_mps", "is_xpu", "is_cpu",
})
"""Tensor properties answered from the deferred logits' metadata, without computing them."""

_METADATA_METHODS = frozenset({
    torch.Tensor.size, torch.Tensor.dim, torch.Tensor.ndimension, torch.Tensor.numel, torch.Tensor.nelement,
    torch.Tensor.is_floating_point, torch.Tensor.is_complex, torch.Tensor.element_size, torch.Tensor.get_device,
    torch.Tensor.is_contiguous, torch.Tensor.stride, torch.Tensor.__len__,
})

_SCALE_OPS = {
    torch.Tensor.__truediv__: operator.truediv, torch.Tensor.div: operator.truediv, torch.div: operator.truediv,
    torch.Tensor.__mul__: operator.mul, torch.Tensor.__rmul__: operator.mul, torch.Tensor.mul: operator.mul,
    torch.mul: operator.mul,
}
_TANH_OPS = (torch.tanh, torch.Tensor.tanh, F.tanh)
_UPCASTS = (torch.Tensor.float, torch.Tensor.to, torch.Tensor.type)
_SHAPE_OPS = (torch.Tensor.view, torch.Tensor.reshape, torch.reshape)


class DeferredLogitsError(RuntimeError):
    """The deferred logits were used in a way that cannot give the plain layer's numbers."""


def _property_name(func) -> str | None:
    descriptor = getattr(func, "__self__", None)
    return getattr(descriptor, "__name__", None) if getattr(func, "__name__", "") == "__get__" else None


class DeferredLogits(torch.Tensor):
    """``F.linear(hidden, weight, bias)`` then ``values`` (elementwise steps), not computed yet.

    ``values`` holds the elementwise ops applied since the layer (``("div", c)``,
    ``("mul", c)``, ``("tanh",)``, ``("float",)``); reshapes and indexing that keep
    the vocabulary dimension are applied to ``hidden`` instead.
    """

    hidden: torch.Tensor
    values: tuple

    @staticmethod
    def __new__(cls, hidden, weight, bias, dtype, autocast, values=(), versions=None, gradients_in_forward=False):
        shape = (*hidden.shape[:-1], weight.shape[0])
        return torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device=hidden.device)

    def __init__(self, hidden, weight, bias, dtype, autocast, values=(), versions=None,
                 gradients_in_forward=False) -> None:
        self.hidden, self.weight, self.bias = hidden, weight, bias
        self.gradients_in_forward = gradients_in_forward  # the layer's choice, for the chunked loss
        self.autocast = autocast  # (device type, enabled, dtype) of the layer's call
        self.values = tuple(values)
        self.versions = versions if versions is not None else self._current_versions()
        self._logits: torch.Tensor | None = None

    def forward_autocast(self) -> torch.autocast:
        """The autocast state the layer was called in, to compute in as it would have."""
        device_type, enabled, dtype = self.autocast
        return torch.autocast(device_type, dtype=dtype, enabled=enabled)

    def _current_versions(self) -> tuple[int, ...]:
        return tuple(t._version for t in (self.hidden, self.weight, self.bias) if t is not None)

    def _derived(self, hidden: torch.Tensor | None = None, value=None, dtype=None) -> "DeferredLogits":
        return DeferredLogits(
            self.hidden if hidden is None else hidden, self.weight, self.bias, dtype or self.dtype,
            self.autocast, self.values + ((value,) if value else ()), self.versions, self.gradients_in_forward,
        )

    def softcap(self) -> float | None | bool:
        """The softcap ``c`` of ``c * tanh(logits / c)`` recorded in ``values``; None without one;
        False when the recorded steps are anything else."""
        steps = [step for step in self.values if step[0] != "float"]
        if not steps:
            return None
        if len(steps) == 3 and steps[0][0] == "div" and steps[1] == ("tanh",) and steps[2][0] == "mul":
            if steps[0][1] == steps[2][1]:
                return float(steps[0][1])
        return False

    def materialize(self) -> torch.Tensor:
        """The logits as the plain layer computes them, and the recorded steps (once; cached)."""
        if self._logits is not None:
            return self._logits
        if self._current_versions() != self.versions:
            raise DeferredLogitsError(
                "the logits of a LossHeadLinear are computed when first used, and its weight or input "
                "was modified in place since the forward (e.g. by optimizer.step()): read "
                "output.logits before changing the weights, or convert with skip=[<the lm_head name>]"
            )
        with torch._C.DisableTorchFunctionSubclass(), self.forward_autocast():
            logits = F.linear(self.hidden, self.weight, self.bias)
            for step in self.values:
                logits = _apply_step(logits, step)
        self._logits = logits
        return logits

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self = args[0] if args and isinstance(args[0], DeferredLogits) else None
        if self is not None:
            if _property_name(func) in _METADATA or func in _METADATA_METHODS:
                with torch._C.DisableTorchFunctionSubclass():
                    return func(*args, **kwargs)
            derived = self._derived_by(func, args[1:], kwargs)
            if derived is not None:
                return derived
        if func is F.cross_entropy and self is not None:
            loss = _chunked_cross_entropy(self, *args[1:], **kwargs)
            if loss is not None:
                return loss
        name = getattr(func, "__name__", "")
        if writes_in_place(name):
            raise DeferredLogitsError(
                f"in-place {name} on the deferred logits of a LossHeadLinear: they are computed only "
                "when used, so an in-place change would be lost; use the out-of-place op, or convert "
                "with skip=[<the lm_head name>]"
            )
        with torch._C.DisableTorchFunctionSubclass():  # also inside lists (torch.cat, torch.stack)
            real_args, real_kwargs = tree_map_only(DeferredLogits, DeferredLogits.materialize, (args, kwargs))
        return func(*real_args, **real_kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise DeferredLogitsError(
            f"{func} reached the deferred logits below autograd; please report this with the model code"
        )

    def _derived_by(self, func, rest: tuple, kwargs: dict) -> "DeferredLogits | None":
        """The deferred logits after ``func`` when it is a step they can record, else None."""
        vocabulary = self.shape[-1]
        if func in _SCALE_OPS and len(rest) == 1 and not kwargs and isinstance(rest[0], (int, float)):
            return self._derived(value=("mul" if _SCALE_OPS[func] is operator.mul else "div", rest[0]))
        if func in _TANH_OPS and not rest and not kwargs:
            return self._derived(value=("tanh",))
        if func in _UPCASTS and _is_upcast(rest, kwargs):
            return self._derived(value=("float",), dtype=torch.float32)
        if func is torch.Tensor.contiguous and not rest and not kwargs:
            return self
        if func in _SHAPE_OPS and not kwargs:
            shape = rest[0] if len(rest) == 1 and isinstance(rest[0], (tuple, list, torch.Size)) else rest
            # Only a shape that keeps the vocabulary as its last dimension, spelled out (-1 there
            # may merge it with the tokens: view(-1) flattens everything).
            if shape and all(isinstance(s, int) for s in shape) and shape[-1] == vocabulary:
                return self._derived(hidden=self.hidden.reshape(*shape[:-1], self.hidden.shape[-1]))
        if func is torch.Tensor.__getitem__ and len(rest) == 1 and not kwargs:
            index = rest[0] if isinstance(rest[0], tuple) else (rest[0],)
            if _keeps_last_dim(index, self.dim()):
                return self._derived(hidden=self.hidden[index])
        return None


def _apply_step(logits: torch.Tensor, step: tuple) -> torch.Tensor:
    if step[0] == "div":
        return logits / step[1]
    if step[0] == "mul":
        return logits * step[1]
    if step[0] == "tanh":
        return torch.tanh(logits)
    return logits.float()


def _is_upcast(rest: tuple, kwargs: dict) -> bool:
    """Whether ``.float()``, ``.to(torch.float32)`` or ``.type(torch.float32)`` (and nothing else)."""
    if kwargs:
        return False
    return not rest or (len(rest) == 1 and rest[0] in (torch.float32, "torch.FloatTensor"))


def _keeps_last_dim(index: tuple, dims: int) -> bool:
    """Whether ``tensor[index]`` selects along leading dims only (plain ints and slices)."""
    plain = all(isinstance(i, slice) or (isinstance(i, int) and not isinstance(i, bool)) for i in index)
    return plain and len(index) < dims


def _chunked_cross_entropy(
    logits: DeferredLogits, target, weight=None, size_average=None, ignore_index: int = -100,
    reduce=None, reduction: str = "mean", label_smoothing: float = 0.0,
) -> torch.Tensor | None:
    """``F.cross_entropy`` of the deferred logits in chunks, or None where only the plain op fits."""
    softcap = logits.softcap()
    plain_only = (
        weight is not None or size_average is not None or reduce is not None or softcap is False
        or logits.dim() != 2 or not isinstance(target, torch.Tensor) or target.dim() != 1
        or target.is_floating_point()  # class probabilities
    )
    if plain_only:
        return None
    with logits.forward_autocast():
        return linear_cross_entropy(
            logits.hidden, logits.weight, target, bias=logits.bias, ignore_index=ignore_index,
            reduction=reduction, label_smoothing=label_smoothing, softcap=softcap,
            gradients_in_forward=logits.gradients_in_forward and reduction != "none",
        )


class LossHeadLinear(nn.Linear):
    """``nn.Linear`` (a language model's output projection) whose training logits are deferred.

    See the module docstring. Same Parameters, hooks and state_dict keys as the
    layer it is built from.
    """

    _plain_type: ClassVar[type[nn.Module]] = nn.Linear
    gradients_in_forward: bool
    """Whether a summed loss forms the head's gradients in forward (fewer matmuls) or in backward
    (logits formed again; a second backward works): ``linear_cross_entropy``'s two schemes."""

    @classmethod
    def from_module(cls, module: nn.Linear, gradients_in_forward: bool = False) -> "LossHeadLinear":
        if type(module) is not nn.Linear:
            raise TypeError(f"LossHeadLinear.from_module expects an nn.Linear, got {type(module).__name__}")
        head = rebuild_as(cls, module)
        head.gradients_in_forward = gradients_in_forward
        return head

    def to_module(self) -> nn.Linear:
        return rebuild_as(nn.Linear, self, drop=("gradients_in_forward",))

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self._defers(input):
            return F.linear(input, self.weight, self.bias)
        device_type = input.device.type
        enabled = torch.is_autocast_enabled(device_type)
        autocast_dtype = torch.get_autocast_dtype(device_type)
        dtype = autocast_dtype if enabled else torch.result_type(input, self.weight)
        return DeferredLogits(input, self.weight, self.bias, dtype, (device_type, enabled, autocast_dtype),
                              gradients_in_forward=self.gradients_in_forward)

    def _defers(self, input: torch.Tensor) -> bool:
        return (
            self.training
            and torch.is_grad_enabled()
            and (input.requires_grad or self.weight.requires_grad)
            and input.is_floating_point()
            and not torch.compiler.is_compiling()
            and not functorch_active(input, self.weight)
        )

    def extra_repr(self) -> str:
        when = "forward" if self.gradients_in_forward else "backward"
        return f"{super().extra_repr()}, logits formed inside the loss in chunks, gradients in {when}"

"""In-place activations after a norm that keep the norm's input instead of a copy of their own.

torchvision's EfficientNet, MobileNetV3 and MNASNet-style blocks run
``BatchNorm2d -> SiLU(inplace=True)`` (or ``Hardswish``) before a convolution.
The activation's backward needs its input ``x = bn(z)``; run in place, it
overwrites ``x``, so autograd keeps a copy of ``x`` made just before. The batch
norm keeps ``z`` anyway. ``RecomputedInputSiLU`` (``...Hardswish``, ``...Mish``)
keeps ``z`` instead (no memory: the same storage as the norm's) and in backward
rebuilds ``x`` by running the chain again (``recompute._ChainRecord``: the same
batch-norm kernel on the same values, running statistics untouched), then
differentiates the module's own forward at it: the same backward kernel on the
same operands as BP, so the gradient is bit-identical (methods.md section 4,
cheap recomputation).

The calling convention is the recompute layers' (``recompute.py``):
``forward(input, chain_input=None, chain_output=None)`` with ``chain_input`` /
``chain_output`` from the chain wiring (``rules.wiring.ChainSlot``). Without
them, when ``input`` is not the chain's very output, without autograd, under
torch.func, or on a replica whose chain lives on another device, the module is
the plain activation. The output is ``input`` itself, changed in place, as
the plain in-place module returns it.
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from aalconvert.errors import ConversionError
from aalconvert.nn.approx_common import functorch_active
from aalconvert.nn.rebuild import OwnClassVariant, rebuild_as
from aalconvert.nn.recompute import (
    _batch_norm_again,
    _ChainRecord,
    _saved_tensors,
    chain_rebuildable,
    is_norm_act,
    with_chain,
)


class _InPlaceActivationFunction(torch.autograd.Function):
    """``activation`` run in place on ``x``, keeping ``z`` (``record`` rebuilds ``x`` from it)
    instead of the copy of ``x`` torch keeps for an in-place op."""

    @staticmethod
    def forward(ctx, x, z, activation, record, where):
        ctx.record, ctx.where = record, where
        ctx.out_of_place = next(f for t, f in OUT_OF_PLACE.items() if isinstance(activation, t))
        ctx.saved_shapes = {"the chain input (the tensor entering the norm before this activation)": z.shape}
        ctx.save_for_backward(z)
        activation.forward(x)  # in place: x now holds the output
        ctx.mark_dirty(x)
        return x

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (z,) = _saved_tensors(ctx, ctx.where)
        x = ctx.record.rebuild(z, ctx.where)
        create_graph = torch.is_grad_enabled()
        with torch.enable_grad():
            leaf = x if create_graph else x.detach().requires_grad_()
            output = ctx.out_of_place(leaf)  # the kernel autograd runs for the in-place op
            (grad_x,) = torch.autograd.grad(output, leaf, grad_output, create_graph=create_graph)
        return grad_x, None, None, None, None


class _RecomputedInputActivation:
    """Chain handling of the activation variants (see the module docstring)."""

    chain: tuple[nn.Module, ...] = ()
    _plain_type: type[nn.Module]

    @classmethod
    def from_module(cls, module: nn.Module, chain: tuple[nn.Module, ...] = (), kept_copy: object = None):
        """Build from a plain in-place activation; ``chain``: the norm (and any modules) turning
        the chain input into this activation's input. ``kept_copy`` must be None (exact only)."""
        if type(module) is not cls._plain_type or not getattr(module, "inplace", False):
            raise ConversionError(
                f"{cls.__name__}.from_module expects an in-place nn.{cls._plain_type.__name__}, got "
                f"{module!r}"
            )
        if kept_copy is not None:
            raise ConversionError(f"{cls.__name__} keeps the chain input exactly; it takes no k-bit copy")
        return with_chain(cls, module, chain)

    def to_module(self) -> nn.Module:
        """The plain activation (the chain is dropped)."""
        return rebuild_as(self._plain_type, self, drop=("chain",))

    def describe(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"

    def forward(self, input: torch.Tensor, chain_input: torch.Tensor | None = None,
                chain_output: torch.Tensor | None = None) -> torch.Tensor:
        if (
            chain_input is None
            or not self.inplace  # set after conversion: the plain activation, out of place
            or input is not chain_output
            or not self.chain
            or not chain_rebuildable(self.chain)
            or not (torch.is_grad_enabled() and input.requires_grad)
            or functorch_active(input, chain_input)
            or any(p.device != input.device for m in self.chain for p in m.parameters())
        ):
            return self._plain_type.forward(self, input)
        record = _ChainRecord(self.chain, input)
        return _InPlaceActivationFunction.apply(input, chain_input, self, record, self.describe())

    def extra_repr(self) -> str:
        chain = " -> ".join(type(module).__name__ for module in self.chain) or "unset"
        return f"inplace={self.inplace}, rebuilds its input from chain={chain}"


class RecomputedInputSiLU(_RecomputedInputActivation, nn.SiLU):
    """In-place ``nn.SiLU`` keeping its norm's input instead of a copy of its own."""

    _plain_type = nn.SiLU


class RecomputedInputHardswish(_RecomputedInputActivation, nn.Hardswish):
    """In-place ``nn.Hardswish`` keeping its norm's input instead of a copy of its own."""

    _plain_type = nn.Hardswish


class RecomputedInputMish(_RecomputedInputActivation, nn.Mish):
    """In-place ``nn.Mish`` keeping its norm's input instead of a copy of its own."""

    _plain_type = nn.Mish


OUT_OF_PLACE = {nn.SiLU: F.silu, nn.Hardswish: F.hardswish, nn.Mish: F.mish}
RECOMPUTED_INPUT_ACTIVATIONS: dict[type[nn.Module], type[nn.Module]] = {
    nn.SiLU: RecomputedInputSiLU, nn.Hardswish: RecomputedInputHardswish, nn.Mish: RecomputedInputMish,
}


class _NormalizedPart(_ChainRecord):
    """Rebuilds a fused batch norm's normalized output (before its activation) from its input."""

    step = staticmethod(_batch_norm_again)


def fused_activation_problem(module: nn.Module) -> str | None:
    """Why ``RecomputedNormAct`` cannot take ``module``, or None: it must be a batch norm fused
    with an in-place SiLU, Hardswish or Mish (``recompute.is_norm_act``: timm's ``BatchNormAct2d``)."""
    if isinstance(module, RecomputedNormAct):
        return f"{type(module).__name__} is already converted"
    if not is_norm_act(module):
        return f"{type(module).__name__} is not a batch norm fused with its activation (timm's BatchNormAct2d)"
    act = module.act
    if type(act) not in OUT_OF_PLACE or not act.inplace:
        return f"its activation {act!r} is not an in-place SiLU, Hardswish or Mish"
    return None


class _FusedActivation(TorchFunctionMode):
    """Inside the fused module's own forward, runs its in-place activation on the batch norm's
    output through ``_InPlaceActivationFunction``; any other call passes through."""

    def __init__(self, module: nn.Module, z: torch.Tensor) -> None:
        super().__init__()
        self.module, self.z = module, z

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        x = args[0] if args else kwargs.get("input")
        if func is OUT_OF_PLACE.get(type(self.module.act)) and kwargs.get("inplace") and self._normalized(x):
            record = _NormalizedPart((self.module,), x)
            return _InPlaceActivationFunction.apply(x, self.z, self.module.act, record, type(self.module).__name__)
        return func(*args, **kwargs)

    def _normalized(self, x: object) -> bool:
        """Whether ``x`` is the batch norm of ``z`` (its autograd node reads ``z``'s), unchanged since."""
        node = getattr(x, "grad_fn", None)
        source = self.z.grad_fn
        if node is None or "BatchNorm" not in node.name() or x._version != 0 or not node.next_functions:
            return False
        first = node.next_functions[0][0]
        return first is source if source is not None else getattr(first, "variable", None) is self.z


class RecomputedNormAct(OwnClassVariant):
    """Mixin before a fused batch norm's own class (timm's ``BatchNormAct2d``) whose activation
    is an in-place SiLU, Hardswish or Mish: the activation keeps the norm's input, which the
    batch norm keeps anyway, instead of a copy of the normalized output.

    The module's own forward runs, under a torch-function mode that hands the
    activation's in-place call to ``_InPlaceActivationFunction`` when its input is
    the batch norm of the module's input (read off the autograd graph), so the
    module's own batch-norm arithmetic and statistics updates, and hooks on its
    children, stay as they are. In backward the normalized output is rebuilt by
    ``recompute._batch_norm_again`` (running statistics untouched). Without
    autograd, under torch.func or torch.compile, the plain forward runs.
    """

    @classmethod
    def from_module(cls, module: nn.Module) -> nn.Module:
        """``module`` as a ``RecomputedNormAct`` subclass of its own class, sharing everything it holds."""
        problem = fused_activation_problem(module)
        if problem is not None:
            raise ConversionError(f"RecomputedNormAct cannot take {type(module).__name__}: {problem}")
        return cls.variant_of(module)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if (not torch.is_grad_enabled() or torch.compiler.is_compiling()
                or functorch_active(input, self.weight) or not input.requires_grad):
            return self.torch_class.forward(self, input)
        with _FusedActivation(self, input):
            return self.torch_class.forward(self, input)

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

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from aalconvert.errors import ConversionError
from aalconvert.nn.approx_common import functorch_active
from aalconvert.nn.rebuild import rebuild_as
from aalconvert.nn.recompute import _ChainRecord, _saved_tensors, chain_rebuildable, with_chain


class _RecomputedInputActivationFunction(torch.autograd.Function):
    """``module``'s in-place forward on ``x``, keeping ``z`` (the chain's input) instead of a copy of ``x``."""

    @staticmethod
    def forward(ctx, module, x, z):
        ctx.module, ctx.where = module, module.describe()
        ctx.record = _ChainRecord(module.chain, x)
        ctx.saved_shapes = {"the chain input (the tensor entering the norm before this activation)": z.shape}
        ctx.save_for_backward(z)
        module._plain_type.forward(module, x)  # in place: x now holds the output
        ctx.mark_dirty(x)
        return x

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (z,) = _saved_tensors(ctx, ctx.where)
        x = ctx.record.rebuild(z, ctx.where)
        create_graph = torch.is_grad_enabled()
        with torch.enable_grad():
            leaf = x if create_graph else x.detach().requires_grad_()
            output = ctx.module._function(leaf)  # out of place: the kernel autograd runs for the in-place op
            (grad_x,) = torch.autograd.grad(output, leaf, grad_output, create_graph=create_graph)
        return None, grad_x, None


class _RecomputedInputActivation:
    """Chain handling of the activation variants (see the module docstring)."""

    chain: tuple[nn.Module, ...] = ()
    _plain_type: type[nn.Module]
    _function: Callable[[torch.Tensor], torch.Tensor]  # the plain module's functional, out of place

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
            or input is not chain_output
            or not self.chain
            or not chain_rebuildable(self.chain)
            or not (torch.is_grad_enabled() and input.requires_grad)
            or functorch_active(input, chain_input)
            or any(p.device != input.device for m in self.chain for p in m.parameters())
        ):
            return self._plain_type.forward(self, input)
        return _RecomputedInputActivationFunction.apply(self, input, chain_input)

    def extra_repr(self) -> str:
        chain = " -> ".join(type(module).__name__ for module in self.chain) or "unset"
        return f"inplace={self.inplace}, rebuilds its input from chain={chain}"


class RecomputedInputSiLU(_RecomputedInputActivation, nn.SiLU):
    """In-place ``nn.SiLU`` keeping its norm's input instead of a copy of its own."""

    _plain_type = nn.SiLU
    _function = staticmethod(F.silu)


class RecomputedInputHardswish(_RecomputedInputActivation, nn.Hardswish):
    """In-place ``nn.Hardswish`` keeping its norm's input instead of a copy of its own."""

    _plain_type = nn.Hardswish
    _function = staticmethod(F.hardswish)


class RecomputedInputMish(_RecomputedInputActivation, nn.Mish):
    """In-place ``nn.Mish`` keeping its norm's input instead of a copy of its own."""

    _plain_type = nn.Mish
    _function = staticmethod(F.mish)


RECOMPUTED_INPUT_ACTIVATIONS: dict[type[nn.Module], type[nn.Module]] = {
    nn.SiLU: RecomputedInputSiLU, nn.Hardswish: RecomputedInputHardswish, nn.Mish: RecomputedInputMish,
}

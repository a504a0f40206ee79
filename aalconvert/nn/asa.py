"""ASA: auxiliary sign activation (methods.md section 2).

An ASA layer computes ``y = layer(x + eps * s)`` in train and eval, where
``s = sign(x)`` in {-1, +1} (``x <= 0`` gives -1; variant ``"sign"``) or
``s = 1[x > 0]`` in {0, 1} (variant ``"relu"``, for inputs straight from a
ReLU). For backward it keeps only ``s`` packed to 1 bit per element
(``ceil(N / 8)`` bytes for an N-element input), never ``x``:
``dW = lr_expansion * eps * conv_weight_grad(s, g)`` (linear:
``lr_expansion * eps * g^T s``), ``dx = g W`` (exact for the perturbed forward,
since ``s`` is piecewise constant) and ``db = sum(g)``.

``ASATransposedLinear`` does the same for a zoo ``Conv1D`` (GPT-2's linear
layers, weight stored (in, out)): ``y = (x + eps*s) @ W + b`` and
``dW = lr_expansion * eps * s^T g`` of shape (in, out).

Layers reading the same input (Q, K, V) should share one packed mask: compute
it once with ``pack_sign`` (or the ``ASASignPack`` module) and pass it to each
layer as ``packed_sign``; all of them then save that same tensor.
"""

import math

import torch
from torch import nn

from aalconvert.errors import ConversionError
from aalconvert.kernels import pack_bits, packed_nbytes, unpack_bits
from aalconvert.nn.function_output import own_output
from aalconvert.nn.rebuild import rebuild_as
from aalconvert.nn.saved import saved_tensors_or_raise
from aalconvert.nn.weighted import (
    TransposedLinearGeometry,
    WeightedGeometry,
    check_convertible,
    in_place_message,
    is_unbatched,
    needs_autograd,
)
from aalconvert.nn.zoo_linear import TransposedLinearVariant

SIGN_VARIANTS = ("sign", "relu")
_DECODING = {"sign": "sign", "relu": "binary"}
_OPTIONS = ("eps", "lr_expansion", "variant")


def pack_sign(x: torch.Tensor) -> torch.Tensor:
    """The 1-bit mask ``x > 0`` of ``x`` as ``ceil(x.numel() / 8)`` uint8 bytes.

    Both variants share it: ``"sign"`` decodes a bit as -1/+1, ``"relu"`` as 0/1.
    """
    return pack_bits(x.detach())


def auxiliary_sign(x: torch.Tensor, variant: str) -> torch.Tensor:
    """``s`` of ``x`` in ``x``'s dtype: -1/+1 (``"sign"``, x <= 0 -> -1) or 0/1 (``"relu"``)."""
    positive = (x > 0).to(x.dtype)
    return positive * 2 - 1 if variant == "sign" else positive


class ASASignPack(nn.Module):
    """Packs an input's sign once for every ASA layer that reads that input.

    Returns ``pack_sign(x)``, or ``None`` when autograd is off (nothing will be
    saved then, so nothing is packed); ASA layers accept either.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor | None:
        return pack_sign(x) if torch.is_grad_enabled() else None


def validate_options(eps: float, lr_expansion: float, variant: str, where: str) -> None:
    """ConversionError unless eps and lr_expansion are finite numbers > 0 and variant is known."""
    for name, value in (("eps", eps), ("lr_expansion", lr_expansion)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConversionError(f"{where}: {name} must be a number, got {value!r}")
        if not math.isfinite(value) or value <= 0:
            raise ConversionError(f"{where}: {name} must be a finite number > 0, got {value!r}")
    if variant not in SIGN_VARIANTS:
        raise ConversionError(
            f"{where}: variant must be one of {SIGN_VARIANTS} ('relu' for inputs coming "
            f"straight from a ReLU), got {variant!r}"
        )


def checked_packed_sign(layer: str, x: torch.Tensor, packed_sign: torch.Tensor | None) -> torch.Tensor:
    """``packed_sign`` if it fits ``x`` (``pack_sign(x)`` when None); ConversionError naming ``layer`` if not."""
    if packed_sign is None:
        return pack_sign(x)
    if (
        packed_sign.dtype != torch.uint8
        or packed_sign.numel() != packed_nbytes(x.numel())
        or packed_sign.device != x.device
    ):
        raise ConversionError(
            f"{layer}: packed_sign is {packed_sign.numel()} {packed_sign.dtype} values on "
            f"{packed_sign.device}, but an input of shape {tuple(x.shape)} on {x.device} "
            f"needs {packed_nbytes(x.numel())} uint8 bytes: pass pack_sign(x) of this "
            "layer's own input"
        )
    return packed_sign


class ASAFunction(torch.autograd.Function):
    """Forward ``layer(x + eps*s)``; saves the packed sign and the weight, not ``x``."""

    @staticmethod
    def forward(ctx, x, packed_sign, weight, bias, geometry, eps, lr_expansion, variant, layer):
        ctx.geometry = geometry
        ctx.input_shape = tuple(x.shape)
        ctx.weight_scale = lr_expansion * eps
        ctx.variant = variant
        ctx.layer = layer
        ctx.save_for_backward(packed_sign, weight)
        perturbed = torch.add(x, auxiliary_sign(x, variant), alpha=eps)
        return own_output(geometry.forward(perturbed, weight, bias))

    @staticmethod
    def backward(ctx, grad_output):
        packed_sign, weight = saved_tensors_or_raise(
            ctx,
            lambda _: in_place_message(
                ctx.layer, "the packed ASA sign mask or this layer's weight"
            ),
        )
        need_dx, _, need_dw, need_db = ctx.needs_input_grad[:4]
        if need_dw:
            sign = unpack_bits(
                packed_sign,
                ctx.input_shape,
                decode=_DECODING[ctx.variant],
                dtype=grad_output.dtype,
            )
        else:
            sign = grad_output.new_empty(1).expand(ctx.input_shape)
        dx, dw, db = ctx.geometry.gradients(grad_output, sign, weight, (need_dx, need_dw, need_db))
        if dw is not None:
            dw = dw * ctx.weight_scale
        return dx, None, dw, db, None, None, None, None, None


class _ASAMixin:
    """Shared forward/conversion of the ASA layers (mixed in before the torch class)."""

    _torch_base: type[nn.Module]
    eps: float
    lr_expansion: float
    variant: str

    @classmethod
    def from_module(
        cls,
        module: nn.Module,
        *,
        eps: float = 0.01,
        lr_expansion: float = 100.0,
        variant: str = "sign",
    ):
        """The ASA variant of ``module``, sharing its Parameters (a missing bias stays missing).

        ``eps`` is the perturbation size (input units), ``lr_expansion`` scales
        the weight gradient, ``variant`` is ``"sign"`` or ``"relu"``.
        """
        validate_options(eps, lr_expansion, variant, f"{cls.__name__}.from_module")
        check_convertible(module, (cls._torch_base,))
        WeightedGeometry.of(module)
        new = rebuild_as(cls, module)
        new.eps = float(eps)
        new.lr_expansion = float(lr_expansion)
        new.variant = variant
        return new

    def to_module(self) -> nn.Module:
        """The plain torch layer with the same Parameters (ASA options dropped)."""
        return rebuild_as(self._torch_base, self, drop=_OPTIONS)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, eps={self.eps}, lr_expansion={self.lr_expansion}, "
            f"variant={self.variant!r}"
        )

    def forward(self, x: torch.Tensor, packed_sign: torch.Tensor | None = None) -> torch.Tensor:
        """``layer(x + eps*s)``; ``packed_sign``: ``pack_sign(x)`` shared by all readers of ``x``."""
        return self._perturbed(x, packed_sign, self.bias)

    def _perturbed(self, x: torch.Tensor, packed_sign: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
        layer = type(self).__name__
        geometry = WeightedGeometry.of(self)
        if not needs_autograd(x, self):
            perturbed = torch.add(x, auxiliary_sign(x, self.variant), alpha=self.eps)
            return super().forward(perturbed) if bias is self.bias else geometry.forward(perturbed, self.weight, bias)
        packed_sign = checked_packed_sign(layer, x, packed_sign)
        unbatched = is_unbatched(geometry, x)
        y = ASAFunction.apply(
            x.unsqueeze(0) if unbatched else x, packed_sign, self.weight, bias, geometry,
            self.eps, self.lr_expansion, self.variant, layer,
        )
        return y.squeeze(0) if unbatched else y


class ASALinear(_ASAMixin, nn.Linear):
    """nn.Linear on ``x + eps*s`` keeping a 1-bit sign of ``x`` (any leading dims, 1-D too)."""

    _torch_base = nn.Linear

    def routed_linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``F.linear(x, self.weight, bias)`` as this layer computes it, for a parent whose own
        forward calls ``F.linear`` on this layer's weight (``routed_linear.RoutedLinears``);
        ``bias`` is the one that call passes (Swin V2 passes a copy of ``self.bias``)."""
        return self._perturbed(x, None, bias)


class ASAConv1d(_ASAMixin, nn.Conv1d):
    """nn.Conv1d on ``x + eps*s`` keeping a 1-bit sign of ``x``."""

    _torch_base = nn.Conv1d


class ASAConv2d(_ASAMixin, nn.Conv2d):
    """nn.Conv2d on ``x + eps*s`` keeping a 1-bit sign of ``x``."""

    _torch_base = nn.Conv2d


class ASATransposedLinear(TransposedLinearVariant):
    """A zoo ``Conv1D`` (``x @ W + b``, ``W`` (in, out)) on ``x + eps*s`` keeping a 1-bit sign of ``x``.

    Built with ``ASATransposedLinear.from_module(conv1d, eps=..., lr_expansion=...,
    variant=...)``; same Parameters and state_dict keys as the zoo layer.
    """

    OPTIONS = _OPTIONS

    @classmethod
    def from_module(
        cls,
        module: nn.Module,
        *,
        eps: float = 0.01,
        lr_expansion: float = 100.0,
        variant: str = "sign",
    ) -> "ASATransposedLinear":
        """The ASA variant of zoo ``Conv1D`` ``module``, sharing its Parameters; options as in ``ASALinear``."""
        validate_options(eps, lr_expansion, variant, f"{cls.__name__}.from_module")
        new = cls.rebuild_from(module)
        new.eps = float(eps)
        new.lr_expansion = float(lr_expansion)
        new.variant = variant
        return new

    def forward(self, x: torch.Tensor, packed_sign: torch.Tensor | None = None) -> torch.Tensor:
        """``(x + eps*s) @ W + b``; ``packed_sign``: ``pack_sign(x)`` shared by all readers of ``x``."""
        geometry = TransposedLinearGeometry()
        if not needs_autograd(x, self):
            perturbed = torch.add(x, auxiliary_sign(x, self.variant), alpha=self.eps)
            return geometry.forward(perturbed, self.weight, self.bias)
        layer = type(self).__name__
        return ASAFunction.apply(
            x, checked_packed_sign(layer, x, packed_sign), self.weight, self.bias, geometry,
            self.eps, self.lr_expansion, self.variant, layer,
        )

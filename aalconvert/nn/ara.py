"""ARA: auxiliary residual activation (methods.md section 1).

Inside a group of residual blocks every ARA layer computes its usual forward,
but keeps for backward only a reference to the group's *anchor* (the input of
the group's first block) instead of its own input. Backward uses the anchor for
the weight gradient and is exact otherwise:
``dW = conv_weight_grad(anchor, g)`` (linear: ``g^T anchor``), ``dx`` exact,
``db = sum(g)``. All layers of a group save the same anchor tensor, so its
storage is kept once; the anchor never receives a gradient from these layers.

The layer geometry shared with ASA lives in ``aalconvert.nn.weighted``.
"""

import torch
from torch import nn

from aalconvert.errors import ConversionError
from aalconvert.nn.function_output import own_output
from aalconvert.nn.rebuild import rebuild_as
from aalconvert.nn.saved import saved_tensors_or_raise
from aalconvert.nn.weighted import (
    WeightedGeometry,
    check_convertible,
    in_place_message,
    is_unbatched,
    needs_autograd,
)


class ARAFunction(torch.autograd.Function):
    """Forward ``y = layer(x)``; backward with ``dW`` from the anchor, exact ``dx`` and ``db``.

    Saves only ``anchor`` and ``weight`` (never ``x``). The anchor is an input
    whose gradient is always ``None``: no real gradient is mixed into it.
    """

    @staticmethod
    def forward(ctx, x, anchor, weight, bias, geometry, layer):
        ctx.geometry = geometry
        ctx.layer = layer
        ctx.anchor_shape = tuple(anchor.shape)
        ctx.save_for_backward(anchor, weight)
        return own_output(geometry.forward(x, weight, bias))

    @staticmethod
    def backward(ctx, grad_output):
        anchor, weight = saved_tensors_or_raise(
            ctx,
            lambda _: in_place_message(
                ctx.layer,
                f"the ARA anchor (input of the group's first block, shape {ctx.anchor_shape}) "
                "or this layer's weight",
            ),
        )
        need_dx, _, need_dw, need_db = ctx.needs_input_grad[:4]
        dx, dw, db = ctx.geometry.gradients(
            grad_output, anchor, weight, (need_dx, need_dw, need_db)
        )
        return dx, None, dw, db, None, None


def _shape_error(layer: str, input_shape, anchor_shape) -> ConversionError:
    return ConversionError(
        f"{layer}: the ARA anchor has shape {tuple(anchor_shape)} but the layer input has "
        f"shape {tuple(input_shape)}; an anchor must be the input of the first block of "
        "a group whose blocks all take inputs of the same shape"
    )


class _ARAMixin:
    """Shared forward/conversion of the ARA layers (mixed in before the torch class)."""

    _torch_base: type[nn.Module]

    @classmethod
    def from_module(
        cls,
        module: nn.Module,
        *,
        input_shape: tuple[int, ...] | None = None,
        anchor_shape: tuple[int, ...] | None = None,
    ):
        """The ARA variant of ``module``, sharing its Parameters.

        ``input_shape`` and ``anchor_shape`` (optional, e.g. from tracing) are
        checked against each other so that a wrong grouping fails here rather
        than in the first forward.
        """
        check_convertible(module, (cls._torch_base,))
        WeightedGeometry.of(module)
        if input_shape is not None and anchor_shape is not None:
            if tuple(input_shape) != tuple(anchor_shape):
                raise _shape_error(cls.__name__, input_shape, anchor_shape)
        return rebuild_as(cls, module)

    def to_module(self) -> nn.Module:
        """The plain torch layer with the same Parameters."""
        return rebuild_as(self._torch_base, self)

    def forward(self, x: torch.Tensor, anchor: torch.Tensor | None = None) -> torch.Tensor:
        """``layer(x)``; with an ``anchor``, backward uses it for the weight gradient."""
        if anchor is None:
            return super().forward(x)
        layer = type(self).__name__
        if anchor.shape != x.shape:
            raise _shape_error(layer, x.shape, anchor.shape)
        if anchor.dtype != x.dtype or anchor.device != x.device:
            raise ConversionError(
                f"{layer}: the ARA anchor is {anchor.dtype} on {anchor.device} but the input "
                f"is {x.dtype} on {x.device}; they must match"
            )
        geometry = WeightedGeometry.of(self)
        if not needs_autograd(x, self):
            return super().forward(x)
        if is_unbatched(geometry, x):
            y = ARAFunction.apply(
                x.unsqueeze(0), anchor.unsqueeze(0), self.weight, self.bias, geometry, layer
            )
            return y.squeeze(0)
        return ARAFunction.apply(x, anchor, self.weight, self.bias, geometry, layer)


class ARALinear(_ARAMixin, nn.Linear):
    """nn.Linear whose weight gradient can come from a group anchor (any leading dims)."""

    _torch_base = nn.Linear


class ARAConv1d(_ARAMixin, nn.Conv1d):
    """nn.Conv1d whose weight gradient can come from a group anchor."""

    _torch_base = nn.Conv1d


class ARAConv2d(_ARAMixin, nn.Conv2d):
    """nn.Conv2d whose weight gradient can come from a group anchor."""

    _torch_base = nn.Conv2d

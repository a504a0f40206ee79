"""ARA: auxiliary residual activation (methods.md section 1).

Inside a group of residual blocks every ARA layer computes its usual forward,
but keeps for backward only a reference to the group's *anchor* (the input of
the group's first block) instead of its own input. Backward uses the anchor for
the weight gradient and is exact otherwise:
``dW = conv_weight_grad(anchor, g)`` (linear: ``g^T anchor``), ``dx`` exact,
``db = sum(g)``. All layers of a group save the same anchor tensor, so its
storage is kept once; the anchor never receives a gradient from these layers.

The module also holds what the auxiliary-activation variants share (ASA uses
it): ``WeightedGeometry`` (forward and the three gradients of a Linear, Conv1d
or Conv2d from explicit tensors), building a variant around an existing
module's Parameters, and turning torch's "modified in place" error into
``SavedTensorModifiedError``.
"""

from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from aalconvert.errors import ConversionError, SavedTensorModifiedError

ModuleT = TypeVar("ModuleT", bound=nn.Module)
_MODULE_INTERNALS = frozenset(vars(nn.Module()))


@dataclass(frozen=True)
class WeightedGeometry:
    """Hyper-parameters of a Linear (``spatial_dims`` 0), Conv1d (1) or Conv2d (2).

    ``padding`` is the module's own (ints or 'same'/'valid'), used verbatim in
    forward so that forward is bit-identical to torch. Backward needs explicit
    numbers: ``left_padding`` per spatial dim plus ``right_extra``, the extra
    zeros torch adds on the right for 'same' when the total padding is odd.
    """

    spatial_dims: int
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] | str = ()
    left_padding: tuple[int, ...] = ()
    right_extra: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1

    @classmethod
    def of(cls, module: nn.Module) -> "WeightedGeometry":
        """Geometry of a Linear/Conv1d/Conv2d; ConversionError for anything else."""
        if isinstance(module, nn.Linear):
            return cls(spatial_dims=0)
        if not isinstance(module, (nn.Conv1d, nn.Conv2d)):
            raise ConversionError(
                f"{type(module).__name__} is not a Linear, Conv1d or Conv2d; "
                "auxiliary-activation variants exist only for those"
            )
        if module.padding_mode != "zeros":
            raise ConversionError(
                f"{type(module).__name__} uses padding_mode={module.padding_mode!r}; the "
                "auxiliary-activation variants support only padding_mode='zeros': "
                "leave this layer unconverted"
            )
        dims = len(module.kernel_size)
        if module.padding == "valid":
            left, extra = (0,) * dims, (0,) * dims
        elif module.padding == "same":
            totals = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size)]
            left = tuple(total // 2 for total in totals)
            extra = tuple(total - 2 * (total // 2) for total in totals)
        else:
            left, extra = tuple(module.padding), (0,) * dims
        return cls(
            spatial_dims=dims,
            stride=tuple(module.stride),
            padding=module.padding,
            left_padding=left,
            right_extra=extra,
            dilation=tuple(module.dilation),
            groups=module.groups,
        )

    def forward(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        """The layer's ordinary output, computed exactly as torch computes it."""
        if self.spatial_dims == 0:
            return F.linear(x, weight, bias)
        conv = F.conv1d if self.spatial_dims == 1 else F.conv2d
        return conv(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def gradients(
        self,
        grad_output: torch.Tensor,
        source: torch.Tensor,
        weight: torch.Tensor,
        needs: tuple[bool, bool, bool],
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """``(dx, dW, db)`` for output gradient ``grad_output``; ``None`` where not needed.

        ``dW`` is the weight gradient the layer would have had if its input had
        been ``source`` (same shape as the real input); ``dx`` depends only on
        that shape and ``db`` on neither, so both are exact. Arithmetic runs in
        ``grad_output``'s dtype (as under autocast); autograd casts each result
        to the dtype of the tensor it belongs to.
        """
        g = grad_output
        source = source.to(g.dtype)
        weight = weight.to(g.dtype)
        if self.spatial_dims == 0:
            return self._linear_gradients(g, source, weight, needs)
        return self._conv_gradients(g, source, weight, needs)

    @staticmethod
    def _linear_gradients(g, source, weight, needs):
        need_dx, need_dw, need_db = needs
        rows = g.reshape(-1, g.shape[-1])
        dx = g.matmul(weight) if need_dx else None
        dw = rows.t().mm(source.reshape(-1, source.shape[-1])) if need_dw else None
        db = rows.sum(0) if need_db else None
        return dx, dw, db

    def _conv_gradients(self, g, source, weight, needs):
        need_dx, need_dw, need_db = needs
        shape = source.shape
        if any(self.right_extra):
            pad = [amount for extra in reversed(self.right_extra) for amount in (0, extra)]
            source = F.pad(source, pad) if need_dw else source.new_empty(1).expand(
                *shape[:2], *(n + e for n, e in zip(shape[2:], self.right_extra))
            )
        dx, dw, db = torch.ops.aten.convolution_backward(
            g,
            source,
            weight,
            [weight.shape[0]] if need_db else None,
            self.stride,
            self.left_padding,
            self.dilation,
            False,
            [0] * self.spatial_dims,
            self.groups,
            [need_dx, need_dw, need_db],
        )
        if need_dx and any(self.right_extra):
            for dim, size in enumerate(shape[2:], start=2):
                dx = dx.narrow(dim, 0, size)
        return dx, dw, db


def check_convertible(module: nn.Module, bases: tuple[type[nn.Module], ...]) -> type[nn.Module]:
    """The torch base class ``module`` is an instance of; ConversionError if it cannot be converted.

    Subclasses are accepted only if they keep the base's forward (otherwise
    the variant would silently drop their behaviour).
    """
    for base in bases:
        if isinstance(module, base):
            if type(module).forward is not base.forward:
                raise ConversionError(
                    f"{type(module).__name__} overrides {base.__name__}.forward (already a "
                    "variant, or custom behaviour); convert only plain "
                    f"{base.__name__} modules"
                )
            if isinstance(module.weight, nn.parameter.UninitializedParameter):
                raise ConversionError(
                    f"{type(module).__name__} has an uninitialized (lazy) weight; run one "
                    "forward before converting it"
                )
            return base
    names = ", ".join(base.__name__ for base in bases)
    raise ConversionError(f"cannot convert {type(module).__name__}: expected one of {names}")


def share_parameters(
    module: nn.Module, target: type[ModuleT], skip: tuple[str, ...] = ()
) -> ModuleT:
    """A new ``target`` with ``module``'s hyper-parameters and the very same Parameter objects.

    Nothing is allocated: weight and bias are the original Parameters, so
    state_dict keys and optimizers built before conversion keep working.
    Attributes named in ``skip`` (a variant's own options) are not copied.
    """
    new = target.__new__(target)
    nn.Module.__init__(new)
    for name, value in vars(module).items():
        if name not in _MODULE_INTERNALS and name not in skip:
            setattr(new, name, value)
    new.register_parameter("weight", module.weight)
    new.register_parameter("bias", module.bias)
    new.train(module.training)
    return new


def saved_tensors_or_raise(ctx, layer: str, description: str) -> tuple[torch.Tensor, ...]:
    """``ctx.saved_tensors``, turning torch's in-place-modification error into a clear one."""
    try:
        return ctx.saved_tensors
    except RuntimeError as error:
        if "modified by an inplace operation" not in str(error):
            raise
        raise SavedTensorModifiedError(
            f"{layer}: {description} was modified in place between forward and backward, "
            "so its weight gradient would be wrong. Do not write into it in place "
            "(e.g. use inplace=False activations, avoid `+=` on it)."
        ) from error


def needs_autograd(x: torch.Tensor, module: nn.Module) -> bool:
    """True when this forward will be differentiated, so something must be saved."""
    if not torch.is_grad_enabled():
        return False
    parameters = (module.weight, module.bias)
    return x.requires_grad or any(p is not None and p.requires_grad for p in parameters)


def is_unbatched(geometry: WeightedGeometry, x: torch.Tensor) -> bool:
    """True when ``x`` is an unbatched conv input (torch accepts those; backward needs a batch)."""
    return geometry.spatial_dims > 0 and x.dim() == geometry.spatial_dims + 1


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
        return geometry.forward(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_output):
        anchor, weight = saved_tensors_or_raise(
            ctx,
            ctx.layer,
            f"the ARA anchor (input of the group's first block, shape {ctx.anchor_shape}) "
            "or this layer's weight",
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
        return share_parameters(module, cls)

    def to_module(self) -> nn.Module:
        """The plain torch layer with the same Parameters."""
        return share_parameters(self, self._torch_base)

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

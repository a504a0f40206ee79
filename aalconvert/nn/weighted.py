"""Geometry of the weighted layers the auxiliary-activation variants replace (ARA, ASA).

``WeightedGeometry`` gives forward and the three gradients of a Linear, Conv1d
or Conv2d (``TransposedLinearGeometry`` the same for a zoo ``Conv1D``, a linear
with an (in, out) weight) from explicit tensors, so a variant's backward can
use a tensor other than the layer's own input for the weight gradient
(methods.md sections 1-2).
The helpers below decide whether a module can be converted and whether a
forward will be differentiated.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from aalconvert.errors import ConversionError
from aalconvert.nn.approx_common import functorch_active


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


def transposed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``x @ weight + bias`` with an (in, out) weight, computed as zoo ``Conv1D`` computes it.

    One ``addmm`` on ``x`` folded to (rows, in), so the result is bit-identical
    to the zoo layer's own forward (``F.linear`` with ``weight.t()`` is not, for
    strided half-precision inputs).
    """
    rows = torch.addmm(bias, x.reshape(-1, x.shape[-1]), weight)
    return rows.view(*x.shape[:-1], weight.shape[1])


@dataclass(frozen=True)
class TransposedLinearGeometry:
    """``WeightedGeometry``'s interface for a linear whose weight is stored (in, out) (zoo ``Conv1D``).

    ``forward`` is the zoo layer's arithmetic; ``gradients`` give ``dW`` in the
    weight's own (in, out) layout, so autograd hands it to the Parameter as is.
    """

    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """The zoo layer's ordinary output (``transposed_linear``)."""
        return transposed_linear(x, weight, bias)

    def gradients(
        self,
        grad_output: torch.Tensor,
        source: torch.Tensor,
        weight: torch.Tensor | None,
        needs: tuple[bool, bool, bool],
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """``(dx, dW, db)`` as ``WeightedGeometry.gradients``, with ``dW = source^T g`` of shape (in, out).

        The ops are those of autograd through ``addmm`` on the folded rows
        (``weight`` may be None when ``dx`` is not needed).
        """
        need_dx, need_dw, need_db = needs
        rows = grad_output.reshape(-1, grad_output.shape[-1])
        dx = rows.mm(weight.to(rows.dtype).t()).view(source.shape) if need_dx else None
        dw = source.reshape(-1, source.shape[-1]).to(rows.dtype).t().mm(rows) if need_dw else None
        db = rows.sum(0) if need_db else None
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


def needs_autograd(x: torch.Tensor, module: nn.Module) -> bool:
    """True when this forward will be differentiated, so something must be saved.

    False under a torch.func transform: the variants' Functions have no
    ``setup_context``, and the plain torch layer differentiates exactly there.
    """
    if not torch.is_grad_enabled() or functorch_active(x, module.weight):
        return False
    parameters = (module.weight, module.bias)
    return x.requires_grad or any(p is not None and p.requires_grad for p in parameters)


def is_unbatched(geometry: WeightedGeometry, x: torch.Tensor) -> bool:
    """True when ``x`` is an unbatched conv input (torch accepts those; backward needs a batch)."""
    return geometry.spatial_dims > 0 and x.dim() == geometry.spatial_dims + 1


def in_place_message(layer: str, description: str) -> str:
    """What to tell the user when ``description`` (kept for ``layer``'s backward) was modified in place."""
    return (
        f"{layer}: {description} was modified in place between forward and backward, "
        "so its weight gradient would be wrong. Do not write into it in place "
        "(e.g. use inplace=False activations, avoid `+=` on it)."
    )

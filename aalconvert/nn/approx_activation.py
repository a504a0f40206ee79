"""GELU, SiLU and softmax that keep a k-bit copy for backward.

GELU and SiLU keep their input and evaluate torch's own derivative at the
decoded input. Softmax keeps its output ``y`` and computes
``dx = y * (g - sum(g * y, dim))`` from the decoded output; ``approx_softmax``
is the same as a function (e.g. for attention probabilities).
"""

import torch
import torch.nn.functional as F
from torch import nn

from aalconvert.errors import ConversionError
from aalconvert.nn.approx_common import (
    ApproxOptions,
    ApproxVariant,
    compress,
    needs_graph,
    restore,
)


class ApproxGELUFunction(torch.autograd.Function):
    """``F.gelu`` (approximate 'none' or 'tanh') keeping a k-bit input."""

    @staticmethod
    def forward(ctx, x, approximate: str, options: ApproxOptions):
        y = F.gelu(x, approximate=approximate)
        saved, ctx.layout = compress(x, options)
        ctx.approximate = approximate
        ctx.save_for_backward(*saved)
        return y

    @staticmethod
    def backward(ctx, g):
        x = restore(ctx.saved_tensors, ctx.layout)
        return torch.ops.aten.gelu_backward(g, x, approximate=ctx.approximate), None, None


class ApproxSiLUFunction(torch.autograd.Function):
    """``F.silu`` keeping a k-bit input (in place when asked, like ``nn.SiLU(inplace=True)``)."""

    @staticmethod
    def forward(ctx, x, inplace: bool, options: ApproxOptions):
        saved, ctx.layout = compress(x, options)
        if inplace:
            if not ctx.layout.quantized:  # the exact copy must survive the in-place write
                saved = (x.clone(),)
            F.silu(x, inplace=True)
            ctx.mark_dirty(x)
            y = x
        else:
            y = F.silu(x)
        ctx.save_for_backward(*saved)
        return y

    @staticmethod
    def backward(ctx, g):
        x = restore(ctx.saved_tensors, ctx.layout)
        return torch.ops.aten.silu_backward(g, x), None, None


class ApproxSoftmaxFunction(torch.autograd.Function):
    """``torch.softmax`` keeping a k-bit copy of its output."""

    @staticmethod
    def forward(ctx, x, dim: int, options: ApproxOptions):
        y = torch.softmax(x, dim)
        saved, ctx.layout = compress(y, options)
        ctx.dim = dim
        ctx.save_for_backward(*saved)
        return y

    @staticmethod
    def backward(ctx, g):
        y = restore(ctx.saved_tensors, ctx.layout)
        return torch.ops.aten._softmax_backward_data(g, y, ctx.dim, y.dtype), None, None


def approx_softmax(x: torch.Tensor, dim: int, options: ApproxOptions | None = None) -> torch.Tensor:
    """``torch.softmax(x, dim)`` whose output is kept in ``options.bits`` bits for backward."""
    if not isinstance(dim, int) or isinstance(dim, bool):
        raise ConversionError(f"approx_softmax: dim must be an int, got {dim!r}")
    if not needs_graph(x):
        return torch.softmax(x, dim)
    return ApproxSoftmaxFunction.apply(x, dim, options or ApproxOptions())


class ApproxGELU(ApproxVariant, nn.GELU):
    """``nn.GELU`` (approximate='none' or 'tanh') keeping a k-bit copy of its input."""

    torch_class = nn.GELU

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not needs_graph(x):
            return super().forward(x)
        return ApproxGELUFunction.apply(x, self.approximate, self.approx_options)


class ApproxSiLU(ApproxVariant, nn.SiLU):
    """``nn.SiLU`` keeping a k-bit copy of its input."""

    torch_class = nn.SiLU

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not needs_graph(x):
            return super().forward(x)
        return ApproxSiLUFunction.apply(x, self.inplace, self.approx_options)


class ApproxSoftmax(ApproxVariant, nn.Softmax):
    """``nn.Softmax`` keeping a k-bit copy of its output."""

    torch_class = nn.Softmax

    @classmethod
    def check_convertible(cls, module: nn.Module) -> None:
        if module.dim is None:
            raise ConversionError(
                "ApproxSoftmax: the nn.Softmax has dim=None (torch guesses the dim from the "
                "input's rank); build it with an explicit dim, e.g. nn.Softmax(dim=-1)"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return approx_softmax(x, self.dim, self.approx_options)

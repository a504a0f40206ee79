"""Linear and convolution layers that keep a k-bit copy of their input for backward.

Also zoo transposed linears (GPT-2's ``Conv1D``, weight stored (in, out)):
``ApproxTransposedLinear``, whose forward is the zoo layer's own ``addmm``.

Forward is exactly torch's (or the zoo layer's). Backward: ``dx = g W`` (exact, from the Parameter),
``db = sum(g)`` (exact), and only ``dW = g^T x`` uses the decoded input. So the
input copy is made only when the weight needs a gradient, and the weight is
kept only when the input needs one (a Parameter: no activation memory).
"""

import torch
import torch.nn.functional as F
from torch import nn

from aalconvert.errors import ConversionError
from aalconvert.nn.approx_common import (
    ApproxOptions,
    ApproxVariant,
    compress,
    make_options,
    needs_graph,
    restore,
)
from aalconvert.nn.function_output import own_output
from aalconvert.nn.weighted import TransposedLinearGeometry, transposed_linear
from aalconvert.nn.zoo_linear import TransposedLinearVariant

_CONV_FORWARD = {1: F.conv1d, 2: F.conv2d}


class ApproxLinearFunction(torch.autograd.Function):
    """``F.linear`` whose input is kept quantized for the weight gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias, options: ApproxOptions):
        y = F.linear(x, weight, bias)
        saved, ctx.layout = compress(x, options) if ctx.needs_input_grad[1] else ((), None)
        ctx.save_for_backward(weight if ctx.needs_input_grad[0] else None, *saved)
        return own_output(y)

    @staticmethod
    def backward(ctx, g):
        weight, *saved = ctx.saved_tensors
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        out_features = g.shape[-1]
        g_rows = g.reshape(-1, out_features)
        # ``.to(g.dtype)``: under autocast g is in the low precision, weight and x may not be;
        # autograd casts each returned gradient back to its input's dtype.
        dx = g.matmul(weight.to(g.dtype)) if need_dx else None
        dw = None
        if need_dw:
            x = restore(saved, ctx.layout)
            dw = g_rows.t().matmul(x.reshape(-1, x.shape[-1]).to(g.dtype))
        db = g_rows.sum(0) if need_db else None
        return dx, dw, db, None


def numeric_padding(padding, weight: torch.Tensor, dilation: tuple[int, ...]) -> tuple[int, ...]:
    """Padding per spatial dim (elements) for a symmetric ``padding`` given as ints, 'valid' or 'same'."""
    spatial = weight.shape[2:]
    if padding == "valid":
        return (0,) * len(spatial)
    if padding == "same":
        return tuple(d * (k - 1) // 2 for d, k in zip(dilation, spatial))
    return tuple(padding)


class ApproxConvFunction(torch.autograd.Function):
    """``F.conv1d`` / ``F.conv2d`` whose input is kept quantized for the weight gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups, options: ApproxOptions):
        y = _CONV_FORWARD[weight.dim() - 2](x, weight, bias, stride, padding, dilation, groups)
        ctx.conv = (stride, numeric_padding(padding, weight, dilation), dilation, groups)
        ctx.x_shape = x.shape
        ctx.bias_sizes = None if bias is None else list(bias.shape)
        saved, ctx.layout = compress(x, options) if ctx.needs_input_grad[1] else ((), None)
        ctx.save_for_backward(weight, *saved)
        return y

    @staticmethod
    def backward(ctx, g):
        weight, *saved = ctx.saved_tensors
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        stride, padding, dilation, groups = ctx.conv
        if need_dw:
            x = restore(saved, ctx.layout)
        else:  # dx needs only the input's shape
            x = g.new_empty(1).expand(ctx.x_shape)
        dx, dw, db = torch.ops.aten.convolution_backward(  # dtypes as in ApproxLinearFunction
            g.contiguous(),
            x.to(g.dtype),
            weight.to(g.dtype),
            ctx.bias_sizes,
            list(stride),
            list(padding),
            list(dilation),
            False,
            [0] * len(padding),
            groups,
            [need_dx, need_dw, need_db and ctx.bias_sizes is not None],
        )
        return dx, dw, db, None, None, None, None, None


class ApproxLinear(ApproxVariant, nn.Linear):
    """``nn.Linear`` (any leading dims) keeping a k-bit copy of its input for ``dW``.

    Built with ``ApproxLinear.from_module(linear, bits=4, ...)``; the weight and
    bias are the original Parameter objects and are never quantized.
    """

    torch_class = nn.Linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not needs_graph(x, self.weight, self.bias):
            return F.linear(x, self.weight, self.bias)
        return ApproxLinearFunction.apply(x, self.weight, self.bias, self.approx_options)


class _ApproxConvNd(ApproxVariant):
    """Shared forward of the convolution variants (padding modes as in ``nn.Conv*d``)."""

    @classmethod
    def check_convertible(cls, module: nn.Module) -> None:
        if module.padding == "same":
            odd = [d * (k - 1) % 2 for d, k in zip(module.dilation, module.kernel_size)]
            if any(odd):
                raise ConversionError(
                    f"{cls.__name__}: padding='same' with kernel_size={module.kernel_size} and "
                    f"dilation={module.dilation} pads unevenly, which is not supported; give the "
                    "padding as numbers or use an odd kernel"
                )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not needs_graph(x, self.weight, self.bias):
            return super().forward(x)
        if x.dim() == self.weight.dim() - 1:  # unbatched, as nn.Conv*d takes it: a batch of one
            return self.forward(x.unsqueeze(0)).squeeze(0)
        padding = self.padding
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = (0,) * len(self.kernel_size)
        return ApproxConvFunction.apply(
            x, self.weight, self.bias, self.stride, padding, self.dilation, self.groups,
            self.approx_options,
        )


class ApproxConv1d(_ApproxConvNd, nn.Conv1d):
    """``nn.Conv1d`` keeping a k-bit copy of its input for ``dW``."""

    torch_class = nn.Conv1d


class ApproxConv2d(_ApproxConvNd, nn.Conv2d):
    """``nn.Conv2d`` keeping a k-bit copy of its input for ``dW``."""

    torch_class = nn.Conv2d


class ApproxTransposedLinearFunction(torch.autograd.Function):
    """A zoo ``Conv1D``'s ``x @ W + b`` (``W`` (in, out)) whose input is kept quantized for ``dW``."""

    @staticmethod
    def forward(ctx, x, weight, bias, options: ApproxOptions):
        y = transposed_linear(x, weight, bias)
        ctx.input_shape = x.shape
        saved, ctx.layout = compress(x, options) if ctx.needs_input_grad[1] else ((), None)
        ctx.save_for_backward(weight if ctx.needs_input_grad[0] else None, *saved)
        return own_output(y)

    @staticmethod
    def backward(ctx, g):
        weight, *saved = ctx.saved_tensors
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        # dx needs only the input's shape when dW is not wanted
        x = restore(saved, ctx.layout) if need_dw else g.new_empty(1).expand(ctx.input_shape)
        dx, dw, db = TransposedLinearGeometry().gradients(g, x, weight, (need_dx, need_dw, need_db))
        return dx, dw, db, None


class ApproxTransposedLinear(TransposedLinearVariant):
    """A zoo ``Conv1D`` (GPT-2's linear layers, ``W`` (in, out)) keeping a k-bit copy of its input for ``dW``.

    Built with ``ApproxTransposedLinear.from_module(conv1d, bits=4, ...)``; the
    forward is the zoo layer's own arithmetic (bit-identical), the weight and
    bias are the original Parameter objects and are never quantized.
    """

    OPTIONS = ("approx_options",)

    @classmethod
    def from_module(cls, module: nn.Module, **options) -> "ApproxTransposedLinear":
        """The variant of zoo ``Conv1D`` ``module`` sharing its Parameters; ``options`` as in ``ApproxOptions``."""
        approx_options = make_options(cls.__name__, options)
        new = cls.rebuild_from(module)
        new.approx_options = approx_options
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not needs_graph(x, self.weight, self.bias):
            return transposed_linear(x, self.weight, self.bias)
        return ApproxTransposedLinearFunction.apply(x, self.weight, self.bias, self.approx_options)

    def describe_options(self) -> str:
        return self.approx_options.describe()

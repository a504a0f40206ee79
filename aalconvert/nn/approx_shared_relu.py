"""ReLU whose backward reads the k-bit copy that the layers after it keep of its output.

Under the approx rules a ReLU keeps a 1-bit mask, and a layer reading its
output keeps a k-bit copy of that same tensor: in a RepVGG block, 1/32 of the
output's bytes on top of three 4-bit copies. With nearest rounding the
quantizer is sign preserving (``aalconvert.kernels.quantize``): zero decodes to
zero and nothing positive decodes to zero, so ``decoded > 0`` is the ReLU's
exact mask. The ReLU therefore keeps that very copy (``compress`` hands the
reader the same tensors, so it is stored once) instead of a mask of its own,
and its input gradient is bit-identical to torch's ReLU backward of the
gradient it receives.

A group of ``group_size`` elements holding inf or NaN decodes to NaN; each of its
elements then passes its gradient, as torch's backward does for a NaN output
(an exact zero there would have blocked it). Where no shared copy can be made
(stochastic rounding, which is not sign preserving; fewer than ``min_numel``
elements or a dtype the quantizer does not take; torch.compile, whose graphs
cannot share ``compress``'s copies) the 1-bit mask is kept, as ``MaskReLU`` does.
"""

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from aalconvert.nn.approx_common import (
    ApproxOptions,
    ApproxVariant,
    compress,
    needs_graph,
    redate_copy,
    restore,
    should_quantize,
)
from aalconvert.nn.lossless import MaskReLUFunction, _input_probe, _with_zero_path


class SharedCopyReLUFunction(torch.autograd.Function):
    """``torch.relu`` keeping the k-bit copy of its output that ``compress`` makes (and shares)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, inplace: bool, options: ApproxOptions, probe: torch.Tensor) -> torch.Tensor:
        if inplace:
            torch.relu_(x)
            ctx.mark_dirty(x)
            y = x  # the input object itself, as in MaskReLUFunction
        else:
            y = torch.relu(x)
        saved, ctx.layout = compress(y, options)
        ctx.save_for_backward(*saved, probe)
        return y

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        *saved, probe = ctx.saved_tensors
        # Decoded in the quantized domain and in fp32 (sqrt(y) when companded): its sign is
        # the stored one even where squaring, or a cast to fp16, would flush a value to zero.
        layout = dataclasses.replace(ctx.layout, dtype=torch.float32, companding="none")
        keep = restore(saved, layout)
        if grad_output.dtype != torch.float32:  # as 0/1: a cast to fp16 could flush tiny values
            keep = keep.le(0).logical_not_().to(grad_output.dtype)
        # torch's own ReLU backward op (strides and NaN handling as torch's)
        grad_input = torch.ops.aten.threshold_backward(grad_output, keep, 0)
        return _with_zero_path(grad_input, probe), None, None, None


class SharedCopyReLU(ApproxVariant, nn.ReLU):
    """``nn.ReLU`` whose exact backward reads the k-bit copy its readers keep of its output.

    The approx rules choose it only for a ReLU whose output a converted layer
    keeps a k-bit copy of (``aalconvert.rules.approx``); alone it keeps that
    copy, 4 bits per element instead of a mask's 1.
    """

    torch_class = nn.ReLU

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not needs_graph(input):
            return F.relu(input, inplace=self.inplace)
        options = self.approx_options
        if options.stochastic or not should_quantize(input, options) or torch.compiler.is_compiling():
            return MaskReLUFunction.apply(input, self.inplace, _input_probe(input))
        output = SharedCopyReLUFunction.apply(input, self.inplace, options, _input_probe(input))
        if self.inplace:  # autograd bumped the version of the copied tensor as the Function returned
            redate_copy(output, options)
        return output

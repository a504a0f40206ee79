"""ReLU keeping a k-bit, sign-preserving copy of its output (BLPA, methods.md section 3).

Sign preserving: zero decodes to exactly zero and a positive value never decodes
to zero, so the ReLU mask ``y > 0`` rebuilt in backward is exact and
``dx = g * (y > 0)`` equals BP's bit for bit. With the group quantizer (code 0
decodes to the group min, step ``scale``) this holds when every positive value
lies at least one step above zero. So before quantizing, each positive value of
a group is shifted up by ``offset = c * max``, with ``c`` chosen so that the
offset is 1.25 steps (the margin absorbs the upward rounding of the stored
step): ``c * L / (1 + c) = 1.25`` with ``L = 2**bits - 1``. Zeros stay zero
and keep the group min at exactly 0. Decoding subtracts the offset again,
recovered from the stored min and step (``max + offset = min + L * scale``).
The shift costs a factor ``1 + c`` in resolution: 1.71 at 2 bits, 1.09 at 4,
1.005 at 8.

With ``companding="sqrt"`` (the default for nearest rounding) the same scheme
runs in the domain the quantizer rounds in, ``r = sqrt(y)``: positive ``r`` are
shifted by ``c * max(r)``, the quantizer is given ``(r + offset)**2`` (whose
root it takes again, within an ulp, far inside the 0.25-step margin), and
decoding reads ``r`` straight from the codes (the same tensors decoded without
companding), so the mask never depends on squaring a tiny value.

Scales are kept in bfloat16: float16 steps underflow for small groups and
overflow above 65504, either of which would break the exact mask.

When it pays: the 1-bit mask of a lossless ReLU (methods.md section 4) gives
the same exact ``dx`` for 1 bit per element, so this k-bit copy is better only
when the same quantized tensor also serves the next weighted layer's weight
gradient (one k-bit copy instead of a mask plus a k-bit input copy). Alone it
keeps more than the mask. ``decode_relu_output`` gives that layer the values.
"""

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from aalconvert.errors import ConversionError
from aalconvert.kernels import QuantizedTensor, dequantize, quantize
from aalconvert.nn.approx_common import (
    ApproxOptions,
    ApproxVariant,
    SCALE_DTYPE_NAMES,
    make_options,
    needs_graph,
    next_seed,
    should_quantize,
)

OFFSET_STEPS = 1.25  # offset of positive values above zero, in quantization steps


def offset_ratio(bits: int) -> float:
    """``c``: offset of a group's positive values as a fraction of the group max."""
    levels = 2**bits - 1
    return OFFSET_STEPS / (levels - OFFSET_STEPS)


def _grouped(flat: torch.Tensor, group_size: int) -> torch.Tensor:
    """``flat`` zero-padded to whole groups, one group per row (the quantizer's layout)."""
    groups = math.ceil(flat.numel() / group_size)
    return F.pad(flat, (0, groups * group_size - flat.numel())).view(groups, group_size)


def quantize_relu_output(y: torch.Tensor, options: ApproxOptions) -> QuantizedTensor:
    """Sign-preserving k-bit copy of a ReLU output ``y`` (all values >= 0)."""
    flat = y.detach().reshape(-1).float()
    companded = options.companding == "sqrt"
    grouped = _grouped(flat.sqrt() if companded else flat, options.group_size)
    offset = offset_ratio(options.bits) * grouped.amax(dim=1, keepdim=True)
    shifted = torch.where(grouped > 0, grouped + offset, 0.0).reshape(-1)[: flat.numel()]
    return quantize(
        shifted.square() if companded else shifted,
        options.bits,
        group_size=options.group_size,
        stochastic=options.stochastic,
        scale_dtype=options.scale_dtype,
        seed=next_seed() if options.stochastic else 0,
        companding=options.companding,
    )


def decode_relu_output(
    q: QuantizedTensor, shape: torch.Size, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask ``y > 0``, exact; values approximating ``y``) from ``quantize_relu_output``'s copy."""
    # In the quantized domain (``sqrt(y)`` when companded): its codes decoded without companding.
    in_domain = dataclasses.replace(q, companding="none")
    decoded = _grouped(dequantize(in_domain).float().reshape(-1), q.group_size)
    levels = 2**q.bits - 1
    c = offset_ratio(q.bits)
    top = q.mins.float() + levels * q.scales.float()  # max + offset of each group
    offset = (c / (1 + c) * top)[:, None]
    positive = decoded > 0
    values = torch.where(positive, (decoded - offset).clamp_min(0), 0.0)
    if q.companding == "sqrt":
        values = values.square()
    numel = math.prod(shape)
    mask = positive.reshape(-1)[:numel].reshape(shape)
    return mask, values.reshape(-1)[:numel].reshape(shape).to(dtype)


class ApproxReLUFunction(torch.autograd.Function):
    """``torch.relu`` keeping a sign-preserving k-bit copy of its output."""

    @staticmethod
    def forward(ctx, x, inplace: bool, options: ApproxOptions):
        if inplace:
            torch.relu_(x)
            ctx.mark_dirty(x)
            y = x  # the input object itself: torch.compile supports mark_dirty only then
        else:
            y = torch.relu(x)
        ctx.quantized = should_quantize(y, options)
        if ctx.quantized:
            q = quantize_relu_output(y, options)
            ctx.meta = (q.bits, q.group_size, q.companding)
            ctx.save_for_backward(*q.tensors())
        else:
            ctx.save_for_backward(y)
        ctx.shape, ctx.dtype = y.shape, y.dtype
        return y

    @staticmethod
    def backward(ctx, g):
        if ctx.quantized:
            bits, group_size, companding = ctx.meta
            q = QuantizedTensor.from_tensors(
                ctx.saved_tensors, ctx.shape, torch.float32, bits, group_size, companding
            )
            mask, _ = decode_relu_output(q, ctx.shape, ctx.dtype)
        else:
            mask = ctx.saved_tensors[0] > 0
        return g * mask, None, None


class ApproxReLU(ApproxVariant, nn.ReLU):
    """``nn.ReLU`` keeping a sign-preserving k-bit copy of its output (exact ``dx``).

    See the module docstring for when it beats the 1-bit mask ReLU. Scales are
    bfloat16 (``scale_dtype=torch.float16`` is refused).
    """

    torch_class = nn.ReLU

    @classmethod
    def make_options(cls, options: dict) -> ApproxOptions:
        options = {"scale_dtype": torch.bfloat16, **options}
        if SCALE_DTYPE_NAMES.get(options["scale_dtype"], options["scale_dtype"]) != torch.bfloat16:
            raise ConversionError(
                f"ApproxReLU: scale_dtype must be torch.bfloat16, got {options['scale_dtype']!r}; "
                "float16 steps underflow or overflow and would break the exact ReLU mask"
            )
        return make_options(cls.__name__, options)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not needs_graph(x):
            return super().forward(x)
        return ApproxReLUFunction.apply(x, self.inplace, self.approx_options)

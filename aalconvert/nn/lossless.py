"""Lossless layer variants: the same forward and bit-identical gradients, less kept for backward.

methods.md section 4. Each variant keeps only what its backward truly needs:

- ``MaskReLU``: 1 bit per element (``y > 0``) instead of the output ``y``.
- ``MaskHardtanh`` / ``MaskReLU6`` / ``MaskLeakyReLU``: 1 bit per element (which
  piece of the function the input fell in) instead of the input.
- ``MaskDropout``: the keep-mask as 1 bit per element instead of the scaled
  mask in the input's dtype (CPU) or a bool byte per element (CUDA).
- ``CompactMaxPool2d``: the argmax as a uint8 offset inside its pooling window
  (1 byte per output element) instead of the input plus int64 indices
  (itemsize + 8 bytes per element).

Masks are packed in the tensor's memory order, so channels_last tensors are
packed without a copy and unpacked back into the same strides. Forward values,
random draws and gradients are those of the torch module: the forward calls the
same torch ops, the backward calls the same torch backward ops on rebuilt
inputs. None of the kept tensors is visible to the caller, so modifying a
variant's input or output in place after the forward cannot corrupt its
gradient.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor
from torch.nn.modules.utils import _pair

from aalconvert.errors import ConversionError
from aalconvert.kernels import pack_bits, unpack_bits
from aalconvert.nn.approx_common import functorch_active
from aalconvert.nn.rebuild import rebuild_as

MAX_POOL_WINDOW_ELEMENTS = 256
"""Largest pooling window (kernel_h * kernel_w elements) whose offsets fit in one uint8."""

_FUSED_DROPOUT_DEVICES = ("cuda", "xpu")
"""Devices where torch's dropout runs the fused ``native_dropout`` kernel (bool mask)."""


class _PackedLayout:
    """How a tensor was packed: the permutation that made it contiguous and its shape then.

    ``order`` is None when the tensor was packed in logical (row-major) order.
    """

    def __init__(self, tensor: torch.Tensor) -> None:
        self.shape = tuple(tensor.shape)
        self.order: tuple[int, ...] | None = None
        if tensor.is_contiguous() or tensor.dim() < 2:
            return
        order = sorted(range(tensor.dim()), key=lambda d: -tensor.stride(d))
        if tensor.permute(order).is_contiguous():
            self.order = tuple(order)

    def in_memory_order(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` viewed so that row-major order is its memory order (a view, no copy)."""
        return tensor if self.order is None else tensor.permute(self.order)

    def pack(self, bits: torch.Tensor) -> torch.Tensor:
        """Pack a bool or float tensor laid out like the one this layout was made from."""
        return pack_bits(self.in_memory_order(bits))

    def unpack(self, packed: torch.Tensor, decode: str, dtype: torch.dtype) -> torch.Tensor:
        """Unpack into the logical shape, with the strides of the packed tensor."""
        if self.order is None:
            return unpack_bits(packed, self.shape, decode=decode, dtype=dtype)
        permuted_shape = tuple(self.shape[d] for d in self.order)
        bits = unpack_bits(packed, permuted_shape, decode=decode, dtype=dtype)
        inverse = [0] * len(self.order)
        for position, dim in enumerate(self.order):
            inverse[dim] = position
        return bits.permute(inverse)


def _needs_autograd(tensor: torch.Tensor) -> bool:
    """Whether the variant's own Function should run (not under a torch.func transform,
    which needs Functions with ``setup_context``: the plain op is exact there)."""
    return torch.is_grad_enabled() and tensor.requires_grad and not functorch_active(tensor)


def _input_probe(x: torch.Tensor) -> torch.Tensor:
    """An empty tensor computed from ``x``: 0 bytes kept, but a path back to ``x``'s graph.

    torch's ReLU and max-pool backward read a tensor saved from the forward, so a
    second-order gradient reaches the Parameters before them as zeros; these
    variants keep only masks, and without this path those gradients were None
    (an optimizer then skips weight decay and momentum for them).
    """
    return x[(slice(0, 0),) * x.dim()].clone() if x.dim() else x.reshape(1)[:0].clone()


class _ZeroPath(torch.autograd.Function):
    """``grad`` unchanged, with a zero gradient to ``probe``: what BP's saved-tensor path gives."""

    @staticmethod
    def forward(ctx, grad: torch.Tensor, probe: torch.Tensor) -> torch.Tensor:
        ctx.probe_shape = probe.shape
        return grad.view_as(grad)

    @staticmethod
    def backward(ctx, grad_grad: torch.Tensor):
        return grad_grad, grad_grad.new_zeros(ctx.probe_shape)


def _with_zero_path(grad: torch.Tensor, probe: torch.Tensor) -> torch.Tensor:
    """In a backward that builds a graph (``create_graph=True``), link ``grad`` to the input."""
    return _ZeroPath.apply(grad, probe) if torch.is_grad_enabled() else grad


# --------------------------------------------------------------------------- ReLU


class MaskReLUFunction(torch.autograd.Function):
    """ReLU keeping 1 bit per element; backward is torch's ``threshold_backward`` exactly.

    The bit is ``not (y <= 0)``, the complement of the test torch's backward
    applies, so a NaN output passes its gradient just as in torch.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, inplace: bool, probe: torch.Tensor) -> torch.Tensor:
        if inplace:
            torch.relu_(x)
            ctx.mark_dirty(x)
            y = x  # the input object itself: torch.compile supports mark_dirty only then
        else:
            y = torch.relu(x)
        layout = _PackedLayout(y)
        ctx.layout = layout
        ctx.save_for_backward(layout.pack(y.le(0).logical_not_()), probe)
        return y

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        packed, probe = ctx.saved_tensors
        # 0/1 in the gradient's dtype: torch's op reads it as it reads the output (<= 0
        # blocks), several times faster on CPU than reading a bool mask.
        keep = ctx.layout.unpack(packed, "binary", grad_output.dtype)
        # torch's own ReLU backward op, so the gradient's strides are torch's too (they
        # steer later kernels' rounding, e.g. for channels_last (N, C, 1, 1) tensors).
        grad_input = torch.ops.aten.threshold_backward(grad_output, keep, 0)
        return _with_zero_path(grad_input, probe), None, None


class MaskReLU(nn.ReLU):
    """``nn.ReLU`` that keeps a 1-bit mask (ceil(N / 8) bytes) instead of its output (N elements).

    Forward and gradient are bit-identical to ``nn.ReLU``; ``inplace`` is honoured.
    Without autograd (eval under no_grad, or an input that needs no gradient)
    it is plain ``F.relu``.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not _needs_autograd(input):
            return F.relu(input, inplace=self.inplace)
        return MaskReLUFunction.apply(input, self.inplace, _input_probe(input))

    @classmethod
    def from_module(cls, module: nn.ReLU) -> "MaskReLU":
        """Build from an ``nn.ReLU`` (no parameters to share), keeping ``inplace``."""
        if not isinstance(module, nn.ReLU):
            raise ConversionError(
                f"MaskReLU.from_module expects an nn.ReLU, got {type(module).__name__}"
            )
        return rebuild_as(cls, module)

    def to_module(self) -> nn.ReLU:
        """The plain ``nn.ReLU`` with the same settings and hooks."""
        return rebuild_as(nn.ReLU, self)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, keeps=1-bit mask".lstrip(", ")


# ------------------------------------------------------------- Hardtanh / ReLU6 / LeakyReLU
#
# Their gradient depends only on which piece of the function the input fell in, so
# one bit per element is enough. Backward calls torch's own backward op
# (``hardtanh_backward`` / ``leaky_relu_backward``) on a stand-in tensor rebuilt from
# the bits: a value the op lets through where the bit is set, one it blocks elsewhere.
# The op then gives exactly torch's gradient, with torch's strides and signed zeros.
#
# NaN: torch's CPU ``hardtanh_backward`` blocks a NaN in its vectorized loop and
# lets it through in the scalar tail, so the outcome depends on the NaN's position
# and on the iteration (thread chunks, strides). The stand-in therefore carries NaN
# itself at the NaN positions (their flat indices, kept only when there is a NaN:
# 0 bytes otherwise), and the op decides as it did for torch. On CUDA the op lets
# NaN through everywhere (scalar code), which the bit says, and nothing is kept.
# ``leaky_relu_backward`` tests ``x > 0`` in both loops: the bit says it all.


def _nan_positions(kept: torch.Tensor, layout: _PackedLayout) -> torch.Tensor:
    """Flat indices (memory order, int64) of NaNs in ``kept``; empty (0 bytes) when none.

    Only where torch's backward treats NaN differently by position (CPU), and not
    under torch.compile (inductor writes its own kernels, no data-dependent shapes).
    Fake and meta tensors (``inspect``'s estimate) carry no values: counted as
    holding no NaN, as finite activations do.
    """
    if (kept.device.type == "cuda" or torch.compiler.is_compiling() or kept.is_meta
            or isinstance(kept, FakeTensor)):
        return kept.new_empty(0, dtype=torch.long)
    flat = layout.in_memory_order(kept).reshape(-1)
    nan = flat.isnan()
    if not bool(nan.any()):
        return kept.new_empty(0, dtype=torch.long)
    return nan.nonzero().view(-1)


def _stand_in(
    ctx, packed: torch.Tensor, nan_at: torch.Tensor, dtype: torch.dtype, through: float, blocked: float
) -> torch.Tensor:
    """The tensor torch's backward op reads: ``through`` where the bit is set, else ``blocked``,
    NaN at ``nan_at``; strides of the tensor torch would have kept."""
    keep = ctx.layout.unpack(packed, "bool", torch.bool)
    values = torch.where(
        keep,
        torch.tensor(through, dtype=dtype, device=keep.device),
        torch.tensor(blocked, dtype=dtype, device=keep.device),
    )
    if nan_at.numel():
        ctx.layout.in_memory_order(values).reshape(-1)[nan_at] = math.nan
    return values


_PASS_VALUES: dict[tuple[torch.dtype, float, float], float] = {}


def _hardtanh_pass_value(dtype: torch.dtype, min_val: float, max_val: float) -> float:
    """A value of ``dtype`` that ``hardtanh_backward`` lets through (strictly inside the bounds).

    Checked with torch's op itself. When ``dtype`` has no such value no input ever
    passes, and any value does (the bit is never set).
    """
    key = (dtype, float(min_val), float(max_val))
    if key not in _PASS_VALUES:
        low, high = float(min_val), float(max_val)
        candidates = [0.0, low + 1.0, high - 1.0, low / 2, high / 2]
        if math.isfinite(low) and math.isfinite(high):
            candidates.insert(0, low / 2 + high / 2)
        try:
            bounds = torch.tensor([low, high], dtype=dtype)
            candidates += [
                torch.nextafter(bounds[:1], bounds[1:]).item(),
                torch.nextafter(bounds[1:], bounds[:1]).item(),
            ]
        except (RuntimeError, TypeError):  # nextafter not implemented for this dtype
            pass
        chosen = 0.0
        for value in candidates:
            if not math.isfinite(value):
                continue
            probe = torch.tensor([value], dtype=dtype)
            if torch.ops.aten.hardtanh_backward(torch.ones_like(probe), probe, low, high).item() != 0:
                chosen = probe.item()
                break
        _PASS_VALUES[key] = chosen
    return _PASS_VALUES[key]


_INPLACE_KEEPS: dict[str, str] = {}


def inplace_keeps(op: str) -> str:
    """What torch's autograd keeps for the in-place ``op`` (``"hardtanh_"``, ``"leaky_relu_"``):
    ``"input"`` (a private copy of the input before the op) or ``"output"`` (its result).

    Read once from the node torch records (``_saved_self`` / ``_saved_result``): it
    changed across torch versions (``hardtanh_`` kept its result, torch 2.13 keeps a
    copy of the input).
    """
    if op not in _INPLACE_KEEPS:
        with torch.enable_grad():
            x = torch.ones(2, requires_grad=True)
            args = (0.0, 6.0) if op == "hardtanh_" else (0.5,)
            node = getattr(torch.ops.aten, op)(x * 1, *args).grad_fn
        _INPLACE_KEEPS[op] = "output" if hasattr(node, "_saved_result") else "input"
    return _INPLACE_KEEPS[op]


class MaskHardtanhFunction(torch.autograd.Function):
    """Hardtanh (ReLU6) keeping 1 bit per element; backward is torch's ``hardtanh_backward``.

    The bit is the op's own decision, taken in forward by running
    ``hardtanh_backward`` with a gradient of ones on the tensor torch keeps: the
    input, or for the in-place form what ``inplace_keeps("hardtanh_")`` says. So
    bounds that round in a reduced dtype (``0.1`` in bfloat16) decide exactly as in torch.
    """

    @staticmethod
    def forward(ctx, x, min_val: float, max_val: float, inplace: bool, probe):
        keeps_output = inplace and inplace_keeps("hardtanh_") == "output"
        if not keeps_output:
            ones = torch.ones((), dtype=x.dtype, device=x.device)
            decision = torch.ops.aten.hardtanh_backward(ones, x, min_val, max_val)
            nan_at = _nan_positions(x, _PackedLayout(x))
        if inplace:
            torch.ops.aten.hardtanh_(x, min_val, max_val)
            ctx.mark_dirty(x)
            y = x  # the input object itself: torch.compile supports mark_dirty only then
        else:
            y = F.hardtanh(x, min_val, max_val)
        kept = y if keeps_output else x
        if keeps_output:
            ones = torch.ones((), dtype=y.dtype, device=y.device)
            decision = torch.ops.aten.hardtanh_backward(ones, y, min_val, max_val)
            nan_at = _nan_positions(y, _PackedLayout(y))
        layout = _PackedLayout(kept)
        ctx.layout = layout
        ctx.bounds = (min_val, max_val)
        ctx.dtype = kept.dtype
        packed = layout.pack(decision.ne_(0))
        del decision
        ctx.save_for_backward(packed, nan_at, probe)
        return y

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        packed, nan_at, probe = ctx.saved_tensors
        min_val, max_val = ctx.bounds
        through = _hardtanh_pass_value(ctx.dtype, min_val, max_val)
        stand_in = _stand_in(ctx, packed, nan_at, ctx.dtype, through, -math.inf)
        grad_input = torch.ops.aten.hardtanh_backward(grad_output, stand_in, min_val, max_val)
        return _with_zero_path(grad_input, probe), None, None, None, None


class MaskLeakyReLUFunction(torch.autograd.Function):
    """LeakyReLU keeping the bit ``x > 0``; backward is torch's ``leaky_relu_backward``.

    The bit is taken on the input before an in-place forward overwrites it. For a
    slope >= 0 that is the test torch applies to the output it keeps in place; for a
    negative slope torch refuses the in-place backward, and this gives the gradient
    of the out-of-place form.
    """

    @staticmethod
    def forward(ctx, x, negative_slope: float, inplace: bool, probe):
        layout = _PackedLayout(x)
        packed = layout.pack(x.gt(0))
        if inplace:
            torch.ops.aten.leaky_relu_(x, negative_slope)
            ctx.mark_dirty(x)
            y = x  # the input object itself: torch.compile supports mark_dirty only then
        else:
            y = F.leaky_relu(x, negative_slope)
        ctx.layout = layout
        ctx.negative_slope = negative_slope
        ctx.dtype = x.dtype
        ctx.save_for_backward(packed, probe)
        return y

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        packed, probe = ctx.saved_tensors
        empty = packed.new_empty(0, dtype=torch.long)
        stand_in = _stand_in(ctx, packed, empty, ctx.dtype, 1.0, -1.0)
        grad_input = torch.ops.aten.leaky_relu_backward(
            grad_output, stand_in, ctx.negative_slope, False
        )
        return _with_zero_path(grad_input, probe), None, None, None


class _MaskHardtanhMixin:
    """Forward, conversion and repr shared by ``MaskHardtanh`` and ``MaskReLU6``."""

    _plain: type[nn.Hardtanh]

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not _needs_autograd(input):
            return F.hardtanh(input, self.min_val, self.max_val, self.inplace)
        return MaskHardtanhFunction.apply(
            input, self.min_val, self.max_val, self.inplace, _input_probe(input)
        )

    @classmethod
    def from_module(cls, module: nn.Hardtanh):
        """Build from an ``nn.Hardtanh`` / ``nn.ReLU6`` (the class of the same kind)."""
        if type(module) is not cls._plain and not isinstance(module, cls):
            raise ConversionError(
                f"{cls.__name__}.from_module expects an {cls._plain.__name__}, got "
                f"{type(module).__name__}"
            )
        return rebuild_as(cls, module)

    def to_module(self) -> nn.Hardtanh:
        """The plain torch module with the same settings and hooks."""
        return rebuild_as(self._plain, self)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, keeps=1-bit mask".lstrip(", ")


class MaskHardtanh(_MaskHardtanhMixin, nn.Hardtanh):
    """``nn.Hardtanh`` keeping a 1-bit mask (ceil(N / 8) bytes) instead of its input (N elements).

    Forward and gradient bit-identical to ``nn.Hardtanh`` (any min_val < max_val,
    ``inplace`` honoured, NaN and signed zeros included). Without autograd it is
    plain ``F.hardtanh``.
    """

    _plain = nn.Hardtanh


class MaskReLU6(_MaskHardtanhMixin, nn.ReLU6):
    """``nn.ReLU6`` keeping a 1-bit mask instead of its input; see ``MaskHardtanh``."""

    _plain = nn.ReLU6


class MaskLeakyReLU(nn.LeakyReLU):
    """``nn.LeakyReLU`` keeping a 1-bit mask (``x > 0``) instead of its input.

    Forward and gradient bit-identical to ``nn.LeakyReLU`` for any
    ``negative_slope``; in place too (with a negative slope, where torch's own
    in-place backward refuses, it gives the out-of-place gradient). Without
    autograd it is plain ``F.leaky_relu``.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not _needs_autograd(input):
            return F.leaky_relu(input, self.negative_slope, self.inplace)
        return MaskLeakyReLUFunction.apply(
            input, self.negative_slope, self.inplace, _input_probe(input)
        )

    @classmethod
    def from_module(cls, module: nn.LeakyReLU) -> "MaskLeakyReLU":
        """Build from an ``nn.LeakyReLU``, keeping ``negative_slope`` and ``inplace``."""
        if type(module) is not nn.LeakyReLU and not isinstance(module, cls):
            raise ConversionError(
                f"MaskLeakyReLU.from_module expects an nn.LeakyReLU, got {type(module).__name__}"
            )
        return rebuild_as(cls, module)

    def to_module(self) -> nn.LeakyReLU:
        """The plain ``nn.LeakyReLU`` with the same settings and hooks."""
        return rebuild_as(nn.LeakyReLU, self)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, keeps=1-bit mask"


MASK_ACTIVATIONS: dict[type[nn.Module], type[nn.Module]] = {
    nn.ReLU: MaskReLU,
    nn.ReLU6: MaskReLU6,
    nn.Hardtanh: MaskHardtanh,
    nn.LeakyReLU: MaskLeakyReLU,
}
"""Activations whose exact backward needs only 1 bit per element -> their mask variant."""


# ------------------------------------------------------------------------ Dropout


class MaskDropoutFunction(torch.autograd.Function):
    """Training-mode dropout with 0 < p < 1 that keeps its keep-mask as 1 bit per element.

    It repeats torch's own dropout ops, so the random draws, the output and the
    gradient are those of ``F.dropout`` under the same RNG state:
    on CUDA/XPU ``native_dropout`` (backward ``native_dropout_backward``),
    elsewhere ``noise = bernoulli(1 - p) / (1 - p)``, ``y = x * noise``
    (backward ``g * noise``, with the noise rebuilt from the bits).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float, inplace: bool) -> torch.Tensor:
        ctx.p = p
        ctx.fused = x.device.type in _FUSED_DROPOUT_DEVICES
        if ctx.fused:
            y, keep = torch.native_dropout(x, p, True)
            ctx.layout = _PackedLayout(keep)
            packed = ctx.layout.pack(keep)
            if inplace:
                x.copy_(y)
        else:
            noise = torch.empty_like(x).bernoulli_(1 - p)
            ctx.layout = _PackedLayout(noise)
            packed = ctx.layout.pack(noise)
            noise.div_(1 - p)
            y = x.mul_(noise) if inplace else x * noise
        if inplace:
            ctx.mark_dirty(x)
            y = x  # the input object itself: torch.compile supports mark_dirty only then
        ctx.save_for_backward(packed)
        return y

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (packed,) = ctx.saved_tensors
        scale = 1.0 / (1.0 - ctx.p)
        if ctx.fused:
            keep = ctx.layout.unpack(packed, "bool", torch.bool)
            grad_input = torch.ops.aten.native_dropout_backward(grad_output, keep, scale)
        else:
            noise = ctx.layout.unpack(packed, "binary", grad_output.dtype).div_(1 - ctx.p)
            grad_input = grad_output * noise
        return grad_input, None, None


class MaskDropout(nn.Dropout):
    """``nn.Dropout`` that keeps its keep-mask as 1 bit per element (ceil(N / 8) bytes).

    Same random draws, output and gradient as ``nn.Dropout`` under the same RNG
    state. Eval mode, p = 0, p = 1 and inputs that need no gradient go straight
    to ``F.dropout`` (which then keeps nothing of size N anyway).
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p in (0.0, 1.0) or not _needs_autograd(input):
            return F.dropout(input, self.p, self.training, self.inplace)
        if input.numel() == 0:
            return F.dropout(input, self.p, self.training, self.inplace)
        return MaskDropoutFunction.apply(input, self.p, self.inplace)

    @classmethod
    def from_module(cls, module: nn.Dropout) -> "MaskDropout":
        """Build from an ``nn.Dropout`` with the same ``p``, ``inplace`` and train/eval mode."""
        if type(module) is not nn.Dropout and not isinstance(module, MaskDropout):
            raise ConversionError(
                f"MaskDropout.from_module expects an nn.Dropout, got {type(module).__name__} "
                "(Dropout1d/2d/3d and AlphaDropout drop differently and are not supported)"
            )
        return rebuild_as(cls, module)

    def to_module(self) -> nn.Dropout:
        """The plain ``nn.Dropout`` with the same settings and hooks."""
        return rebuild_as(nn.Dropout, self)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, keeps=1-bit mask"


# ------------------------------------------------------------------------ MaxPool


def _window_starts(
    out: torch.Tensor, stride: tuple[int, int], padding: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Input row / column (int64) where each output row / column's window starts."""
    rows = torch.arange(out.shape[-2], device=out.device).mul_(stride[0]).sub_(padding[0])
    cols = torch.arange(out.shape[-1], device=out.device).mul_(stride[1]).sub_(padding[1])
    return rows.unsqueeze(1), cols


def _indices_to_offsets(
    indices: torch.Tensor,
    out: torch.Tensor,
    input_width: int,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
) -> torch.Tensor:
    """torch's flat input-plane indices (int64) -> position inside the window (uint8)."""
    rows, cols = _window_starts(out, stride, padding)
    row = torch.div(indices, input_width, rounding_mode="floor")
    col = indices - row * input_width
    window_row = (row - rows).div_(dilation[0], rounding_mode="floor")
    window_col = (col - cols).div_(dilation[1], rounding_mode="floor")
    return window_row.mul_(kernel_size[1]).add_(window_col).to(torch.uint8)


def _offsets_to_indices(
    offsets: torch.Tensor,
    input_width: int,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
) -> torch.Tensor:
    """Inverse of ``_indices_to_offsets``: window positions (uint8) -> flat indices (int64)."""
    rows, cols = _window_starts(offsets, stride, padding)
    offsets = offsets.long()
    window_row = torch.div(offsets, kernel_size[1], rounding_mode="floor")
    window_col = offsets - window_row * kernel_size[1]
    row = window_row.mul_(dilation[0]).add_(rows)
    col = window_col.mul_(dilation[1]).add_(cols)
    return row.mul_(input_width).add_(col)


def _memory_format_of(x: torch.Tensor) -> torch.memory_format:
    channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
    if channels_last and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


class CompactMaxPool2dFunction(torch.autograd.Function):
    """2-D max pooling keeping only the argmax offset inside each window (uint8).

    Forward is torch's ``max_pool2d_with_indices`` (so ties and NaNs pick what
    torch picks); the int64 indices are turned into window offsets, and back in
    backward, which then runs torch's ``max_pool2d_with_indices_backward``.
    """

    @staticmethod
    def forward(ctx, x, kernel_size, stride, padding, dilation, ceil_mode, probe):
        out, indices = torch.ops.aten.max_pool2d_with_indices(
            x, kernel_size, stride, padding, dilation, ceil_mode
        )
        geometry = (kernel_size, stride, padding, dilation)
        offsets = _indices_to_offsets(indices, out, x.shape[-1], *geometry)
        del indices
        ctx.geometry = geometry
        ctx.ceil_mode = ceil_mode
        ctx.input_shape = x.shape
        ctx.input_format = _memory_format_of(x)
        ctx.save_for_backward(offsets, probe)
        return out

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        offsets, probe = ctx.saved_tensors
        kernel_size, stride, padding, dilation = ctx.geometry
        indices = _offsets_to_indices(offsets, ctx.input_shape[-1], *ctx.geometry)
        grad_input = torch.empty(
            ctx.input_shape,
            dtype=grad_output.dtype,
            device=grad_output.device,
            memory_format=ctx.input_format,
        )
        if torch.is_grad_enabled():  # create_graph=True: the differentiable (functional) op
            # Its `self` only gives sizes and layout; its own derivative there is zero.
            grad_input = torch.ops.aten.max_pool2d_with_indices_backward(
                grad_output, grad_input, kernel_size, stride, padding, dilation, ctx.ceil_mode, indices
            )
            return _with_zero_path(grad_input, probe), None, None, None, None, None, None
        # The op reads only the sizes of its `self` argument, so the output buffer stands in.
        torch.ops.aten.max_pool2d_with_indices_backward.grad_input(
            grad_output, grad_input, kernel_size, stride, padding, dilation,
            ctx.ceil_mode, indices, grad_input=grad_input,
        )
        return grad_input, None, None, None, None, None, None


class CompactMaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` that keeps 1 byte per output element for backward.

    torch keeps the input (itemsize bytes per input element) and int64 indices
    (8 bytes per output element); this keeps only the argmax offset inside its
    window as uint8. Any kernel/stride/padding/dilation/ceil_mode whose window
    has at most 256 elements. ``return_indices=True`` is refused by
    ``from_module`` (its caller needs the int64 indices, e.g. for MaxUnpool2d);
    leave such a module as it is.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.return_indices or not _needs_autograd(input):
            return super().forward(input)
        kernel_size = _pair(self.kernel_size)
        _check_window(kernel_size, type(self).__name__)
        stride = _pair(self.stride if self.stride is not None else self.kernel_size)
        return CompactMaxPool2dFunction.apply(
            input, kernel_size, stride, _pair(self.padding), _pair(self.dilation), self.ceil_mode,
            _input_probe(input),
        )

    @classmethod
    def from_module(cls, module: nn.MaxPool2d) -> "CompactMaxPool2d":
        """Build from an ``nn.MaxPool2d`` with the same settings and train/eval mode."""
        if not isinstance(module, nn.MaxPool2d):
            raise ConversionError(
                f"CompactMaxPool2d.from_module expects an nn.MaxPool2d, got {type(module).__name__}"
            )
        if module.return_indices:
            raise ConversionError(
                "CompactMaxPool2d cannot convert an nn.MaxPool2d with return_indices=True: "
                "its caller uses the int64 indices (e.g. MaxUnpool2d); leave this module as it is"
            )
        _check_window(_pair(module.kernel_size), "nn.MaxPool2d")
        return rebuild_as(cls, module)

    def to_module(self) -> nn.MaxPool2d:
        """The plain ``nn.MaxPool2d`` with the same settings and hooks."""
        return rebuild_as(nn.MaxPool2d, self)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, keeps=uint8 window offset"


def _check_window(kernel_size: tuple[int, int], where: str) -> None:
    elements = math.prod(kernel_size)
    if elements > MAX_POOL_WINDOW_ELEMENTS:
        raise ConversionError(
            f"{where} with kernel_size={kernel_size} has a {elements}-element window; "
            f"CompactMaxPool2d stores the argmax offset in one byte, so the window may hold "
            f"at most {MAX_POOL_WINDOW_ELEMENTS} elements: leave this module as nn.MaxPool2d"
        )

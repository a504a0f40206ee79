"""Weighted layers that rebuild their input from a cheap norm/activation chain in backward.

methods.md section 4, "cheap recomputation". A Linear or Conv whose input
``x = chain(z)`` comes from a short chain of norms and activations (BN -> ReLU,
LayerNorm, GELU, ...) needs ``x`` only for its weight gradient. The chain's
first module keeps ``z`` anyway (BN, LayerNorm and GELU all save their input),
so the layer keeps ``z`` -- the same storage, counted once -- instead of ``x``
and rebuilds ``x = chain(z)`` in backward. No matmul or
convolution is recomputed: backward calls the very backward ops torch's
autograd would (``mm`` / ``convolution_backward`` on the same operands), so
every gradient is bit-identical to the plain layer's.

Calling convention (what a torch.fx rewrite produces)
-----------------------------------------------------
The graph computes ``z -> m_1 -> ... -> m_k -> x -> layer``. Keep every node
as it is and

1. ``layer = RecomputedInputConv2d.from_module(conv)`` (or ...Linear, ...Conv1d,
   ...Conv3d), installed under the same name, so the Parameters, hooks and
   state_dict keys stay those of ``conv``;
2. ``layer.set_chain(m_1, ..., m_k)`` with the modules the chain nodes call,
   in order (they stay registered where they are: the chain is a plain tuple
   attribute, not a child, so nothing is registered twice);
3. replace the call ``layer(x)`` by ``layer(x, z)``, where ``z`` is the first
   argument of the ``m_1`` node.

``forward(input, chain_input=None)``: ``input`` is ``x`` as computed by the
chain (its autograd, which keeps ``z``, stays untouched); ``chain_input`` is
``z``. Without ``chain_input``, without autograd, or when the weight needs no
gradient, the layer is the plain torch layer. The caller guarantees
``input == chain(chain_input)``; shape and dtype are checked in backward, the
values are not. Chain modules must be deterministic and stateless apart from
batch-norm running statistics (allowed types in ``CHAIN_MODULE_TYPES``);
rebuilding a training-mode batch norm uses the batch statistics of ``z``
again and leaves the running statistics alone. The chain's parameters must
not change between forward and backward (the same holds for the layer's own
weight in plain torch).

Forward and backward run in the autocast state of the forward, so mixed
precision gives the gradients plain torch gives.

Under the approx rules (``kept_copy=ApproxOptions``) the layer keeps a k-bit
copy of ``z`` instead of ``z`` and rebuilds its input from the decoded copy:
approximate, like every approx variant. The chain's first module, an approx
variant itself, packs the same ``z`` with the same options, and both share one
copy (``approx_common.compress``), so the layer keeps nothing of its own.
"""

import math
import threading
import weakref
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.weak import WeakTensorKeyDictionary

from aalconvert.errors import ConversionError
from aalconvert.nn.lossless import MaskDropout
from aalconvert.nn.approx_common import ApproxOptions, SavedLayout, compress, functorch_active, restore
from aalconvert.nn.function_output import own_output
from aalconvert.nn.rebuild import rebuild_as
from aalconvert.nn.saved import parameter_versions, raise_if_parameters_changed, saved_tensors_or_raise
from aalconvert.nn.weighted import transposed_linear
from aalconvert.nn.zoo_linear import TransposedLinearVariant
from aalconvert.nn import zoo_pointwise

CHAIN_MODULE_TYPES: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.RMSNorm,
    nn.ReLU,
    nn.LeakyReLU,
    nn.Hardtanh,
    nn.GELU,
    nn.SiLU,
    nn.Hardswish,
    nn.Sigmoid,
    nn.Tanh,
    nn.Identity,
)
"""Modules a chain may hold: deterministic, and cheap to run again (elementwise or a norm)."""


def is_norm_act(module: nn.Module) -> bool:
    """A batch norm fused with its activation, as timm's ``BatchNormAct2d`` is: a ``_BatchNorm``
    subclass whose forward is the batch norm's, then its ``drop`` (an identity here) and its
    ``act`` (a chain module) children."""
    children = dict(module.named_children())
    return (
        isinstance(module, _BatchNorm)
        and not isinstance(module, nn.SyncBatchNorm)  # its statistics span processes: not rebuilt here
        and type(module) not in CHAIN_MODULE_TYPES
        and set(children) == {"drop", "act"}
        and type(children["drop"]) is nn.Identity
        and (isinstance(children["act"], CHAIN_MODULE_TYPES)
             or zoo_pointwise.pointwise_problem(children["act"]) is None)
    )


def is_chain_module(module: nn.Module) -> bool:
    """A torch module of ``CHAIN_MODULE_TYPES``, a batch norm fused with its activation
    (``is_norm_act``), or a zoo activation or norm (timm's ``LayerNorm``, Hugging Face's
    ``GELUActivation``, ``LlamaRMSNorm``: deterministic and elementwise or a norm,
    ``zoo_pointwise.pointwise_problem``), converted or not. Another batch-norm subclass is
    not: a chain rebuilds batch norms by torch's formula, not by their own forward."""
    if isinstance(module, _BatchNorm) and type(module) not in CHAIN_MODULE_TYPES:
        return is_norm_act(module) or type(module).__module__.startswith("aalconvert.")
    if isinstance(module, nn.Dropout) and type(module) in (nn.Dropout, MaskDropout):
        return module.p == 0  # hands on its input unchanged, drawing no random numbers
    return (
        isinstance(module, CHAIN_MODULE_TYPES)
        or isinstance(module, zoo_pointwise.PointwiseVariant)
        or zoo_pointwise.pointwise_problem(module) is None
    )


def chain_rebuildable(chain: tuple[nn.Module, ...]) -> bool:
    """Whether running ``chain`` again in backward gives the forward's tensor: not when a
    dropout in it (probability 0 at conversion) now drops with a probability, in training,
    nor when a fused batch norm's ``act`` or ``drop`` was replaced by a module the rebuild
    would not run (``_rebuild_module`` runs only a fused norm's chain-module ``act``)."""
    return not any(
        (isinstance(m, nn.Dropout) and m.training and m.p != 0)
        or (isinstance(m, _BatchNorm) and next(m.children(), None) is not None and not is_norm_act(m))
        for m in chain
    )


def _validate_chain(chain: tuple[nn.Module, ...], where: str) -> None:
    if not chain:
        raise ConversionError(f"{where}: set_chain needs at least one module (norm or activation)")
    for position, module in enumerate(chain):
        if not is_chain_module(module):
            allowed = ", ".join(t.__name__ for t in CHAIN_MODULE_TYPES)
            raise ConversionError(
                f"{where}: chain module {position} is {type(module).__name__}, which cannot be "
                f"rebuilt exactly in backward; allowed: {allowed}, dropouts of probability 0, "
                "and zoo activations and norms"
            )
    if getattr(chain[0], "inplace", False):
        raise ConversionError(
            f"{where}: the first chain module {type(chain[0]).__name__} is in place, so it "
            "overwrites the chain input; give the module before it as the chain start, or "
            "convert it with inplace=False"
        )


def with_chain(cls: type, module: nn.Module, chain: tuple[nn.Module, ...]) -> nn.Module:
    """A ``cls`` instance sharing ``module``'s state, fed by ``chain`` (validated when given)."""
    if chain:
        _validate_chain(tuple(chain), cls.__name__)
    converted = rebuild_as(cls, module)
    converted.chain = tuple(chain)
    return converted


def _rebuild_module(module: nn.Module, training: bool, x: torch.Tensor,
                    statistics: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """One chain step with the forward's train/eval mode, never touching running statistics.

    Calls ``forward`` directly: the module's hooks ran in the real forward, and
    running them again in backward would re-fire conversion's wiring (a chain
    start's capture hook would keep the rebuilt input alive after backward, and
    torch.compile breaks the graph on that side effect).
    """
    if not isinstance(module, _BatchNorm):
        return module.forward(x)
    x = _batch_norm_again(module, training, x, statistics)
    return module.act.forward(x) if is_norm_act(module) else x  # a fused activation (drop: identity)


def _batch_norm_again(module: _BatchNorm, training: bool, x: torch.Tensor,
                      statistics: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """``module``'s batch norm of ``x`` as its forward computed it, running statistics untouched;
    an eval-mode norm normalizes with ``statistics``, the running statistics its forward read."""
    # Mirrors _BatchNorm.forward, with throwaway copies of the running statistics
    # so that the same kernel runs as in the forward and nothing is updated twice.
    use_running = not training or module.track_running_stats
    running_mean = module.running_mean if use_running else None
    running_var = module.running_var if use_running else None
    batch_stats = training or (running_mean is None and running_var is None)
    if batch_stats and running_mean is not None:
        running_mean, running_var = running_mean.clone(), running_var.clone()
    elif statistics is not None:
        running_mean, running_var = statistics
    return F.batch_norm(
        x, running_mean, running_var, module.weight, module.bias, batch_stats, 0.0, module.eps
    )


def _eval_statistics(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Copies of the running statistics an eval-mode batch norm normalizes with, else None."""
    if (isinstance(module, _BatchNorm) and not module.training and module.running_mean is not None
            and module.running_var is not None):
        return module.running_mean.clone(), module.running_var.clone()
    return None


class _ChainRecord:
    """What backward needs to rebuild ``x = chain(z)`` exactly as the forward made it.

    Rebuilding the same ops on the same ``z`` reproduces ``x``'s values and
    strides, so the GEMM/convolution backward sees the forward's operands.
    """

    def __init__(self, chain: tuple[nn.Module, ...], x: torch.Tensor) -> None:
        self.chain = chain
        self.training = tuple(module.training for module in chain)
        # An eval-mode batch norm normalizes with its running statistics, which a train-mode
        # forward run before this backward updates in place (no version counter moves): the
        # rebuild reads a copy taken now (two vectors of the channel count).
        self.statistics = tuple(_eval_statistics(module) for module in chain)
        self.parameter_versions = parameter_versions(chain)
        self.device_type = x.device.type
        # meta tensors (inspect's fallback) have no autocast
        self.autocast = torch.amp.is_autocast_available(self.device_type) and torch.is_autocast_enabled(
            self.device_type)
        self.autocast_dtype = torch.get_autocast_dtype(self.device_type) if self.autocast else None
        self.x_shape, self.x_dtype = x.shape, x.dtype
        self.readers = 1  # layers whose backward rebuilds x through this record (_shared_record)
        self._served = 0
        self._rebuilt: torch.Tensor | None = None

    step = staticmethod(_rebuild_module)  # one chain module again, running statistics untouched

    def rebuild_once(self, z: torch.Tensor, where: str) -> torch.Tensor:
        """``rebuild``, run once for all the layers reading this chain output (q, k and v after
        one norm): the first reader's backward rebuilds, the last one lets go. Under
        ``create_graph`` each rebuilds its own, so that its graph reaches ``z``."""
        if self.readers == 1 or torch.is_grad_enabled():
            return self.rebuild(z, where)
        if self._rebuilt is None:
            self._rebuilt = self.rebuild(z, where)
        x = self._rebuilt
        self._served += 1
        if self._served == self.readers:  # a second backward (retain_graph) rebuilds again
            self._rebuilt, self._served = None, 0
        return x

    def rebuild(self, z: torch.Tensor, where: str) -> torch.Tensor:
        """``chain(z)``; differentiable when backward records a graph (``create_graph=True``),
        so second-order gradients flow through the chain as they do in BP."""
        raise_if_parameters_changed(self.parameter_versions, where)
        with torch.autocast(self.device_type, dtype=self.autocast_dtype) if self.autocast else nullcontext():
            x = z
            for module, training, statistics in zip(self.chain, self.training, self.statistics):
                x = self.step(module, training, x, statistics)
        if x.shape != self.x_shape or x.dtype != self.x_dtype:
            raise ConversionError(
                f"{where}: the chain rebuilt a {x.dtype} tensor of shape {tuple(x.shape)} but the "
                f"layer's input was {self.x_dtype} {tuple(self.x_shape)}; the chain given to "
                "set_chain does not produce this layer's input"
            )
        return x


_SHARED_RECORDS = WeakTensorKeyDictionary()  # chain output -> the record its readers share
_SHARED_RECORDS_LOCK = threading.Lock()  # threads run their own forwards through one model


def _shared_record(layer: nn.Module, x: torch.Tensor, z: torch.Tensor) -> _ChainRecord:
    """The record of ``x = chain(z)`` for ``layer``: one per chain output and chain input, shared
    by every layer that reads it in this forward, so that backward rebuilds ``x`` once
    (``rebuild_once``). A layer keeping a k-bit copy of ``z`` decodes its own, and under
    torch.compile the compiler sees the repeated ops itself: both get a record of their own."""
    if layer.kept_copy is not None or torch.compiler.is_compiling():
        return _ChainRecord(layer.chain, x)
    with _SHARED_RECORDS_LOCK:
        record = _SHARED_RECORDS.get(x)
        if (record is None or record.chain != layer.chain or record.chain_input() is not z
                or record.x_version != x._version):
            record = _ChainRecord(layer.chain, x)
            record.chain_input, record.x_version = weakref.ref(z), x._version
            _SHARED_RECORDS[x] = record
        else:
            record.readers += 1
    return record


def _saved_tensors(ctx, where: str) -> tuple[torch.Tensor, ...]:
    """ctx.saved_tensors, with in-place modification reported as SavedTensorModifiedError."""
    return saved_tensors_or_raise(
        ctx,
        lambda message: (
            f"{where}: {_modified_name(ctx.saved_shapes, message)}, kept to rebuild this "
            "layer's input in backward, was modified in place after the forward; do not modify "
            "it between forward and backward (clone it before modifying)"
        ),
    )


def _saved_shapes(z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> dict:
    shapes = {"the chain input (the tensor entering the norm/activation chain)": z.shape}
    shapes["the weight"] = weight.shape
    if bias is not None:
        shapes["the bias"] = bias.shape
    return shapes


def _keep_chain_input(ctx, z: torch.Tensor, kept_copy: ApproxOptions | None) -> tuple[torch.Tensor, ...]:
    """What the layer saves of ``z``: ``z`` itself, or its k-bit copy (layout in ``ctx.z_layout``)."""
    if kept_copy is None:
        ctx.z_layout = None
        return (z,)
    kept, ctx.z_layout = compress(z, kept_copy)
    return kept


def _chain_input_and_weights(ctx, where: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``z`` (decoded when a k-bit copy was kept), the weight and the bias, from ``ctx``."""
    *kept, weight, bias = _saved_tensors(ctx, where)
    layout: SavedLayout | None = ctx.z_layout
    return (kept[0] if layout is None else restore(kept, layout)), weight, bias


def _modified_name(shapes: dict, message: str) -> str:
    """Which saved tensor torch's message is about, told apart by the shape it quotes."""
    quoted = {name: f"[{', '.join(map(str, shape))}]]" for name, shape in shapes.items()}
    matches = [name for name, text in quoted.items() if text in message]
    return " or ".join(matches or shapes)


# ---------------------------------------------------------------------- linear


def _fold_to_2d(t: torch.Tensor, addmm: bool) -> torch.Tensor:
    """The 2-D operand torch's ``linear`` hands to ``mm``/``addmm`` for this input or gradient."""
    if t.dim() == 2:
        return t
    if t.dim() == 1:
        return t.reshape(1, -1) if addmm else t.unsqueeze(0)
    return t.reshape(-1, t.shape[-1])


def _folded_stride(x: torch.Tensor, addmm: bool) -> tuple[int, ...]:
    """Strides of ``_fold_to_2d(x)``, without the copy ``reshape`` makes when no view exists."""
    if x.dim() != 2 and x.dim() != 1:
        try:
            return x.view(-1, x.shape[-1]).stride()
        except RuntimeError:  # reshape copies into a fresh row-major tensor
            return (x.shape[-1], 1)
    return _fold_to_2d(x, addmm).stride()


@dataclass(frozen=True)
class LinearOperands:
    """What ``linear_backward`` needs to know of the forward's ``F.linear(x, W, b)`` call.

    ``x_2d_stride`` is ``_folded_stride(x, addmm)``; ``compute_dtype`` the output's
    dtype (the autocast dtype under autocast); ``addmm`` whether torch ran addmm.
    """

    x_shape: torch.Size
    x_dtype: torch.dtype
    x_2d_stride: tuple[int, ...]
    compute_dtype: torch.dtype
    addmm: bool


def linear_backward(
    grad_output: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    rebuild_input: Callable[[], torch.Tensor],
    operands: LinearOperands,
    need_input: bool,
    need_weight: bool,
    need_bias: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``F.linear``'s gradients with the ``mm``/``addmm`` backward formulas torch applies, on the
    same operands, so they are bit-identical; the input is rebuilt (``rebuild_input()``) only
    for the weight gradient."""
    shape = operands.x_shape
    rows = math.prod(shape[:-1])
    weight_c = weight.to(operands.compute_dtype)
    grad_2d = _fold_to_2d(grad_output, operands.addmm)
    grad_x = grad_weight = grad_bias = None
    if need_input:  # mm_mat1_backward
        stride = operands.x_2d_stride
        if stride[0] == 1 and stride[1] == rows:
            grad_x = weight_c.t().mm(grad_2d.t()).t()
        else:
            grad_x = grad_2d.mm(weight_c)
        grad_x = grad_x.reshape(shape).to(operands.x_dtype)
    if need_weight:  # mm_mat2_backward, then the transpose of W.t()
        x_2d = _fold_to_2d(rebuild_input().to(operands.compute_dtype), operands.addmm)
        if weight_c.stride(1) == 1 and weight_c.stride(0) == weight_c.shape[1]:
            grad_weight = grad_2d.t().mm(x_2d)
        else:
            grad_weight = x_2d.t().mm(grad_2d).t()
        grad_weight = grad_weight.to(weight.dtype)
    if need_bias:  # sum_to(grad, bias.shape) of addmm's self, or of the added bias
        out_features = weight.shape[0]
        if operands.addmm:
            grad_bias = grad_2d.sum(0, keepdim=True).view(out_features)
        elif grad_output.dim() == 1:
            grad_bias = grad_output
        else:
            leading = list(range(grad_output.dim() - 1))
            grad_bias = grad_output.sum(leading, keepdim=True).view(out_features)
        grad_bias = grad_bias.to(bias.dtype)
    return grad_x, grad_weight, grad_bias


class RecomputedInputLinearFunction(torch.autograd.Function):
    """``F.linear(x, W, b)`` keeping ``z`` instead of ``x``; backward mirrors torch's exactly.

    torch's ``linear`` runs ``addmm`` on ``x`` folded to 2-D when there is a
    bias and ``x`` is 2-D or contiguous, else ``mm`` on the folded ``x`` and then
    adds the bias; backward applies the ``mm``/``addmm`` backward formulas of
    that path to the same operands.
    """

    @staticmethod
    def forward(ctx, layer, x, z, weight, bias):
        y = F.linear(x, weight, bias)
        ctx.where = layer.describe()
        ctx.record = _shared_record(layer, x, z)
        ctx.addmm = bias is not None and (x.dim() == 2 or x.is_contiguous())
        ctx.x_2d_stride = _folded_stride(x, ctx.addmm)
        ctx.compute_dtype = y.dtype
        ctx.saved_shapes = _saved_shapes(z, weight, bias)
        ctx.save_for_backward(*_keep_chain_input(ctx, z, layer.kept_copy), weight, bias)
        return own_output(y)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        z, weight, bias = _chain_input_and_weights(ctx, ctx.where)
        _, need_x, _, need_weight, need_bias = ctx.needs_input_grad
        record = ctx.record
        grad_x, grad_weight, grad_bias = linear_backward(
            grad_output, weight, bias, lambda: record.rebuild_once(z, ctx.where),
            LinearOperands(record.x_shape, record.x_dtype, ctx.x_2d_stride, ctx.compute_dtype, ctx.addmm),
            need_x, need_weight, need_bias,
        )
        return None, grad_x, None, grad_weight, grad_bias


class RecomputedInputTransposedLinearFunction(torch.autograd.Function):
    """A zoo ``Conv1D``'s ``addmm(b, x_2d, W)`` (``W`` (in, out)) keeping ``z`` instead of ``x``.

    Backward applies the ``addmm`` backward formulas to the same operands as
    autograd through the zoo layer's own forward, so gradients are bit-identical.
    """

    @staticmethod
    def forward(ctx, layer, x, z, weight, bias):
        y = transposed_linear(x, weight, bias)
        ctx.where = layer.describe()
        ctx.record = _shared_record(layer, x, z)
        ctx.x_2d_stride = _folded_stride(x, addmm=True)
        ctx.compute_dtype = y.dtype  # differs from the Parameters' under autocast
        ctx.saved_shapes = _saved_shapes(z, weight, bias)
        ctx.save_for_backward(*_keep_chain_input(ctx, z, layer.kept_copy), weight, bias)
        return own_output(y)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        z, weight, bias = _chain_input_and_weights(ctx, ctx.where)
        _, need_x, _, need_weight, need_bias = ctx.needs_input_grad
        shape = ctx.record.x_shape
        rows = math.prod(shape[:-1])
        weight_c = weight.to(ctx.compute_dtype)
        grad_2d = _fold_to_2d(grad_output, addmm=True)
        grad_x = grad_weight = grad_bias = None
        if need_x:  # mm_mat1_backward with mat2 = W
            stride = ctx.x_2d_stride
            if stride[0] == 1 and stride[1] == rows:
                grad_x = weight_c.mm(grad_2d.t()).t()
            else:
                grad_x = grad_2d.mm(weight_c.t())
            grad_x = grad_x.reshape(shape).to(ctx.record.x_dtype)
        if need_weight:  # mm_mat2_backward with mat1 = the rebuilt x folded to 2-D
            x_2d = _fold_to_2d(ctx.record.rebuild_once(z, ctx.where).to(ctx.compute_dtype), addmm=True)
            if weight_c.stride(0) == 1 and weight_c.stride(1) == weight_c.shape[0]:
                grad_weight = grad_2d.t().mm(x_2d).t()
            else:
                grad_weight = x_2d.t().mm(grad_2d)
            grad_weight = grad_weight.to(weight.dtype)
        if need_bias:  # sum_to(grad, bias.shape) of addmm's self
            grad_bias = grad_2d.sum(0, keepdim=True).view(bias.shape[0]).to(bias.dtype)
        return None, grad_x, None, grad_weight, grad_bias


# ------------------------------------------------------------------------ conv


class RecomputedInputConvFunction(torch.autograd.Function):
    """``layer._conv_forward(x, W, b)`` keeping ``z`` instead of ``x``.

    Backward is ``convolution_backward`` with the arguments torch's own
    ``ConvolutionBackward0`` uses, on the rebuilt ``x``.
    """

    @staticmethod
    def forward(ctx, layer, x, z, weight, bias):
        y = layer._conv_forward(x, weight, bias)
        ctx.where = layer.describe()
        ctx.record = _shared_record(layer, x, z)
        ctx.unbatched = x.dim() == weight.dim() - 1
        ctx.geometry = (layer.stride, layer.explicit_padding(), layer.dilation, layer.groups)
        ctx.compute_dtype = y.dtype
        ctx.saved_shapes = _saved_shapes(z, weight, bias)
        ctx.save_for_backward(*_keep_chain_input(ctx, z, layer.kept_copy), weight, bias)
        return own_output(y)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        z, weight, bias = _chain_input_and_weights(ctx, ctx.where)
        _, need_x, _, need_weight, need_bias = ctx.needs_input_grad
        record = ctx.record
        x = record.rebuild_once(z, ctx.where).to(ctx.compute_dtype)
        if ctx.unbatched:
            x, grad_output = x.unsqueeze(0), grad_output.unsqueeze(0)
        stride, padding, dilation, groups = ctx.geometry
        grad_x, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
            grad_output, x, weight.to(ctx.compute_dtype),
            None if bias is None else list(bias.shape),
            list(stride), list(padding), list(dilation), False, [0] * len(stride), groups,
            [need_x, need_weight, need_bias],
        )
        if grad_x is not None:
            grad_x = (grad_x.squeeze(0) if ctx.unbatched else grad_x).to(record.x_dtype)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        return None, grad_x, None, grad_weight, grad_bias


# --------------------------------------------------------------------- modules


class _RecomputedInput:
    """Chain handling shared by the Linear and Conv variants (see the module docstring)."""

    chain: tuple[nn.Module, ...] = ()
    kept_copy: ApproxOptions | None = None
    _plain_type: type[nn.Module]
    _function: type[torch.autograd.Function]

    @classmethod
    def from_module(
        cls, module: nn.Module, chain: tuple[nn.Module, ...] = (), kept_copy: ApproxOptions | None = None
    ):
        """Build from a plain layer, sharing its Parameters; ``chain`` as for ``set_chain``;
        ``kept_copy``: keep a k-bit copy of the chain input (module docstring), else the input."""
        if type(module) is not cls._plain_type:
            raise ConversionError(
                f"{cls.__name__}.from_module expects an nn.{cls._plain_type.__name__}, "
                f"got {type(module).__name__}"
            )
        cls._check_convertible(module)
        converted = with_chain(cls, module, chain)
        converted.kept_copy = kept_copy
        return converted

    @classmethod
    def _check_convertible(cls, module: nn.Module) -> None:
        """Refuse settings whose backward this variant cannot mirror exactly."""

    def set_chain(self, *modules: nn.Module) -> None:
        """Give the modules that compute this layer's input from ``chain_input``, in order."""
        _validate_chain(tuple(modules), self.describe())
        self.chain = tuple(modules)

    def to_module(self) -> nn.Module:
        """The plain torch layer with the same Parameter objects (the chain is dropped)."""
        return rebuild_as(self._plain_type, self, drop=("chain", "kept_copy"))

    def describe(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"

    def forward(
        self,
        input: torch.Tensor,
        chain_input: torch.Tensor | None = None,
        chain_output: torch.Tensor | None = None,
    ):
        """``input`` = chain(``chain_input``); see the module docstring for the convention.

        ``chain_output``, when given, is the tensor the chain returned in this
        forward: unless ``input`` is that very tensor (a hook or a direct call
        put another one here), the layer keeps its input as the plain layer does.
        """
        if chain_output is not None and input is not chain_output:
            return self._plain_forward(input)
        if (
            chain_input is None
            or not chain_rebuildable(self.chain)
            or not self._uses_rebuild()
            or functorch_active(input, chain_input)
            or not self._chain_on(input.device)
        ):
            return self._plain_forward(input)
        if not self.chain:
            raise ConversionError(
                f"{self.describe()} got a chain_input but no chain: call set_chain(...) "
                "with the modules that turn chain_input into input"
            )
        return self._function.apply(self, input, chain_input, self.weight, self.bias)

    def _chain_on(self, device: torch.device) -> bool:
        """Whether the chain's Parameters live where the input does: an ``nn.DataParallel``
        replica on another device still holds the original chain modules."""
        return all(p.device == device for module in self.chain for p in module.parameters())

    def _uses_rebuild(self) -> bool:
        return torch.is_grad_enabled() and self.weight.requires_grad

    def _plain_forward(self, input: torch.Tensor) -> torch.Tensor:
        return self._plain_type.forward(self, input)

    def _layer_repr(self) -> str:
        return self._plain_type.extra_repr(self)

    def extra_repr(self) -> str:
        chain = " -> ".join(type(module).__name__ for module in self.chain) or "unset"
        kept = "" if self.kept_copy is None else f" kept in {self.kept_copy.bits} bits"
        return f"{self._layer_repr()}, rebuilds input from chain={chain}{kept}"


class RecomputedInputLinear(_RecomputedInput, nn.Linear):
    """``nn.Linear`` keeping its chain's input instead of its own (module docstring)."""

    _plain_type = nn.Linear
    _function = RecomputedInputLinearFunction


class _RecomputedInputConv(_RecomputedInput):
    @classmethod
    def _check_convertible(cls, module: nn.Module) -> None:
        if module.padding_mode != "zeros":
            raise ConversionError(
                f"{cls.__name__}: padding_mode={module.padding_mode!r} pads the input with a "
                "separate op that keeps it; only padding_mode='zeros' is supported, leave this "
                "layer as it is"
            )
        if isinstance(module.padding, str) and module.padding == "same":
            for k, d in zip(module.kernel_size, module.dilation):
                if d * (k - 1) % 2:
                    raise ConversionError(
                        f"{cls.__name__}: padding='same' with kernel_size={module.kernel_size}, "
                        f"dilation={module.dilation} pads unevenly through a separate op; "
                        "leave this layer as it is"
                    )

    def explicit_padding(self) -> tuple[int, ...]:
        """The per-dimension padding (elements) torch's conv passes to ``convolution``."""
        if self.padding == "valid":
            return (0,) * len(self.kernel_size)
        if self.padding == "same":
            return tuple(d * (k - 1) // 2 for k, d in zip(self.kernel_size, self.dilation))
        return tuple(self.padding)


class RecomputedInputConv1d(_RecomputedInputConv, nn.Conv1d):
    """``nn.Conv1d`` keeping its chain's input instead of its own (module docstring)."""

    _plain_type = nn.Conv1d
    _function = RecomputedInputConvFunction


class RecomputedInputConv2d(_RecomputedInputConv, nn.Conv2d):
    """``nn.Conv2d`` keeping its chain's input instead of its own (module docstring)."""

    _plain_type = nn.Conv2d
    _function = RecomputedInputConvFunction


class RecomputedInputConv3d(_RecomputedInputConv, nn.Conv3d):
    """``nn.Conv3d`` keeping its chain's input instead of its own (module docstring)."""

    _plain_type = nn.Conv3d
    _function = RecomputedInputConvFunction


class RecomputedInputTransposedLinear(_RecomputedInput, TransposedLinearVariant):
    """A zoo ``Conv1D`` (GPT-2's linears, ``W`` (in, out)) keeping its chain's input instead of its own.

    Same convention as ``RecomputedInputLinear`` (module docstring); a plain
    ``nn.Module`` remembering the zoo class, like the other zoo variants
    (``aalconvert.nn.zoo_linear``).
    """

    OPTIONS = ("chain", "kept_copy")
    _function = RecomputedInputTransposedLinearFunction

    @classmethod
    def from_module(
        cls, module: nn.Module, chain: tuple[nn.Module, ...] = (), kept_copy: ApproxOptions | None = None
    ):
        """Build from a zoo ``Conv1D``, sharing its Parameters; ``chain`` and ``kept_copy`` as for
        the Linear variant."""
        if chain:
            _validate_chain(tuple(chain), cls.__name__)
        converted = cls.rebuild_from(module)
        converted.chain = tuple(chain)
        converted.kept_copy = kept_copy
        return converted

    def to_module(self) -> nn.Module:
        """An instance of the zoo class with the same Parameter objects (the chain is dropped)."""
        return TransposedLinearVariant.to_module(self)

    def _plain_forward(self, input: torch.Tensor) -> torch.Tensor:
        return transposed_linear(input, self.weight, self.bias)

    def _layer_repr(self) -> str:
        return f"{self.zoo_class.__name__}, in_features={self.in_features}, out_features={self.out_features}"

"""``matmul(dropout(softmax(s)), v)`` as one op that keeps no dropped probabilities.

Ordinary backprop keeps the softmax output ``y`` (softmax's own backward needs
it), the dropout noise, and the dropped probabilities ``p = y * noise`` with
``v`` for the product's backward. Here ``p`` is rebuilt in backward from ``y``
and a 1-bit keep-mask with the same elementwise op as the forward (methods.md
section 4, cheap recomputation: no matmul is recomputed). With ``options``
(``ApproxOptions``) ``y`` and ``v`` are kept as k-bit copies too (methods.md
section 3); without, every gradient is bit-identical to BP's.

The product runs as torch.matmul does for equal-rank batched operands
(``bmm`` over the flattened batch dims, ``v`` reshaped, a copy when it is a
strided view, as torch keeps it too); the dropout repeats torch's own ops on
the device, as ``MaskDropout`` does. Where the fused form cannot reproduce BP
(autocast, in-place dropout, hooks on the dropout module, broadcast batch
dims) the original ops run instead (their k-bit versions with ``options``).
"""

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from aalconvert.kernels import pack_bits, unpack_bits
from aalconvert.nn.approx_activation import approx_softmax
from aalconvert.nn.approx_common import ApproxOptions, compress, functorch_active, restore
from aalconvert.nn.approx_matmul import approx_matmul
from aalconvert.nn.function_output import own_output
from aalconvert.nn.lossless import MaskDropout
from aalconvert.nn.traced_forward import depends_on_input

_SOFTMAX_FUNCTIONS = (torch.softmax, F.softmax)
_FUSED_DROPOUT_DEVICES = ("cuda", "xpu")  # devices where F.dropout runs native_dropout
_MATMUL_FUNCTIONS = (torch.matmul, operator.matmul)
_DROPOUT_TYPES = (nn.Dropout, MaskDropout)  # whose forward the fused op repeats


def _dropout_forward(y: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
    """``(dropout(y), packed keep-mask or None, fused)`` with torch's own dropout ops on the device."""
    fused = y.device.type in _FUSED_DROPOUT_DEVICES
    if p == 0.0:
        return y, None, fused
    if fused:
        probs, keep = torch.native_dropout(y, p, True)
        return probs, pack_bits(keep), fused
    noise = torch.empty_like(y).bernoulli_(1 - p)
    packed = pack_bits(noise)
    return y * noise.div_(1 - p), packed, fused


class _RebuiltDropout:
    """The dropout of the forward, rebuilt from its 1-bit mask: applied to y, and to a gradient."""

    def __init__(self, packed: torch.Tensor | None, shape: torch.Size, p: float, fused: bool, dtype) -> None:
        self.p, self.packed = p, packed
        if packed is None:
            self.keep = self.noise = None
        elif fused:
            self.keep = unpack_bits(packed, shape, decode="bool")
        else:
            self.noise = unpack_bits(packed, shape, decode="binary", dtype=dtype).div_(1 - p)
        self.fused = fused

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        if self.packed is None:
            return t
        if self.fused:
            return torch.ops.aten.native_dropout_backward(t, self.keep, 1.0 / (1.0 - self.p))  # t*keep*scale
        return t * self.noise


def _product_backward(ctx, g, y, v_rows, packed):
    """(grad of y, grad of v_rows) of ``bmm(dropout(y), v_rows)``, the dropped y rebuilt."""
    count, inner, columns = v_rows.shape
    rows = y.shape[-2]
    g_rows = g.reshape(count, rows, columns)
    dropout = _RebuiltDropout(packed, y.shape, ctx.p, ctx.fused, y.dtype)
    dy = dv = None
    if ctx.needs_input_grad[1]:
        dv = dropout(y).reshape(count, rows, inner).transpose(1, 2).bmm(g_rows)
    if ctx.needs_input_grad[0]:
        dy = dropout(g_rows.bmm(v_rows.transpose(1, 2)).reshape(y.shape))
    return dy, dv


def _rows(probs: torch.Tensor, v: torch.Tensor) -> tuple[int, torch.Tensor]:
    """The flattened batch count, and ``v`` as torch.matmul's bmm reads it (a copy if strided)."""
    *_, rows, inner = probs.shape
    count = probs.numel() // (rows * inner)
    return count, v.reshape(count, inner, v.shape[-1])


class DropoutMatmulFunction(torch.autograd.Function):
    """``bmm(dropout(y), v_rows)`` keeping y, a 1-bit mask and v_rows: the exact form.

    ``y`` (the softmax output) and ``v_rows`` come from ordinary autograd ops
    outside, so they are saved inputs: softmax keeps the same ``y`` (one storage),
    and second-order gradients flow through both as in BP.
    """

    @staticmethod
    def forward(ctx, y, v_rows, p: float):
        probs, packed, ctx.fused = _dropout_forward(y, p)
        ctx.p = p
        count, _ = _rows(probs, v_rows)
        out = torch.bmm(probs.reshape(count, *probs.shape[-2:]), v_rows)
        ctx.save_for_backward(packed, y, v_rows)
        return out

    @staticmethod
    def backward(ctx, g):
        packed, y, v_rows = ctx.saved_tensors
        return (*_product_backward(ctx, g, y, v_rows, packed), None)


class SoftmaxDropoutMatmulFunction(torch.autograd.Function):
    """``bmm(dropout(softmax(s)), v)`` over flattened batch dims, keeping k-bit y and v and a 1-bit mask.

    ``options``: the ``ApproxOptions`` of the k-bit copies (the exact form is
    ``DropoutMatmulFunction``).
    """

    @staticmethod
    def forward(ctx, scores, v, dim: int, p: float, options: ApproxOptions):
        y = torch.softmax(scores, dim)
        ctx.dim, ctx.p = dim, p
        probs, packed, ctx.fused = _dropout_forward(y, p)
        *batch, rows, _ = probs.shape
        count, v_rows = _rows(probs, v)
        out = torch.bmm(probs.reshape(count, rows, -1), v_rows)
        ctx.v_shape = v.shape
        (kept_y, y_layout), (kept_v, v_layout) = compress(y, options), compress(v_rows, options)
        ctx.layouts = (y_layout, v_layout)
        ctx.counts = (len(kept_y), len(kept_v))
        ctx.save_for_backward(packed, *kept_y, *kept_v)
        return own_output(out.view(*batch, rows, v.shape[-1]))

    @staticmethod
    def backward(ctx, g):
        packed, *kept = ctx.saved_tensors
        kept_y, kept_v = kept[: ctx.counts[0]], kept[ctx.counts[0]:]
        # decoded copies, in the gradient's dtype (autocast)
        y, v_rows = (restore(t, layout).to(g.dtype) for t, layout in zip((kept_y, kept_v), ctx.layouts))
        dy, dv = _product_backward(ctx, g, y, v_rows, packed)
        dscores = None if dy is None else torch.ops.aten._softmax_backward_data(dy, y, ctx.dim, y.dtype)
        return dscores, None if dv is None else dv.reshape(ctx.v_shape), None, None, None


def softmax_dropout_matmul(
    scores: torch.Tensor,
    v: torch.Tensor,
    dim: int,
    dropout: nn.Dropout,
    options: ApproxOptions | None = None,
) -> torch.Tensor:
    """``torch.matmul(dropout(torch.softmax(scores, dim)), v)`` keeping no dropped probabilities.

    ``dropout`` is the module itself, read at call time (train/eval, ``p``);
    ``options`` (k-bit copies of y and v) as in ``SoftmaxDropoutMatmulFunction``.
    """
    plain = (
        not torch.is_grad_enabled()
        or not (scores.requires_grad or v.requires_grad)
        or torch.is_autocast_enabled(scores.device.type)
        or functorch_active(scores, v)
        or dropout.inplace
        or dropout._forward_hooks
        or dropout._forward_pre_hooks
        or dropout.p == 1.0
        or scores.dim() < 3
        or scores.dim() != v.dim()
        or scores.shape[:-2] != v.shape[:-2]
        or scores.shape[-1] != v.shape[-2]
        or scores.numel() == 0
    )
    if plain and options is None:
        return torch.matmul(dropout(torch.softmax(scores, dim)), v)
    if plain:
        return approx_matmul(dropout(approx_softmax(scores, dim, options)), v, options)
    p = float(dropout.p) if dropout.training else 0.0
    if options is not None:
        return SoftmaxDropoutMatmulFunction.apply(scores, v, dim, p, options)
    y = torch.softmax(scores, dim)
    count, v_rows = _rows(y, v)
    out = DropoutMatmulFunction.apply(y, v_rows, p)
    return out.view(*y.shape[:-1], v.shape[-1])


def softmax_dim(node: fx.Node) -> int | None:
    """The dim of a functional/method softmax node over one tensor (no dtype), else None."""
    is_softmax = (node.op == "call_function" and node.target in _SOFTMAX_FUNCTIONS) or (
        node.op == "call_method" and node.target == "softmax"
    )
    if not is_softmax:
        return None
    rest = dict(node.kwargs)
    positional = list(node.args[1:])
    dim = positional.pop(0) if positional else rest.pop("dim", None)
    if node.target is F.softmax and positional:  # F.softmax(input, dim, _stacklevel, dtype)
        positional.pop(0)
    rest.pop("_stacklevel", None)
    dtype = positional.pop(0) if positional else rest.pop("dtype", None)
    if positional or rest or dtype is not None or not isinstance(dim, int) or isinstance(dim, bool):
        return None
    return dim


def find_chains(graph: fx.Graph, module: nn.Module) -> list[tuple[fx.Node, fx.Node, fx.Node, int]]:
    """(softmax, dropout call, matmul, dim) for each ``matmul(dropout(softmax(s)), v)`` in ``graph``.

    Each intermediate must have no other reader, the dropout must be an
    ``nn.Dropout`` or ``MaskDropout`` child (a subclass may change forward) and
    ``v`` an activation.
    """
    chains = []
    for node in graph.nodes:
        dim = softmax_dim(node)
        if dim is None or len(node.users) != 1:
            continue
        (drop,) = node.users
        if drop.op != "call_module" or drop.args != (node,) or drop.kwargs or len(drop.users) != 1:
            continue
        if type(module.get_submodule(drop.target)) not in _DROPOUT_TYPES:
            continue
        (product,) = drop.users
        is_matmul = (product.op == "call_function" and product.target in _MATMUL_FUNCTIONS) or (
            product.op == "call_method" and product.target in ("matmul", "__matmul__")
        )
        if is_matmul and not product.kwargs and len(product.args) == 2 and product.args[0] is drop:
            if depends_on_input(product.args[1]):
                chains.append((node, drop, product, dim))
    return chains


def fuse_chains(graph: fx.Graph, module: nn.Module, options: fx.Node | None) -> int:
    """Replace each chain of ``find_chains`` by ``softmax_dropout_matmul``; return how many.

    ``options``: None (exact) or the graph node reading the variant's ApproxOptions.
    """
    chains = find_chains(graph, module)
    for softmax, drop, product, dim in chains:
        with graph.inserting_before(product):
            dropout = graph.get_attr(drop.target)
            fused = graph.call_function(
                softmax_dropout_matmul, (softmax.args[0], product.args[1], dim, dropout, options)
            )
        fused.meta = dict(product.meta)
        product.replace_all_uses_with(fused)
        for node in (product, drop, softmax):
            graph.erase_node(node)
    return len(chains)

"""Matrix products of two activations that keep k-bit copies of their operands (methods.md 3).

In attention, ``scores = q @ k^T`` and ``context = probs @ v`` multiply two
activations, so ordinary backprop keeps both operands in full. Here forward is
exactly torch's product; backward is

    da = g @ b^T,   db = a^T @ g

(summed over broadcast batch dimensions), with ``a`` and ``b`` decoded from the
copies kept. Each operand is copied only when the *other* one needs a gradient.
"""

import torch

from aalconvert.nn.approx_common import ApproxOptions, compress, needs_graph, restore
from aalconvert.nn.function_output import own_output

PRODUCTS = {"matmul": torch.matmul, "bmm": torch.bmm}


class ApproxMatmulFunction(torch.autograd.Function):
    """``torch.matmul`` / ``torch.bmm`` of two tensors of rank >= 2 keeping k-bit operands."""

    @staticmethod
    def forward(ctx, a, b, product: str, options: ApproxOptions):
        y = PRODUCTS[product](a, b)
        need_da, need_db = ctx.needs_input_grad[:2]
        saved_a, ctx.a_layout = compress(a, options) if need_db else ((), None)
        saved_b, ctx.b_layout = compress(b, options) if need_da else ((), None)
        ctx.shapes = (a.shape, b.shape)
        ctx.save_for_backward(*saved_a, *saved_b)
        return own_output(y)

    @staticmethod
    def backward(ctx, g):
        saved = ctx.saved_tensors
        a_count = ctx.a_layout.count if ctx.a_layout is not None else 0
        a_shape, b_shape = ctx.shapes
        da = db = None
        # ``.to(g.dtype)``: under autocast g is in the low precision (as in ApproxLinearFunction).
        if ctx.b_layout is not None:
            b = restore(saved[a_count:], ctx.b_layout).to(g.dtype)
            da = torch.matmul(g, b.transpose(-2, -1)).sum_to_size(a_shape)
        if ctx.a_layout is not None:
            a = restore(saved[:a_count], ctx.a_layout).to(g.dtype)
            db = torch.matmul(a.transpose(-2, -1), g).sum_to_size(b_shape)
        return da, db, None, None


def approx_matmul(a: torch.Tensor, b: torch.Tensor, options: ApproxOptions | None = None) -> torch.Tensor:
    """``torch.matmul(a, b)`` keeping ``options.bits``-bit copies of the operands for backward.

    Vector operands (rank 1) and calls autograd does not record run torch's own product.
    """
    if a.dim() < 2 or b.dim() < 2 or not needs_graph(a, b):
        return torch.matmul(a, b)
    return ApproxMatmulFunction.apply(a, b, "matmul", options or ApproxOptions())


def approx_bmm(a: torch.Tensor, b: torch.Tensor, options: ApproxOptions | None = None) -> torch.Tensor:
    """``torch.bmm(a, b)`` keeping ``options.bits``-bit copies of the operands for backward."""
    if not needs_graph(a, b):
        return torch.bmm(a, b)
    return ApproxMatmulFunction.apply(a, b, "bmm", options or ApproxOptions())

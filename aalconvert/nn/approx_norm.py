"""Batch norm and layer norm that keep a k-bit copy of their input, and exact statistics.

Forward is exactly torch's (running statistics included). Backward is the
normalization's own formula with ``xhat = (x~ - mean) * invstd``, where ``x~``
is the decoded input and ``mean``/``invstd`` are the exact statistics of the
forward (per channel for batch norm, per row for layer norm, as the forward op
returns them):

    dx = invstd * (g w - mean(g w) - xhat * mean(g w xhat)),
    dw = sum(g xhat),  db = sum(g).

Batch norm in eval mode is a fixed affine map: ``dx = g w invstd`` needs no
activation at all; only ``dw`` needs ``xhat``, so the input copy is made only
when the weight needs a gradient. The arithmetic of backward runs in float32.
"""

import torch
from torch import nn

from aalconvert.nn.approx_common import ApproxOptions, ApproxVariant, compress, needs_graph, restore


def _normalized(x: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor) -> torch.Tensor:
    return (x.float() - mean.float()) * invstd.float()


def _input_grad(gw: torch.Tensor, xhat: torch.Tensor, invstd: torch.Tensor, dims) -> torch.Tensor:
    """Gradient of a normalization over ``dims`` with batch statistics (float32)."""
    centred = gw - gw.mean(dims, keepdim=True)
    return invstd.float() * (centred - xhat * (gw * xhat).mean(dims, keepdim=True))


class ApproxBatchNormFunction(torch.autograd.Function):
    """Batch norm over dim 1 keeping a k-bit input and exact per-channel mean and invstd."""

    @staticmethod
    def forward(
        ctx, x, weight, bias, running_mean, running_var, use_batch_stats, momentum, eps,
        options: ApproxOptions,
    ):
        y, mean, invstd, _, _ = torch.ops.aten._batch_norm_impl_index(
            x, weight, bias, running_mean, running_var, use_batch_stats, momentum, eps,
            torch.backends.cudnn.enabled,
        )
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not use_batch_stats:
            mean = running_mean.to(torch.float32, copy=True)
            invstd = torch.rsqrt(running_var.float() + eps)
        keep_input = need_dw or (use_batch_stats and need_dx)
        saved, ctx.layout = compress(x, options) if keep_input else ((), None)
        ctx.use_batch_stats = use_batch_stats
        ctx.save_for_backward(weight, mean, invstd, *saved)
        return y

    @staticmethod
    def backward(ctx, g):
        weight, mean, invstd, *saved = ctx.saved_tensors
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        dims = [0, *range(2, g.dim())]
        per_channel = (1, -1) + (1,) * (g.dim() - 2)
        mean, invstd = mean.view(per_channel), invstd.view(per_channel)
        g32 = g.float()
        gw = g32 if weight is None else g32 * weight.float().view(per_channel)
        xhat = _normalized(restore(saved, ctx.layout), mean, invstd) if saved else None
        dx = dw = db = None
        if need_dx:
            if ctx.use_batch_stats:
                dx = _input_grad(gw, xhat, invstd, dims)
            else:
                dx = gw * invstd.float()
            dx = dx.to(g.dtype)
        if need_dw:
            dw = (g32 * xhat).sum(dims).to(weight.dtype)
        if need_db:
            db = g32.sum(dims).to(weight.dtype if weight is not None else g.dtype)
        return dx, dw, db, None, None, None, None, None, None


class _ApproxBatchNorm(ApproxVariant):
    """Shared forward of the batch-norm variants: torch's bookkeeping of running statistics."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not needs_graph(x, self.weight, self.bias):
            return super().forward(x)
        self._check_input_dim(x)
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                momentum = 1.0 / float(self.num_batches_tracked)
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        use_running = not self.training or self.track_running_stats
        return ApproxBatchNormFunction.apply(
            x,
            self.weight,
            self.bias,
            self.running_mean if use_running else None,
            self.running_var if use_running else None,
            use_batch_stats,
            momentum,
            self.eps,
            self.approx_options,
        )


class ApproxBatchNorm1d(_ApproxBatchNorm, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` keeping a k-bit copy of its input and exact per-channel statistics."""

    torch_class = nn.BatchNorm1d


class ApproxBatchNorm2d(_ApproxBatchNorm, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` keeping a k-bit copy of its input and exact per-channel statistics."""

    torch_class = nn.BatchNorm2d


class ApproxLayerNormFunction(torch.autograd.Function):
    """Layer norm keeping a k-bit input and the exact per-row mean and rstd."""

    @staticmethod
    def forward(ctx, x, normalized_shape, weight, bias, eps, options: ApproxOptions):
        y, mean, rstd = torch.native_layer_norm(x, normalized_shape, weight, bias, eps)
        keep_input = ctx.needs_input_grad[0] or ctx.needs_input_grad[2]
        saved, ctx.layout = compress(x, options) if keep_input else ((), None)
        ctx.first_normalized_dim = x.dim() - len(normalized_shape)
        ctx.save_for_backward(weight, mean, rstd, *saved)
        return y

    @staticmethod
    def backward(ctx, g):
        weight, mean, rstd, *saved = ctx.saved_tensors
        need_dx, need_dw, need_db = (ctx.needs_input_grad[i] for i in (0, 2, 3))
        g32 = g.float()
        norm_dims = tuple(range(ctx.first_normalized_dim, g.dim()))
        lead_dims = tuple(range(ctx.first_normalized_dim))
        gw = g32 if weight is None else g32 * weight.float()
        xhat = _normalized(restore(saved, ctx.layout), mean, rstd) if saved else None
        dx = _input_grad(gw, xhat, rstd, norm_dims).to(g.dtype) if need_dx else None
        # An unbatched input (x.dim() == len(normalized_shape)) has no leading dims to sum
        # over, and ``sum(())`` would sum over every dim.
        lead_sum = (lambda t: t.sum(lead_dims)) if lead_dims else (lambda t: t)
        dw = lead_sum(g32 * xhat).to(weight.dtype) if need_dw else None
        db = lead_sum(g32).to(g.dtype if weight is None else weight.dtype) if need_db else None
        return dx, None, dw, db, None, None


class ApproxLayerNorm(ApproxVariant, nn.LayerNorm):
    """``nn.LayerNorm`` keeping a k-bit copy of its input and exact per-row mean and rstd."""

    torch_class = nn.LayerNorm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not needs_graph(x, self.weight, self.bias):
            return super().forward(x)
        return ApproxLayerNormFunction.apply(
            x, list(self.normalized_shape), self.weight, self.bias, self.eps, self.approx_options
        )

"""Trainable layer variants: one file per technique.

``CONVERTED_TYPES`` lists every variant class
so that ``revert`` and the rules can recognise converted modules.
"""

from aalconvert.nn import (
    approx,
    approx_shared_relu,
    approx_weighted,
    ara,
    asa,
    functional,
    loss_head,
    lossless,
    recompute,
    recompute_mha,
    routed_linear,
    traced_forward,
    zoo_pointwise,
)

CONVERTED_TYPES: tuple[type, ...] = (
    lossless.MaskReLU,
    lossless.MaskHardtanh,
    lossless.MaskReLU6,
    lossless.MaskLeakyReLU,
    lossless.MaskDropout,
    lossless.CompactMaxPool2d,
    ara.ARALinear,
    ara.ARAConv1d,
    ara.ARAConv2d,
    asa.ASALinear,
    asa.ASAConv1d,
    asa.ASAConv2d,
    asa.ASATransposedLinear,
    recompute.RecomputedInputLinear,
    recompute.RecomputedInputConv1d,
    recompute.RecomputedInputConv2d,
    recompute.RecomputedInputConv3d,
    recompute.RecomputedInputTransposedLinear,
    recompute_mha.RecomputedInputMultiheadAttention,
    routed_linear.RoutedLinears,
    approx.ApproxLinear,
    approx.ApproxConv1d,
    approx.ApproxConv2d,
    approx_weighted.ApproxTransposedLinear,
    approx.ApproxBatchNorm1d,
    approx.ApproxBatchNorm2d,
    approx.ApproxLayerNorm,
    approx.ApproxGELU,
    approx.ApproxSiLU,
    approx.ApproxSoftmax,
    approx.ApproxReLU,
    approx_shared_relu.SharedCopyReLU,
    traced_forward.TracedForwardVariant,
    zoo_pointwise.PointwiseVariant,
    loss_head.LossHeadLinear,
)

"""Approximate activations (methods.md section 3): exact forward, k-bit copy kept for backward.

Each variant is built from a torch module with ``Variant.from_module(module,
bits=4, stochastic=False, group_size=None, min_numel=4096)`` and shares its
Parameters; ``to_module()`` gives the torch module back. Parameters are never
quantized, and activations with fewer than ``min_numel`` elements are kept exact.
The pieces live in ``approx_common`` (options, saving), ``approx_weighted``
(linear, conv), ``approx_norm`` (batch norm, layer norm), ``approx_activation``
(GELU, SiLU, softmax), ``approx_relu`` (sign-preserving ReLU) and
``approx_shared_relu`` (a ReLU reading its exact mask from the copy its readers keep).
"""

from aalconvert.nn.approx_activation import (
    ApproxGELU,
    ApproxGELUFunction,
    ApproxSiLU,
    ApproxSiLUFunction,
    ApproxSoftmax,
    ApproxSoftmaxFunction,
    approx_softmax,
)
from aalconvert.nn.approx_common import ApproxOptions
from aalconvert.nn.approx_norm import (
    ApproxBatchNorm1d,
    ApproxBatchNorm2d,
    ApproxBatchNormFunction,
    ApproxLayerNorm,
    ApproxLayerNormFunction,
)
from aalconvert.nn.approx_relu import (
    ApproxReLU,
    ApproxReLUFunction,
    decode_relu_output,
    quantize_relu_output,
)
from aalconvert.nn.approx_shared_relu import SharedCopyReLU, SharedCopyReLUFunction
from aalconvert.nn.approx_weighted import (
    ApproxConv1d,
    ApproxConv2d,
    ApproxConvFunction,
    ApproxLinear,
    ApproxLinearFunction,
)

__all__ = [
    "ApproxOptions",
    "ApproxLinear",
    "ApproxConv1d",
    "ApproxConv2d",
    "ApproxBatchNorm1d",
    "ApproxBatchNorm2d",
    "ApproxLayerNorm",
    "ApproxGELU",
    "ApproxSiLU",
    "ApproxSoftmax",
    "ApproxReLU",
    "SharedCopyReLU",
    "approx_softmax",
    "quantize_relu_output",
    "decode_relu_output",
    "ApproxLinearFunction",
    "ApproxConvFunction",
    "ApproxBatchNormFunction",
    "ApproxLayerNormFunction",
    "ApproxGELUFunction",
    "ApproxSiLUFunction",
    "ApproxSoftmaxFunction",
    "ApproxReLUFunction",
    "SharedCopyReLUFunction",
]

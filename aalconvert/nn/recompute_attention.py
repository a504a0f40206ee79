"""Attention cores whose ``matmul(dropout(softmax(s)), v)`` keeps no dropped probabilities (exact).

``RecomputedAttention.from_module(module)`` re-traces the module's own forward
(``aalconvert.nn.traced_forward``) and runs every such chain as
``softmax_dropout_matmul`` (``aalconvert.nn.softmax_dropout_matmul``): the
probabilities after dropout are rebuilt in backward from the softmax output
(kept by softmax anyway) and a 1-bit mask, so a full ``(..., N, N)`` tensor
less is kept and every gradient is bit-identical to BP's.
"""

import torch.fx as fx
from torch import nn

from aalconvert.nn.softmax_dropout_matmul import fuse_chains
from aalconvert.nn.traced_forward import TracedForwardVariant


class RecomputedAttention(TracedForwardVariant):
    """A module's own forward whose ``matmul(dropout(softmax(s)), v)`` keeps no dropped probabilities."""

    nothing_found = (
        "has no matmul(dropout(softmax(scores)), v) whose intermediates have no other reader; "
        "nothing to rebuild"
    )

    @classmethod
    def rewrite(cls, graph: fx.Graph, module: nn.Module) -> int:
        return fuse_chains(graph, module, None)

"""Attention written with functional ops (``q @ k^T``, ``softmax``, ``probs @ v``), kept in k bits.

``ApproxAttention.from_module(module, **options)`` (options as ``ApproxOptions``)
re-traces the module's own forward (``aalconvert.nn.traced_forward``). Each
``matmul(dropout(softmax(s)), v)`` becomes ``softmax_dropout_matmul`` with
k-bit copies (k-bit softmax output and v, 1-bit mask; the probabilities after
dropout are rebuilt from them), each other functional softmax
``approx_softmax`` and each other product of two activations
``approx_matmul`` / ``approx_bmm``. Forward stays exact; what is kept for
backward is k-bit. A
product with a parameter operand is left alone (parameters are never
quantized), and so is a softmax with a ``dtype``.
"""

import operator
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from aalconvert.nn.approx_activation import approx_softmax
from aalconvert.nn.approx_common import ApproxOptions, make_options
from aalconvert.nn.approx_matmul import approx_bmm, approx_matmul
from aalconvert.nn.softmax_dropout_matmul import fuse_chains, softmax_dim
from aalconvert.nn.traced_forward import TracedForwardVariant, depends_on_input, options_node

_MATMUL_FUNCTIONS = {torch.matmul: approx_matmul, operator.matmul: approx_matmul, torch.bmm: approx_bmm}
_MATMUL_METHODS = {"matmul": approx_matmul, "__matmul__": approx_matmul, "bmm": approx_bmm}


def matmul_replacement(node: fx.Node):
    """``approx_matmul`` / ``approx_bmm`` for a two-operand product node, else None."""
    if node.kwargs or len(node.args) != 2:
        return None
    if node.op == "call_function":
        return _MATMUL_FUNCTIONS.get(node.target)
    if node.op == "call_method":
        return _MATMUL_METHODS.get(node.target)
    return None


def is_rewritable(node: fx.Node) -> bool:
    """True for a softmax, or a product of two activations, that ``rewrite`` replaces."""
    if softmax_dim(node) is not None:
        return True
    return matmul_replacement(node) is not None and all(depends_on_input(a) for a in node.args)


def rewrite(graph: fx.Graph) -> int:
    """Replace softmax and products of activations in ``graph`` in place; return how many."""
    replaced = 0
    for node in list(graph.nodes):
        dim = softmax_dim(node)
        function = matmul_replacement(node)
        if dim is not None:
            args = (node.args[0], dim)
            function = approx_softmax
        elif function is not None and all(depends_on_input(a) for a in node.args):
            args = tuple(node.args)
        else:
            continue
        options = options_node(graph)
        with graph.inserting_after(node):
            new = graph.call_function(function, (*args, options))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        replaced += 1
    return replaced


class ApproxAttention(TracedForwardVariant):
    """A module's own forward with k-bit softmax outputs and matmul operands kept for backward."""

    nothing_found = "calls no functional softmax and no matmul of two activations; nothing to keep in k bits"

    @classmethod
    def make_options(cls, options: dict[str, Any]) -> ApproxOptions:
        return make_options(cls.__name__, options)

    @classmethod
    def rewrite(cls, graph: fx.Graph, module: nn.Module) -> int:
        # matmul(dropout(softmax(s)), v) first: one k-bit y and a 1-bit mask instead of k-bit y and p.
        return fuse_chains(graph, module, options_node(graph)) + rewrite(graph)

    def extra_repr(self) -> str:
        base = super().extra_repr()
        options = self.core_options.describe()
        return f"{base}, {options}" if base else options

"""Attention written with functional ops (``q @ k^T``, ``softmax``, ``probs @ v``), kept in k bits.

Leaf-module swaps cannot reach ops a module calls in its own ``forward``. This
variant re-traces such a module with torch.fx (every submodule stays a call, so
swaps and hooks on children still apply), replaces each functional softmax by
``approx_softmax`` and each product of two activations by ``approx_matmul`` /
``approx_bmm`` (exact forward, k-bit copies kept for backward), and runs the
rewritten code as the module's forward.

The variant is built with ``ApproxAttention.from_module(module, **options)``
(options as ``ApproxOptions``). It is an instance of a subclass of both
``ApproxAttention`` and the module's own class, sharing the module's
Parameters, buffers, submodules and hooks (so state_dict keys, their order and
an optimizer built earlier are unchanged). ``to_module()`` gives back an
instance of the original class with the same registries.

What the trace fixes: plain Python attributes read in forward (e.g. a head
count or scale) become constants of the rewritten code. A forward whose traced
code depends on ``self.training``, takes optional or variadic arguments, or has
no functional softmax / matmul of activations is refused with the reason.
"""

import inspect
import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from aalconvert.errors import ConversionError
from aalconvert.nn.approx_activation import approx_softmax
from aalconvert.nn.approx_common import ApproxOptions, make_options
from aalconvert.nn.approx_matmul import approx_bmm, approx_matmul
from aalconvert.nn.rebuild import rebuild_as

_SOFTMAX_FUNCTIONS = (torch.softmax, F.softmax)
_MATMUL_FUNCTIONS = {torch.matmul: approx_matmul, operator.matmul: approx_matmul, torch.bmm: approx_bmm}
_MATMUL_METHODS = {"matmul": approx_matmul, "__matmul__": approx_matmul, "bmm": approx_bmm}
_OPTIONS_ATTRIBUTE = "approx_options"
_CODE_ATTRIBUTES = ("approx_options", "core_forward", "core_code")


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


def matmul_replacement(node: fx.Node):
    """``approx_matmul`` / ``approx_bmm`` for a two-operand product node, else None."""
    if node.kwargs or len(node.args) != 2:
        return None
    if node.op == "call_function":
        return _MATMUL_FUNCTIONS.get(node.target)
    if node.op == "call_method":
        return _MATMUL_METHODS.get(node.target)
    return None


def depends_on_input(node: Any) -> bool:
    """True when ``node`` is computed from a graph input (an activation, not only parameters)."""
    pending, seen = [node], set()
    while pending:
        current = pending.pop()
        if not isinstance(current, fx.Node) or current in seen:
            continue
        if current.op == "placeholder":
            return True
        seen.add(current)
        pending.extend(current.all_input_nodes)
    return False


class _ChildrenAsCalls(fx.Tracer):
    """Traces only the root's own forward: every submodule stays one ``call_module`` node."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


def _check_signature(module: nn.Module) -> None:
    for parameter in inspect.signature(module.forward).parameters.values():
        if parameter.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            raise ConversionError(
                f"{type(module).__name__}.forward takes *{parameter.name}; a traced copy cannot "
                "follow variadic arguments, so its attention core is left exact"
            )
        if parameter.default is not inspect.Parameter.empty:
            raise ConversionError(
                f"{type(module).__name__}.forward has the optional argument {parameter.name!r}; a "
                "traced copy would fix it to one value, so its attention core is left exact"
            )


def _trace(module: nn.Module, training: bool) -> fx.Graph:
    was_training = module.training
    module.training = training
    try:
        return _ChildrenAsCalls().trace(module)
    except Exception as error:  # fx raises many types; report one clear reason instead
        raise ConversionError(
            f"{type(module).__name__} does not trace with torch.fx "
            f"({type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}); "
            "its attention core is left exact"
        ) from error
    finally:
        module.training = was_training


def count_rewritable(graph: fx.Graph) -> int:
    """How many softmax and activation-product nodes of ``graph`` the variant replaces."""
    return sum(
        1
        for node in graph.nodes
        if softmax_dim(node) is not None
        or (matmul_replacement(node) is not None and all(depends_on_input(a) for a in node.args))
    )


def rewrite(graph: fx.Graph) -> int:
    """Replace softmax and products of activations in ``graph`` in place; return how many."""
    options_node = None
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
        if options_node is None:
            first = next(n for n in graph.nodes if n.op != "placeholder")
            with graph.inserting_before(first):
                options_node = graph.get_attr(_OPTIONS_ATTRIBUTE)
        with graph.inserting_after(node):
            new = graph.call_function(function, (*args, options_node))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        replaced += 1
    graph.lint()
    return replaced


def _compile(graph: fx.Graph) -> tuple[Any, str]:
    """The forward function (taking ``self`` first) and its source for ``graph``."""
    code = graph.python_code(root_module="self")
    namespace = dict(code.globals)
    exec(compile(code.src, "<aalconvert ApproxAttention>", "exec"), namespace)  # noqa: S102
    return namespace["forward"], code.src


class ApproxAttention(nn.Module):
    """Mixin of the variant classes; see the module docstring. ``core_code`` shows the rewritten forward."""

    approx_options: ApproxOptions
    _variant_classes: dict[type, type] = {}

    @classmethod
    def variant_class(cls, torch_class: type[nn.Module]) -> type:
        """The subclass of ``ApproxAttention`` and ``torch_class`` (one per class, reused)."""
        if torch_class not in cls._variant_classes:
            variant = type(f"ApproxCore{torch_class.__name__}", (cls, torch_class), {})
            variant.__module__ = cls.__module__  # aalconvert's tracer keeps aalconvert modules as leaves
            variant.__qualname__ = variant.__name__
            variant.torch_class = torch_class
            cls._variant_classes[torch_class] = variant
        return cls._variant_classes[torch_class]

    @classmethod
    def from_module(cls, module: nn.Module, **options: Any) -> "ApproxAttention":
        """The variant of ``module`` sharing everything it holds; ``options`` as in ``ApproxOptions``."""
        if isinstance(module, ApproxAttention):
            raise ConversionError(f"{type(module).__name__} is already an ApproxAttention variant")
        approx_options = make_options(cls.__name__, options)
        _check_signature(module)
        graph = _trace(module, training=True)
        if graph.python_code("self").src != _trace(module, training=False).python_code("self").src:
            raise ConversionError(
                f"{type(module).__name__}.forward traces differently in train and eval mode "
                "(it reads self.training); its attention core is left exact"
            )
        if rewrite(graph) == 0:
            raise ConversionError(
                f"{type(module).__name__}.forward calls no functional softmax and no matmul of "
                "two activations; nothing to keep in k bits"
            )
        new = rebuild_as(cls.variant_class(type(module)), module)
        new.approx_options = approx_options
        new.core_forward, new.core_code = _compile(graph)
        return new

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.core_forward(self, *args, **kwargs)

    def to_module(self) -> nn.Module:
        """An instance of the original class holding this variant's Parameters, buffers and submodules."""
        return rebuild_as(self.torch_class, self, drop=_CODE_ATTRIBUTES)

    def extra_repr(self) -> str:
        base = super().extra_repr()
        options = self.approx_options.describe()
        return f"{base}, {options}" if base else options

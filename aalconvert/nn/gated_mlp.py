"""Gated MLPs ``down(act(gate) * up)`` (SwiGLU / GeGLU) keeping only ``gate`` and ``up``.

Hugging Face's ``LlamaMLP``, ``MistralMLP``, ``Qwen2MLP``, ``GemmaMLP`` (and
many more) compute ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``. Ordinary
backprop keeps four tensors of the intermediate width (methods.md section 6):
``gate`` (the activation's backward), ``act(gate)`` and ``up`` (the product's
backward) and the product (``down_proj``'s weight gradient). Here the
activation, the product and, when ``down_proj`` is a plain ``nn.Linear``, the
down projection run as one autograd Function that keeps ``gate`` and ``up``
only (exact, or k-bit copies with ``ApproxOptions``) and rebuilds ``act(gate)``
and the product in backward with the same elementwise ops (methods.md section
4, cheap recomputation: no matmul is recomputed).

Exact form: backward calls the very backward ops torch's autograd would (the
activation's own backward through ``torch.func.vjp`` of the activation module's
forward, the product's ``grad * other``, the ``mm`` / ``addmm`` backward of
``F.linear`` on the same operands, as ``RecomputedInputLinearFunction`` does),
so every gradient is bit-identical to BP's, under autocast too (the rebuild runs
in the forward's autocast state). When ``down_proj`` is not a plain Linear (an
ASA layer keeping a 1-bit sign of its input, a k-bit ``ApproxLinear``...) the
product alone is fused and ``down_proj`` is called as usual, hooks included.

Run-time conventions: the original ops run instead (``plain``) without
autograd, under ``torch.func`` transforms, when the activation module has hooks
(the fused form does not call it through ``__call__``; global module hooks count
too), is in place, or the operands' shapes or dtypes differ; ``down_proj`` is
fused only when it has no hooks either. Hooks of ``gate_proj`` / ``up_proj``
are untouched: those modules are called by the forward as written.

``RecomputedGatedMLP`` / ``ApproxGatedMLP`` are traced-forward variants
(``aalconvert.nn.traced_forward``): the module's own forward re-traced, with
each ``act(gate) * up`` (either operand order) whose activation is a leaf
activation child replaced by ``gated_product`` or, when the product's only
reader is a child module called on it, ``gated_down``.
"""

import inspect
import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as torch_module

from aalconvert.memory import others_global_hooks
from aalconvert.nn.approx import ApproxLinear
from aalconvert.nn.approx_common import ApproxOptions, compress, functorch_active, make_options, restore
from aalconvert.nn.function_output import own_output
from aalconvert.nn.recompute import LinearOperands, _folded_stride, linear_backward
from aalconvert.nn.saved import saved_tensors_or_raise
from aalconvert.nn.traced_forward import TracedForwardVariant, depends_on_input, options_node

TORCH_ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.SiLU, nn.GELU, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Tanh, nn.Sigmoid, nn.Mish,
    nn.Hardswish, nn.Hardsigmoid, nn.ELU, nn.CELU, nn.SELU, nn.Softplus, nn.Hardtanh,
)
"""torch activations the fused form may recompute: deterministic and elementwise."""
ZOO_ACTIVATION_MODULES = ("transformers.activations", "timm.layers.activations")
_MUL_FUNCTIONS = (operator.mul, torch.mul)
_MUL_METHODS = ("mul", "__mul__")


# ------------------------------------------------------------------ checks


def activation_problem(module: nn.Module) -> str | None:
    """Why ``module`` is not an activation the fused form can recompute in backward, or None.

    Accepted: torch's elementwise activations (``TORCH_ACTIVATIONS``) and zoo
    activations (classes of ``transformers.activations`` or timm's, or named
    ``...Activation``) with no Parameters, buffers or children and a forward
    taking one tensor. Converted activations (a k-bit ``ApproxSiLU``, a
    ``PointwiseVariant``) are instances of these classes and compute the same
    values when autograd does not record them.
    """
    cls = getattr(type(module), "zoo_class", type(module))  # a PointwiseVariant: its zoo class
    zoo = cls.__module__.startswith(ZOO_ACTIVATION_MODULES) or cls.__name__.endswith("Activation")
    if not (isinstance(module, TORCH_ACTIVATIONS) or zoo):
        return f"{cls.__name__} is not a known elementwise activation"
    if next(module.parameters(), None) is not None or next(module.buffers(), None) is not None:
        return f"{cls.__name__} holds Parameters or buffers"
    if next(module.children(), None) is not None:
        return f"{cls.__name__} has child modules"
    parameters = list(inspect.signature(module.forward).parameters.values())
    if len(parameters) != 1 or parameters[0].kind not in (
        inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD
    ):
        return f"{cls.__name__}.forward takes {[p.name for p in parameters]}; one input tensor is needed"
    if getattr(module, "inplace", False):
        return f"{cls.__name__} is in place (it would overwrite the gate kept for backward)"
    return None


def _global_hooks() -> bool:
    """Whether a global module hook of any kind is active other than aalconvert's observers."""
    return others_global_hooks(
        torch_module._global_forward_hooks,
        torch_module._global_forward_pre_hooks,
        torch_module._global_backward_hooks,
        torch_module._global_backward_pre_hooks,
    )


def _hooked(module: nn.Module) -> bool:
    """Whether calling ``module.forward`` directly would skip a hook its ``__call__`` runs."""
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
        or _global_hooks()
    )


def _fusable_down(down: nn.Module, options: ApproxOptions | None) -> bool:
    """A plain ``nn.Linear`` (or, for k-bit copies, an ``ApproxLinear``) without hooks."""
    kinds = (nn.Linear,) if options is None else (nn.Linear, ApproxLinear)
    return type(down) in kinds and not _hooked(down)


# ------------------------------------------------------------------ the op


def _product(a: torch.Tensor, up: torch.Tensor, act_first: bool) -> torch.Tensor:
    return a * up if act_first else up * a


class _Recipe:
    """What backward needs to rebuild ``act(gate)`` and the product as the forward made them."""

    def __init__(self, act: nn.Module, act_first: bool, gate: torch.Tensor) -> None:
        self.act, self.act_first = act, act_first
        self.device_type = gate.device.type
        self.autocast = torch.is_autocast_enabled(self.device_type)
        self.autocast_dtype = torch.get_autocast_dtype(self.device_type)

    def autocast_state(self):
        return torch.autocast(self.device_type, dtype=self.autocast_dtype, enabled=self.autocast)


class GatedProductFunction(torch.autograd.Function):
    """``act(gate) * up`` (then ``F.linear(., W, b)`` when ``weight`` is given) keeping gate and up.

    ``options``: None keeps ``gate`` and ``up`` exactly (bit-identical
    gradients), an ``ApproxOptions`` keeps k-bit copies. ``act`` is the
    activation module; its ``forward`` is called (never its hooks).
    """

    @staticmethod
    def forward(ctx, act, act_first: bool, options, gate, up, weight, bias):
        recipe = _Recipe(act, act_first, gate)
        product = _product(act.forward(gate), up, act_first)
        ctx.recipe, ctx.linear = recipe, weight is not None
        if options is None:
            kept, ctx.layouts = (gate, up), None
        else:
            (kept_gate, gate_layout), (kept_up, up_layout) = compress(gate, options), compress(up, options)
            kept, ctx.layouts = (*kept_gate, *kept_up), (gate_layout, up_layout)
        if weight is None:
            ctx.save_for_backward(*kept)
            return product
        out = F.linear(product, weight, bias)
        addmm = bias is not None and (product.dim() == 2 or product.is_contiguous())
        # out.dtype differs from the Parameters' under autocast
        ctx.operands = LinearOperands(
            product.shape, product.dtype, _folded_stride(product, addmm), out.dtype, addmm
        )
        ctx.save_for_backward(*kept, weight, bias)
        return own_output(out)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        saved = saved_tensors_or_raise(
            ctx,
            lambda message: (
                "gated MLP: the gate or up projection's output (kept to rebuild act(gate) * up in "
                "backward) or down_proj's weight was modified in place after the forward; do not "
                f"modify it between forward and backward ({message})"
            ),
        )
        if ctx.layouts is None:
            gate, up, rest = saved[0], saved[1], saved[2:]
        else:
            gate_layout, up_layout = ctx.layouts
            gate_end = gate_layout.count
            up_end = gate_end + up_layout.count
            gate = restore(saved[:gate_end], gate_layout)
            up = restore(saved[gate_end:up_end], up_layout)
            rest = saved[up_end:]
        recipe: _Recipe = ctx.recipe
        need_gate, need_up = ctx.needs_input_grad[3:5]
        with recipe.autocast_state():
            if need_gate:
                a, act_vjp = torch.func.vjp(recipe.act.forward, gate)
            else:
                a = recipe.act.forward(gate)
        grad_weight = grad_bias = None
        if ctx.linear:
            weight, bias = rest
            need_weight, need_bias = ctx.needs_input_grad[5:7]
            product = None
            if need_weight:
                with recipe.autocast_state():
                    product = _product(a, up, recipe.act_first)
            grad_product, grad_weight, grad_bias = linear_backward(
                grad_output, weight, bias, lambda: product, ctx.operands, True, need_weight, need_bias
            )
        else:
            grad_product = grad_output
        grad_gate = grad_up = None
        if need_up:  # mul backward: grad * other
            grad_up = grad_product * a
        if need_gate:
            (grad_gate,) = act_vjp(grad_product * up)
        return None, None, None, grad_gate, grad_up, grad_weight, grad_bias




def _plain(gate: torch.Tensor, up: torch.Tensor, act: nn.Module, options: ApproxOptions | None) -> bool:
    """Whether the original ops must run instead of the fused form (module docstring)."""
    return (
        not torch.is_grad_enabled()
        or not (gate.requires_grad or up.requires_grad)
        or functorch_active(gate, up)
        or _hooked(act)
        or activation_problem(act) is not None  # replaced after conversion (a PReLU, a dropout)
        or gate.shape != up.shape
        or gate.dtype != up.dtype
        or not gate.is_floating_point()
        or gate.numel() == 0
    )


def gated_product(
    gate: torch.Tensor,
    up: torch.Tensor,
    act: nn.Module,
    act_first: bool = True,
    options: ApproxOptions | None = None,
) -> torch.Tensor:
    """``act(gate) * up`` (``up * act(gate)`` when not ``act_first``) keeping only gate and up.

    ``act`` is the activation module itself, read at call time; ``options``
    None keeps them exactly (bit-identical gradients), else k-bit copies.
    """
    if _plain(gate, up, act, options):
        return _product(act(gate), up, act_first)
    return GatedProductFunction.apply(act, act_first, options, gate, up, None, None)


def gated_down(
    gate: torch.Tensor,
    up: torch.Tensor,
    act: nn.Module,
    down: nn.Module,
    act_first: bool = True,
    options: ApproxOptions | None = None,
) -> Any:
    """``down(act(gate) * up)`` keeping only gate and up when ``down`` is a plain Linear without hooks.

    Otherwise the product is fused (``gated_product``) and ``down`` is called on
    it as usual (an ASA or k-bit layer then keeps what it keeps of its input).
    """
    if _plain(gate, up, act, options):
        return down(_product(act(gate), up, act_first))
    if not _fusable_down(down, options) or gate.shape[-1] != down.in_features:
        return down(GatedProductFunction.apply(act, act_first, options, gate, up, None, None))
    return GatedProductFunction.apply(act, act_first, options, gate, up, down.weight, down.bias)


# ------------------------------------------------------------------ the graph rewrite


def _is_mul(node: fx.Node) -> bool:
    if node.kwargs or len(node.args) != 2:
        return False
    return (node.op == "call_function" and node.target in _MUL_FUNCTIONS) or (
        node.op == "call_method" and node.target in _MUL_METHODS
    )


def _activation_call(node: Any, module: nn.Module) -> bool:
    """``node`` calls an activation child on one activation tensor, and only the product reads it."""
    if not isinstance(node, fx.Node) or node.op != "call_module" or node.kwargs or len(node.args) != 1:
        return False
    if len(node.users) != 1 or not depends_on_input(node.args[0]):
        return False
    return activation_problem(module.get_submodule(node.target)) is None


def find_products(graph: fx.Graph, module: nn.Module) -> list[tuple[fx.Node, fx.Node, fx.Node, bool, fx.Node | None]]:
    """(product, activation call, up, act_first, down call or None) for each ``act(gate) * up``.

    The activation is a child module accepted by ``activation_problem`` and
    read only by the product; ``up`` is an activation (not a Parameter); the
    down call is the product's only reader when that reader is a child module
    called on the product alone.
    """
    found = []
    for node in graph.nodes:
        if not _is_mul(node):
            continue
        left, right = node.args
        if _activation_call(left, module) and depends_on_input(right):
            act_call, up, act_first = left, right, True
        elif _activation_call(right, module) and depends_on_input(left):
            act_call, up, act_first = right, left, False
        else:
            continue
        down = None
        if len(node.users) == 1:
            (reader,) = node.users
            if reader.op == "call_module" and reader.args == (node,) and not reader.kwargs:
                down = reader
        found.append((node, act_call, up, act_first, down))
    return found


def fuse_products(graph: fx.Graph, module: nn.Module, options: fx.Node | None) -> int:
    """Replace each product of ``find_products`` by ``gated_down`` / ``gated_product``; return how many.

    ``options``: None (exact) or the graph node reading the variant's ApproxOptions.
    """
    products = find_products(graph, module)
    for product, act_call, up, act_first, down in products:
        gate = act_call.args[0]
        anchor = down if down is not None else product
        with graph.inserting_before(anchor):
            act = graph.get_attr(act_call.target)
            if down is not None:
                down_module = graph.get_attr(down.target)
                fused = graph.call_function(gated_down, (gate, up, act, down_module, act_first, options))
            else:
                fused = graph.call_function(gated_product, (gate, up, act, act_first, options))
        fused.meta = dict(anchor.meta)
        anchor.replace_all_uses_with(fused)
        for node in (down, product, act_call):
            if node is not None:
                graph.erase_node(node)
    return len(products)


NOTHING_FOUND = (
    "has no act(gate) * up whose activation is an elementwise activation child read only by "
    "the product; nothing to rebuild"
)


class RecomputedGatedMLP(TracedForwardVariant):
    """A module's own forward whose ``down(act(gate) * up)`` keeps only gate and up (exact)."""

    nothing_found = NOTHING_FOUND

    @classmethod
    def rewrite(cls, graph: fx.Graph, module: nn.Module) -> int:
        return fuse_products(graph, module, None)


class ApproxGatedMLP(TracedForwardVariant):
    """A module's own forward whose ``down(act(gate) * up)`` keeps k-bit copies of gate and up only."""

    nothing_found = NOTHING_FOUND

    @classmethod
    def make_options(cls, options: dict[str, Any]) -> ApproxOptions:
        return make_options(cls.__name__, options)

    @classmethod
    def rewrite(cls, graph: fx.Graph, module: nn.Module) -> int:
        if not find_products(graph, module):
            return 0
        return fuse_products(graph, module, options_node(graph))

    def extra_repr(self) -> str:
        base = super().extra_repr()
        options = self.core_options.describe()
        return f"{base}, {options}" if base else options

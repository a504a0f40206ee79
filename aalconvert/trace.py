"""torch.fx tracing of a user's model: the whole model first, then the largest traceable parts.

The converter never runs these graphs; it reads facts from them (which module
consumes which tensor, shapes, how often a module is called) and then swaps
modules in the user's own module tree. So every ``call_module`` node carries
the module's qualified name relative to the *model root* in
``node.meta["aalconvert"]`` (a :class:`NodeFacts`), and every module that could
not be traced is listed with the reason.

Shapes come from one run of the model on fake tensors
(``torch._subclasses.FakeTensorMode``: no memory, no compute); if the fake run
fails the model runs once for real under ``torch.no_grad``. Either run happens
in eval mode (training flags restored afterwards) so batch-norm statistics and
counters are not touched.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch._subclasses import FakeTensorMode

from aalconvert.errors import ConversionError

META_KEY = "aalconvert"

_CONTAINERS = (nn.ModuleList, nn.ModuleDict)  # no forward of their own


@dataclass(frozen=True)
class Region:
    """A traced part of the model: ``name`` is its qualified module name ("" = the model root)."""

    name: str
    graph_module: fx.GraphModule


@dataclass(frozen=True)
class Untraced:
    """A module that has no graph: why, in one line (exception type and first message line)."""

    name: str
    type_name: str
    reason: str


@dataclass
class TraceResult:
    """Regions that traced, modules that did not, and regions whose shapes could not be found."""

    regions: list[Region]
    untraced: list[Untraced]
    shape_errors: dict[str, str] = field(default_factory=dict)  # region name -> one-line reason


@dataclass(frozen=True)
class NodeFacts:
    """What the tracer knows about one node; stored in ``node.meta["aalconvert"]`` on every node.

    ``qualified_name``, ``module_type`` and ``calls_in_region`` describe the module of a
    ``call_module`` node (None / 0 elsewhere); ``calls_in_region`` counts the
    ``call_module`` nodes of that module in the region (a module called from
    several places cannot be swapped for one use only). ``shape`` (elements per
    dimension) and ``dtype`` are the node's tensor output, None when unknown
    (no example inputs) or when the output is not a single tensor.
    """

    qualified_name: str | None
    module_type: type | None
    calls_in_region: int
    shape: tuple[int, ...] | None
    dtype: torch.dtype | None


def is_linear_like(module: nn.Module) -> bool:
    """True for modules that compute ``W x + b``: Linear, convolutions, and zoo linears.

    Hugging Face's GPT-2 ``Conv1D`` (a linear layer with a transposed weight) is
    recognised by class name and module path, without importing transformers.
    """
    if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
        return True
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")


class _LeafTracer(fx.Tracer):
    """fx tracer that keeps torch.nn modules, aalconvert's modules, zoo linears and user types as leaves."""

    def __init__(self, leaf_types: tuple[type, ...]):
        super().__init__()
        self.leaf_types = leaf_types

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return _is_leaf(m, self.leaf_types) or super().is_leaf_module(m, module_qualified_name)


def _is_leaf(module: nn.Module, leaf_types: tuple[type, ...]) -> bool:
    """The leaf policy beyond fx's default (torch.nn modules except Sequential)."""
    if leaf_types and isinstance(module, leaf_types):
        return True
    if type(module).__module__.startswith("aalconvert"):
        return True
    return is_linear_like(module)


def _is_default_leaf(module: nn.Module, leaf_types: tuple[type, ...]) -> bool:
    return _LeafTracer(leaf_types).is_leaf_module(module, "")


def trace_model(
    model: nn.Module,
    example_inputs: tuple | None = None,
    leaf_types: tuple[type, ...] = (),
) -> TraceResult:
    """Trace ``model`` with torch.fx, descending into children wherever a module fails to trace.

    ``example_inputs``: positional arguments of ``model``; when given, optional
    arguments of each traced part are specialised to the values the model really
    passes, and output shapes are recorded. Tracing errors never escape: they
    become :class:`Untraced` entries. Raises ConversionError only when the model
    itself cannot run on ``example_inputs``.
    """
    calls = _capture_calls(model, example_inputs) if example_inputs is not None else None
    regions: list[Region] = []
    untraced: list[Untraced] = []
    _trace_or_descend(model, "", leaf_types, calls, regions, untraced)
    shape_errors: dict[str, str] = {}
    for region in regions:
        _annotate_modules(region)
        if calls is None:
            continue
        if region.name not in calls.inputs:
            shape_errors[region.name] = "not called when the model ran on example_inputs"
            continue
        error = _propagate_shapes(region, model, calls)
        if error is not None:
            shape_errors[region.name] = error
    return TraceResult(regions=regions, untraced=untraced, shape_errors=shape_errors)


def _one_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def _trace_or_descend(
    module: nn.Module,
    name: str,
    leaf_types: tuple[type, ...],
    calls: _CapturedCalls | None,
    regions: list[Region],
    untraced: list[Untraced],
) -> None:
    """Trace ``module``; on failure record why and try each child in turn."""
    try:
        concrete_args = _concrete_args(module, calls.inputs.get(name) if calls else None)
        graph = _LeafTracer(leaf_types).trace(module, concrete_args=concrete_args)
        graph_module = fx.GraphModule(module, graph, class_name=type(module).__name__)
    except Exception as error:  # fx raises many types; none may escape (reported instead)
        untraced.append(Untraced(name, type(module).__name__, _one_line(error)))
    else:
        regions.append(Region(name, graph_module))
        return
    _descend(module, name, leaf_types, calls, regions, untraced)


def _descend(
    module: nn.Module,
    name: str,
    leaf_types: tuple[type, ...],
    calls: _CapturedCalls | None,
    regions: list[Region],
    untraced: list[Untraced],
) -> None:
    """Handle each child of a module that has no graph: descend, or list it as an untraced leaf."""
    for child_name, child in module.named_children():
        qualified = f"{name}.{child_name}" if name else child_name
        if isinstance(child, _CONTAINERS):
            reason = f"container without forward ({type(child).__name__}); its children are traced one by one"
            untraced.append(Untraced(qualified, type(child).__name__, reason))
            _descend(child, qualified, leaf_types, calls, regions, untraced)
        elif _is_default_leaf(child, leaf_types):
            parent = name or "<root>"
            reason = f"leaf module inside untraced module {parent!r}"
            untraced.append(Untraced(qualified, type(child).__name__, reason))
        else:
            _trace_or_descend(child, qualified, leaf_types, calls, regions, untraced)


def _traced_parameters(module: nn.Module) -> list[inspect.Parameter]:
    """The parameters of ``module.forward`` that fx turns into placeholders, in order."""
    try:
        signature = inspect.signature(module.forward)
    except (TypeError, ValueError):
        return []
    return [
        p for p in signature.parameters.values()
        if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    ]


def _concrete_args(module: nn.Module, call: tuple[tuple, dict] | None) -> dict[str, Any] | None:
    """Optional arguments fixed to constants so that ``if mask is not None`` traces.

    With a captured call: every argument passed as a non-tensor and every
    optional argument left out is fixed to its value. Without one: the first
    argument stays symbolic and every later optional argument is fixed to its
    default (Hugging Face style ``attention_mask=None, output_attentions=False``).
    """
    parameters = _traced_parameters(module)
    concrete: dict[str, Any] = {}
    if call is None:
        for index, p in enumerate(parameters):
            if index > 0 and p.default is not inspect.Parameter.empty:
                concrete[p.name] = p.default
        return concrete or None
    bound = _bind(module, call)
    if bound is None:
        return None
    for p in parameters:
        if p.name in bound:
            value = bound[p.name]
            if value is None or isinstance(value, (bool, int, float, str)):
                concrete[p.name] = value
        elif p.default is not inspect.Parameter.empty:
            concrete[p.name] = p.default
    return concrete or None


def _bind(module: nn.Module, call: tuple[tuple, dict]) -> dict[str, Any] | None:
    """Map a captured ``(args, kwargs)`` to forward's parameter names (None if it does not fit)."""
    args, kwargs = call
    try:
        return dict(inspect.signature(module.forward).bind(*args, **kwargs).arguments)
    except (TypeError, ValueError):
        return None


def _annotate_modules(region: Region) -> None:
    """Write NodeFacts (name, class, call count; no shape yet) on every node of the region."""
    graph_module = region.graph_module
    counts: dict[str, int] = {}
    for node in graph_module.graph.nodes:
        if node.op == "call_module":
            counts[node.target] = counts.get(node.target, 0) + 1
    for node in graph_module.graph.nodes:
        if node.op == "call_module":
            qualified = f"{region.name}.{node.target}" if region.name else str(node.target)
            module_type = type(graph_module.get_submodule(node.target))
            node.meta[META_KEY] = NodeFacts(qualified, module_type, counts[node.target], None, None)
        else:
            node.meta[META_KEY] = NodeFacts(None, None, 0, None, None)


@dataclass
class _CapturedCalls:
    """First call ``(args, kwargs)`` of every module by qualified name, and the fake mode used (None = real)."""

    inputs: dict[str, tuple[tuple, dict]]
    fake_mode: FakeTensorMode | None


class _EvalMode:
    """Context that puts a model in eval mode and restores every module's training flag."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.flags: list[tuple[nn.Module, bool]] = []

    def __enter__(self) -> None:
        self.flags = [(m, m.training) for m in self.model.modules()]
        self.model.eval()

    def __exit__(self, *exc: object) -> None:
        for module, training in self.flags:
            module.training = training


def _capture_calls(model: nn.Module, example_inputs: tuple) -> _CapturedCalls:
    """Run the model once (fake tensors first, real on failure) recording each module's first call."""
    if not isinstance(example_inputs, tuple):
        raise ConversionError(
            f"example_inputs must be a tuple of the model's positional arguments, got "
            f"{type(example_inputs).__name__}; wrap a single tensor as (tensor,)"
        )
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    try:
        fake_inputs = tuple(
            fake_mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in example_inputs
        )
        return _CapturedCalls(_run_with_hooks(model, fake_inputs, fake_mode), fake_mode)
    except Exception:  # unsupported op on fake tensors: fall back to one real run
        pass
    try:
        return _CapturedCalls(_run_with_hooks(model, example_inputs, None), None)
    except Exception as error:
        raise ConversionError(
            f"the model failed to run on example_inputs ({_one_line(error)}); "
            f"pass the positional arguments model(*example_inputs) accepts"
        ) from error


def _run_with_hooks(
    model: nn.Module, inputs: tuple, fake_mode: FakeTensorMode | None
) -> dict[str, tuple[tuple, dict]]:
    inputs_by_name: dict[str, tuple[tuple, dict]] = {}
    handles = []

    def recorder(name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            inputs_by_name.setdefault(name, (args, kwargs))
        return hook

    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(recorder(name), with_kwargs=True))
    try:
        with _EvalMode(model), torch.no_grad():
            if fake_mode is None:
                model(*inputs)
            else:
                with fake_mode:
                    model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    return inputs_by_name


class _ShapeRecorder(fx.Interpreter):
    """Interpreter that remembers the shape and dtype of every single-tensor node output."""

    def __init__(self, graph_module: fx.GraphModule):
        super().__init__(graph_module)
        self.outputs: dict[fx.Node, tuple[tuple[int, ...], torch.dtype]] = {}

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if isinstance(result, torch.Tensor):
            self.outputs[n] = (tuple(int(s) for s in result.shape), result.dtype)
        return result


def _propagate_shapes(region: Region, model: nn.Module, calls: _CapturedCalls) -> str | None:
    """Record output shapes in the region's NodeFacts; return a one-line reason on failure."""
    graph_module = region.graph_module
    module = model.get_submodule(region.name) if region.name else model
    bound = _bind(module, calls.inputs[region.name])
    if bound is None:
        return "the captured call does not match the module's forward signature"
    placeholders = [n for n in graph_module.graph.nodes if n.op == "placeholder"]
    parameters = _traced_parameters(module)
    if len(placeholders) != len(parameters):
        return f"{len(placeholders)} graph inputs for {len(parameters)} forward parameters"
    values = [bound.get(p.name, p.default) for p in parameters]
    recorder = _ShapeRecorder(graph_module)
    try:
        with _EvalMode(model), torch.no_grad():
            if calls.fake_mode is None:
                recorder.run(*values)
            else:
                with calls.fake_mode:
                    recorder.run(*values)
    except Exception as error:
        return _one_line(error)
    for node, (shape, dtype) in recorder.outputs.items():
        facts = node.meta[META_KEY]
        node.meta[META_KEY] = NodeFacts(
            facts.qualified_name, facts.module_type, facts.calls_in_region, shape, dtype
        )
    return None

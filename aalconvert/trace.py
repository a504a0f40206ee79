"""torch.fx tracing of a user's model: the whole model first, then the largest traceable parts.

The converter never runs these graphs; it reads facts from them (which module
consumes which tensor, shapes, how often a module is called) and then swaps
modules in the user's own module tree. So every ``call_module`` node carries
the module's qualified name relative to the *model root* in
``node.meta["aalconvert"]`` (a :class:`NodeFacts`), and every module that could
not be traced is listed with the reason.

A module that plain fx cannot trace (Hugging Face layers unpack ``x.shape``,
take ``**kwargs``, branch on tensor metadata) is traced a second time, when
example inputs are given, on the arguments it really received: every proxy
then carries its example value (a fake tensor), so shapes, ``len``, iteration
and ``if`` resolve to the concrete answers of that call. Such a graph is
specialised to the example inputs, which is all the facts need.

Shapes come from one run of the model on fake tensors
(``torch._subclasses.FakeTensorMode``: no memory, no compute); if the fake run
fails the model runs once for real under ``torch.no_grad``. Either run happens
in eval mode (training flags restored afterwards) so batch-norm statistics and
counters are not touched.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import re
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch._subclasses import FakeTensorMode
from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

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
    stateful_arguments: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """Module name -> the arguments of its call (example run) that are objects, not tensors or plain
    values, as "name (Type)": state such as a Hugging Face cache, which a second run updates again."""


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


_IN_PLACE_DUNDERS = frozenset({
    "__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__", "__imod__",
    "__ipow__", "__iand__", "__ior__", "__ixor__", "__ilshift__", "__irshift__", "__imatmul__",
})


def writes_in_place(name: str) -> bool:
    """Whether the torch function or Tensor method named ``name`` writes into its first argument
    (``mul_``, ``relu_``, ``__iadd__``, ``__setitem__``)."""
    return (name.endswith("_") and not name.startswith("_")) or name in _IN_PLACE_DUNDERS


def is_norm_like(module: nn.Module) -> bool:
    """True for torch norms and for zoo norms: a class named ``...Norm`` with no child modules.

    Zoo norms (``LlamaRMSNorm``, ``T5LayerNorm``) are kept whole as graph leaves,
    so a pre-norm block shows its norm as one module call.
    """
    norms = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.LocalResponseNorm)
    if isinstance(module, norms):
        return True
    return type(module).__name__.endswith("Norm") and next(module.children(), None) is None


class _LeafTracer(fx.Tracer):
    """fx tracer that keeps torch.nn modules, aalconvert's modules, zoo linears/norms and user types as leaves."""

    def __init__(self, leaf_types: tuple[type, ...]):
        super().__init__()
        self.leaf_types = leaf_types

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return _is_leaf(m, self.leaf_types) or super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> Any:
        """A module called but not installed under the root (Hugging Face's module-level ``gelu``
        in ``RobertaLMHead``) has no name a graph node could call: its ops are traced as the caller's own."""
        try:
            self.path_of_module(m)
        except NameError:
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)


def _is_leaf(module: nn.Module, leaf_types: tuple[type, ...]) -> bool:
    """The leaf policy beyond fx's default (torch.nn modules except Sequential)."""
    if leaf_types and isinstance(module, leaf_types):
        return True
    if type(module).__module__.startswith("aalconvert"):
        return True
    return is_linear_like(module) or is_norm_like(module)


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
    passes, output shapes are recorded, and a module plain fx cannot trace is
    traced again on the values it received (see the module docstring). Tracing
    errors never escape: they become :class:`Untraced` entries. Raises
    ConversionError only when the model itself cannot run on ``example_inputs``.
    The model is left as it was (attributes a trace sets on it are removed).
    """
    calls = _capture_calls(model, example_inputs) if example_inputs is not None else None
    walk = _Walk(leaf_types, calls)
    with warnings.catch_warnings():  # a user's backward hook cannot wrap a proxy: torch warns, naming ours
        warnings.filterwarnings("ignore", message="For backward hooks to be called")
        _trace_or_descend(model, "", walk)
    shape_errors: dict[str, str] = {}
    for region in walk.regions:
        _annotate_modules(region)
        if region.name in walk.known_shapes:
            _record_shapes(region, walk.known_shapes[region.name])
            continue
        if calls is None:
            continue
        if region.name not in calls.inputs:
            shape_errors[region.name] = "not called when the model ran on example_inputs"
            continue
        error = _propagate_shapes(region, model, calls)
        if error is not None:
            shape_errors[region.name] = error
    stateful = {} if calls is None else {name: found for name, call in calls.inputs.items()
                                          if (found := _stateful_arguments(model.get_submodule(name), call))}
    return TraceResult(regions=walk.regions, untraced=walk.untraced, shape_errors=shape_errors,
                       stateful_arguments=stateful)


def _stateful_arguments(module: nn.Module, call: tuple[tuple, dict]) -> tuple[str, ...]:
    """The arguments of ``call`` holding an object other than tensors and plain values, as "name (Type)"."""
    bound = _bind(module, call) or {
        **{f"argument {i}": value for i, value in enumerate(call[0])}, **call[1]}
    return tuple(f"{name} ({type(found).__name__})" for name, value in bound.items()
                 if (found := _first_object(value)) is not None)


def _first_object(value: Any) -> Any:
    """The first value inside ``value`` (tuples, lists, dicts opened) that is not a tensor or plain value."""
    if isinstance(value, (tuple, list)):
        return next((found for v in value if (found := _first_object(v)) is not None), None)
    if isinstance(value, dict):
        return _first_object(list(value.values()))
    plain = (torch.Tensor, type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device,
             torch.memory_format, torch.layout, slice, type(Ellipsis))
    return None if isinstance(value, plain) else value


def _one_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")


@dataclass
class _Walk:
    """State of one walk over the module tree: settings in, regions and reasons out."""

    leaf_types: tuple[type, ...]
    calls: _CapturedCalls | None
    regions: list[Region] = field(default_factory=list)
    untraced: list[Untraced] = field(default_factory=list)
    known_shapes: dict[str, dict[fx.Node, tuple[tuple[int, ...], torch.dtype]]] = field(default_factory=dict)


def _trace_or_descend(module: nn.Module, name: str, walk: _Walk) -> None:
    """Trace ``module`` (plainly, else on its example values); on failure record why and try each child."""
    call = walk.calls.inputs.get(name) if walk.calls else None
    try:
        with _ModuleStateGuard(module):
            graph = _LeafTracer(walk.leaf_types).trace(module, concrete_args=_concrete_args(module, call))
            graph_module = fx.GraphModule(module, graph, class_name=type(module).__name__)
    except Exception as error:  # fx raises many types; none may escape (reported instead)
        reason = _one_line(error)
    else:
        walk.regions.append(Region(name, graph_module))
        return
    if call is not None:
        try:
            graph_module, shapes = _trace_on_values(module, call, walk)
        except Exception as error:  # as above: reported, never raised
            reason = f"{reason}; traced on its example inputs: {_one_line(error)}"
        else:
            walk.regions.append(Region(name, graph_module))
            walk.known_shapes[name] = shapes
            return
    walk.untraced.append(Untraced(name, type(module).__name__, reason))
    _descend(module, name, walk)


def _descend(module: nn.Module, name: str, walk: _Walk) -> None:
    """Handle each child of a module that has no graph: descend, or list it as an untraced leaf."""
    for child_name, child in module.named_children():
        qualified = f"{name}.{child_name}" if name else child_name
        if isinstance(child, _CONTAINERS):
            reason = f"container without forward ({type(child).__name__}); its children are traced one by one"
            walk.untraced.append(Untraced(qualified, type(child).__name__, reason))
            _descend(child, qualified, walk)
        elif _is_default_leaf(child, walk.leaf_types):
            parent = name or "<root>"
            reason = f"leaf module inside untraced module {parent!r}"
            walk.untraced.append(Untraced(qualified, type(child).__name__, reason))
        else:
            _trace_or_descend(child, qualified, walk)


class _ModuleStateGuard:
    """Restores every module's attributes after a trace or the example run.

    fx stores tensor constants on the traced module (``_tensor_constant0``) and
    forward code may cache values (proxies or fake tensors) on ``self``, also inside
    containers it already had (timm's ``attention_bias_cache = {}`` fills on an
    eval-mode forward); none of them may stay on the user's model, so the contents
    of dict, list and set attributes are restored too.
    """

    _TABLES = ("_parameters", "_buffers", "_modules")

    def __init__(self, module: nn.Module):
        self.module = module
        self.saved: list[tuple[nn.Module, dict[str, Any], dict[str, dict[str, Any]]]] = []
        self.contents: list[tuple[Any, Any]] = []

    def __enter__(self) -> None:
        self.saved = [
            (m, dict(vars(m)), {table: dict(getattr(m, table)) for table in self._TABLES})
            for m in self.module.modules()
        ]
        self.contents = [
            (value, copy.copy(value))
            for _, attributes, _ in self.saved
            for key, value in attributes.items()
            if key not in self._TABLES and type(value) in (dict, list, set)
        ]

    def __exit__(self, *exc: object) -> None:
        for module, attributes, tables in self.saved:
            current = vars(module)
            for key in [key for key in current if key not in attributes]:
                del current[key]
            current.update(attributes)
            for table, entries in tables.items():
                live = current[table]
                live.clear()
                live.update(entries)
        for container, before in self.contents:
            if isinstance(container, list):
                container[:] = before
            else:
                container.clear()
                container.update(before)


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


# ------------------------------------------------------------ tracing on example values

_UNKNOWN = object()  # a value the example run could not give
# Tensor attributes and methods answered from the example value instead of recorded.
_TENSOR_METADATA = frozenset({
    "shape", "dtype", "device", "ndim", "layout", "is_cuda", "is_sparse", "is_quantized", "is_meta",
    "size", "dim", "numel", "nelement", "element_size", "stride", "is_contiguous", "is_floating_point",
    "is_complex", "get_device",
})


class _UnknownValue(Exception):
    """An argument of an operation has no example value."""


class _ValueProxy(fx.Proxy):
    """Proxy that answers metadata, ``len`` and ``int()`` from the example value it stands for."""

    def __getattr__(self, k: str) -> Any:
        if k in _TENSOR_METADATA:
            value = self.tracer.values.get(self.node, _UNKNOWN)
            if isinstance(value, torch.Tensor):
                return getattr(value, k)
        return super().__getattr__(k)

    def __len__(self) -> int:
        value = self.tracer.values.get(self.node, _UNKNOWN)
        if value is _UNKNOWN or not hasattr(value, "__len__"):
            return super().__len__()
        return len(value)

    def __index__(self) -> int:
        value = self.tracer.values.get(self.node, _UNKNOWN)
        if value is _UNKNOWN:
            raise fx.proxy.TraceError(f"{self.node.format_node()} has no example value to use as an index")
        return value.__index__()


def _is_plain_constant(value: Any) -> bool:
    """Python values the traced code may branch on: they replace their proxy."""
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype, torch.device, torch.Size)):
        return True
    return isinstance(value, (tuple, list)) and all(_is_plain_constant(v) for v in value)


def _substitute(obj: Any, replace: Callable[[fx.Proxy], Any]) -> Any:
    """``obj`` with every proxy inside tuples, lists, dicts and slices replaced."""
    if isinstance(obj, fx.Proxy):
        return replace(obj)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(_substitute(v, replace) for v in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(_substitute(v, replace) for v in obj)
    if isinstance(obj, dict):
        return {k: _substitute(v, replace) for k, v in obj.items()}
    if isinstance(obj, slice):
        return slice(*(_substitute(v, replace) for v in (obj.start, obj.stop, obj.step)))
    return obj


class _ValueTracer(_LeafTracer):
    """Leaf tracer whose proxies carry the values of one captured call (fake tensors, or real ones).

    Each recorded operation also runs on the example values (no grad, fake mode
    when the capture used one); metadata, ``len``, iteration and ``bool`` are
    answered from those values; a result that is a plain Python value (None, an
    int, a shape) is handed back as that value, so ``*x.shape`` and
    ``if mask is not None`` behave as in the example run.
    """

    def __init__(self, leaf_types: tuple[type, ...], call: tuple[tuple, dict], fake_mode: FakeTensorMode | None):
        super().__init__(leaf_types)
        self.call = call
        self.fake_mode = fake_mode
        self.values: dict[fx.Node, Any] = {}
        self.replaced: list[fx.Node] = []  # nodes whose plain value was handed back instead
        self._evaluating = False
        self._leaf_forward: Callable[..., Any] | None = None

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _ValueProxy(node, self)

    def create_args_for_root(self, root_fn: Callable[..., Any], is_module: bool,
                             concrete_args: Any = None) -> tuple[Callable[..., Any], list[Any]]:
        """Placeholders for the tensors of the captured call; every other argument as captured."""
        args, kwargs = self.call
        positional = [
            p.name for p in _traced_parameters(self.root)
            if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        ]
        used: set[str] = set()
        traced_args = [
            self._placeholders_for(positional[i] if i < len(positional) else f"arg{i}", value, used)
            for i, value in enumerate(args)
        ]
        traced_kwargs = {key: self._placeholders_for(key, value, used) for key, value in kwargs.items()}
        root = self.root

        def forward_on_example_inputs() -> Any:
            return root_fn(root, *traced_args, **traced_kwargs)

        return forward_on_example_inputs, []

    def _placeholders_for(self, name: str, value: Any, used: set[str]) -> Any:
        """``value`` with a placeholder for each tensor in it (tuples, lists, dicts opened)."""
        if isinstance(value, torch.Tensor):
            target = re.sub(r"\W", "_", name)
            while target in used:
                target += "_"
            used.add(target)
            proxy = self.create_proxy("placeholder", target, (), {})
            with self._value_mode():  # a private copy: in-place ops must not reach the captured tensor
                self.values[proxy.node] = value.detach().clone()
            return proxy
        if isinstance(value, tuple) and hasattr(value, "_fields"):
            return type(value)(*(self._placeholders_for(f"{name}_{i}", v, used) for i, v in enumerate(value)))
        if isinstance(value, (tuple, list)):
            return type(value)(self._placeholders_for(f"{name}_{i}", v, used) for i, v in enumerate(value))
        if isinstance(value, dict):
            return {k: self._placeholders_for(f"{name}_{i}", v, used) for i, (k, v) in enumerate(value.items())}
        return value

    def create_proxy(self, kind: str, target: fx.node.Target, args: tuple[Any, ...], kwargs: dict[str, Any],
                     name: str | None = None, type_expr: Any | None = None,
                     proxy_factory_fn: Callable[[fx.Node], fx.Proxy] | None = None) -> Any:
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        if kind == "placeholder":
            return proxy
        value = self._evaluate(kind, target, args, kwargs)
        self.values[proxy.node] = value
        if value is not _UNKNOWN and target is not getattr and _is_plain_constant(value):
            self.replaced.append(proxy.node)
            return value
        return proxy

    def create_arg(self, a: Any) -> Any:
        """Objects a graph cannot hold (a Hugging Face cache in the output) become their class name:
        the graph is read, never run, and values come from the real objects."""
        try:
            return super().create_arg(a)
        except NotImplementedError:
            return f"<{type(a).__name__}>"

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> Any:
        if self._evaluating:  # a leaf running on example values calls its children plainly
            return forward(*args, **kwargs)
        self._leaf_forward = forward
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        if self._evaluating:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def to_bool(self, obj: fx.Proxy) -> bool:
        value = self.values.get(obj.node, _UNKNOWN)
        if value is _UNKNOWN:
            return super().to_bool(obj)
        with self._value_mode():
            return bool(value)

    def iter(self, obj: fx.Proxy) -> Iterator:
        value = self.values.get(obj.node, _UNKNOWN)
        if isinstance(value, dict):
            return iter(list(value))
        if value is _UNKNOWN or not hasattr(value, "__len__"):
            return super().iter(obj)
        return iter([obj[i] for i in range(len(value))])

    def keys(self, obj: fx.Proxy) -> Any:
        value = self.values.get(obj.node, _UNKNOWN)
        return list(value) if isinstance(value, dict) else super().keys(obj)

    def _value_of(self, proxy: fx.Proxy) -> Any:
        value = self.values.get(proxy.node, _UNKNOWN)
        if value is _UNKNOWN:
            raise _UnknownValue(proxy.node.name)
        return value

    @contextlib.contextmanager
    def _value_mode(self) -> Iterator[None]:
        with torch.no_grad(), (self.fake_mode if self.fake_mode is not None else contextlib.nullcontext()):
            yield

    def _evaluate(self, kind: str, target: fx.node.Target, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The operation's result on the example values; _UNKNOWN when an input has none or it fails."""
        try:
            args, kwargs = _substitute((args, kwargs), self._value_of)
        except _UnknownValue:
            return _UNKNOWN
        self._evaluating = True
        try:
            with self._value_mode():
                if kind == "call_function":
                    return target(*args, **kwargs)
                if kind == "call_method":
                    return getattr(args[0], target)(*args[1:], **kwargs)
                if kind == "call_module" and self._leaf_forward is not None:
                    return self._leaf_forward(*args, **kwargs)
                if kind == "get_attr":
                    return _attribute(self.root, target)
        except Exception:  # an op the example values cannot run: the node just has no value
            return _UNKNOWN
        finally:
            self._evaluating = False
        return _UNKNOWN


def _attribute(root: nn.Module, target: str) -> Any:
    value: Any = root
    for atom in target.split("."):
        value = getattr(value, atom)
    return value


def _trace_on_values(
    module: nn.Module, call: tuple[tuple, dict], walk: _Walk
) -> tuple[fx.GraphModule, dict[fx.Node, tuple[tuple[int, ...], torch.dtype]]]:
    """Trace ``module`` on the arguments it received; the graph and the shape/dtype of its tensor nodes.

    Random number state is restored afterwards (real example values may run dropout).
    """
    tracer = _ValueTracer(walk.leaf_types, call, walk.calls.fake_mode)
    with _ModuleStateGuard(module), torch.random.fork_rng(devices=[]):
        graph = tracer.trace(module)
        for node in reversed(tracer.replaced):
            if not node.users:
                graph.erase_node(node)
        graph_module = fx.GraphModule(module, graph, class_name=type(module).__name__)
    shapes = {
        node: (tuple(int(size) for size in value.shape), value.dtype)
        for node, value in tracer.values.items()
        if isinstance(value, torch.Tensor)
    }
    return graph_module, shapes


def _record_shapes(region: Region, shapes: dict[fx.Node, tuple[tuple[int, ...], torch.dtype]]) -> None:
    for node, (shape, dtype) in shapes.items():
        facts = node.meta[META_KEY]
        node.meta[META_KEY] = NodeFacts(facts.qualified_name, facts.module_type, facts.calls_in_region, shape, dtype)


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
    # A copy, so that in-place operations of the model leave the caller's tensors alone.
    copies = tuple(x.detach().clone() if isinstance(x, torch.Tensor) else x for x in example_inputs)
    try:
        return _CapturedCalls(_run_with_hooks(model, copies, None), None)
    except Exception as error:
        if isinstance(error, VALUE_READS):
            raise ConversionError(_reads_values_message(model, error)) from error
        raise ConversionError(
            f"the model failed to run on example_inputs ({_one_line(error)}); "
            f"pass the positional arguments model(*example_inputs) accepts"
        ) from error


# What fake tensors raise where code asks for a value they do not have (.item(), `if tensor:`, nonzero).
VALUE_READS = (DataDependentOutputException, DynamicOutputShapeException, GuardOnDataDependentSymNode)


def _reads_values_message(model: nn.Module, error: Exception) -> str:
    """Why an estimate on fake tensors failed when the model (or a user's hook) reads a tensor's value."""
    hooked = [name or "(root)" for name, module in model.named_modules()
              if module._forward_hooks or module._forward_pre_hooks]
    hooks = (f"; modules with forward hooks, which run in the estimate too: {', '.join(hooked[:5])}"
             f"{', ...' if len(hooked) > 5 else ''}" if hooked else "")
    return (f"the model's forward, or a hook on it, reads a tensor's value ({_one_line(error)}: .item(), "
            f"`if tensor:`, nonzero, ...), which the estimate cannot: it runs on fake tensors, shapes without "
            f"values{hooks}. Register such hooks after inspect/plan/convert(budget=...), or measure on real "
            "tensors with aalconvert.memory.measure_saved")


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
        with _ModuleStateGuard(model), _EvalMode(model), torch.no_grad():
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
    _record_shapes(region, recorder.outputs)
    return None

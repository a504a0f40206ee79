"""Variants whose forward is the module's own forward, traced with torch.fx and rewritten.

Leaf-module swaps cannot reach functional ops a module calls in its own
``forward`` (``softmax``, ``q @ k^T``, ...). A ``TracedForwardVariant``
re-traces such a module with every submodule kept as one call (so swaps and
hooks on children still apply, whenever they are made), lets the subclass
rewrite the graph, and runs the rewritten code as the module's forward.

The variant of a module is an instance of a subclass of both the variant
mixin and the module's own class (so isinstance checks hold), sharing the
module's Parameters, buffers, submodules and hooks: state_dict keys, their
order and an optimizer built earlier are unchanged. ``to_module()`` gives
back an instance of the original class with the same registries.

What the trace fixes: plain Python attributes read in forward (a head count,
a scale) become constants of the rewritten code. The trace records which ones
it read (on the module and its submodules) with their values; the variant's
forward checks them on every call and raises ``ConversionError`` if one has
changed since conversion (convert again, or set it before converting), rather
than silently computing with the old value. A forward whose traced code
depends on ``self.training``, that takes optional or variadic arguments, or
in which the subclass finds nothing to rewrite is refused with the reason.
"""

import copy
import inspect
from typing import Any, ClassVar

import torch

import torch.fx as fx
from torch import nn

from aalconvert.errors import ConversionError
from aalconvert.nn.rebuild import mixed_class, rebuild_as

OPTIONS_ATTRIBUTE = "core_options"
_CODE_ATTRIBUTES = (OPTIONS_ATTRIBUTE, "core_forward", "core_code", "core_option_values",
                    "core_attributes")
# Read by every forward, or handled on their own (a forward reading self.training is refused).
_UNRECORDED = frozenset({"training"})


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


def options_node(graph: fx.Graph) -> fx.Node:
    """The graph's node reading the variant's options (``self.core_options``), made once."""
    for node in graph.nodes:
        if node.op == "get_attr" and node.target == OPTIONS_ATTRIBUTE:
            return node
    first = next(n for n in graph.nodes if n.op != "placeholder")
    with graph.inserting_before(first):
        return graph.get_attr(OPTIONS_ATTRIBUTE)


class _ChildrenAsCalls(fx.Tracer):
    """Traces only the root's own forward: every submodule stays one ``call_module`` node."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


def _check_signature(module: nn.Module) -> None:
    for parameter in inspect.signature(module.forward).parameters.values():
        if parameter.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            raise ConversionError(
                f"{type(module).__name__}.forward takes *{parameter.name}; a traced copy cannot "
                "follow variadic arguments, so its forward is left as it is"
            )
        if parameter.default is not inspect.Parameter.empty:
            raise ConversionError(
                f"{type(module).__name__}.forward has the optional argument {parameter.name!r}; a "
                "traced copy would fix it to one value, so its forward is left as it is"
            )


_RECORDING_CLASSES: dict[type, type] = {}
_MISSING = object()


def _recording_class(cls: type, reads: dict) -> type:
    """A subclass of ``cls`` whose attribute reads of plain instance values land in ``reads``.

    ``reads`` is looked up through the instance (``_aalconvert_reads``), so one
    class per ``cls`` serves every trace.
    """
    if cls not in _RECORDING_CLASSES:
        def __getattribute__(self, name: str) -> Any:
            value = super(recording, self).__getattribute__(name)
            if name.startswith("_") or name in _UNRECORDED:
                return value
            state = object.__getattribute__(self, "__dict__")
            sink = state.get("_aalconvert_reads")
            if sink is not None and name in state and not isinstance(value, (torch.Tensor, nn.Module)):
                sink.setdefault((state["_aalconvert_path"], name), _snapshot(value))
            return value

        recording = type(cls.__name__, (cls,), {"__getattribute__": __getattribute__})
        recording.__module__ = cls.__module__
        recording.__qualname__ = cls.__qualname__
        _RECORDING_CLASSES[cls] = recording
    return _RECORDING_CLASSES[cls]


def _snapshot(value: Any) -> Any:
    try:
        return copy.deepcopy(value)
    except Exception:  # an object that does not copy: at least a replacement is noticed
        return value


def _unchanged(current: Any, recorded: Any) -> bool:
    if current is recorded:
        return True
    try:
        return type(current) is type(recorded) and bool(current == recorded)
    except Exception:
        return False


def _trace(module: nn.Module, training: bool, reads: dict | None = None) -> fx.Graph:
    """Trace ``module``'s own forward; the plain attributes it reads (module path, name) go in ``reads``."""
    was_training = module.training
    module.training = training
    swapped: list[tuple[nn.Module, type]] = []
    try:
        if reads is not None:
            for path, submodule in module.named_modules():
                cls = type(submodule)
                submodule.__dict__["_aalconvert_reads"] = reads
                submodule.__dict__["_aalconvert_path"] = path
                submodule.__class__ = _recording_class(cls, reads)
                swapped.append((submodule, cls))
        return _ChildrenAsCalls().trace(module)
    except Exception as error:  # fx raises many types; report one clear reason instead
        first_line = (str(error).strip().splitlines() or [""])[0]
        raise ConversionError(
            f"{type(module).__name__} does not trace with torch.fx ({type(error).__name__}: "
            f"{first_line}); its forward is left as it is"
        ) from error
    finally:
        for submodule, cls in swapped:
            submodule.__class__ = cls
            submodule.__dict__.pop("_aalconvert_reads", None)
            submodule.__dict__.pop("_aalconvert_path", None)
        module.training = was_training


def _compile(graph: fx.Graph) -> tuple[Any, str]:
    """The forward function (taking ``self`` first) and its source for ``graph``."""
    code = graph.python_code(root_module="self")
    namespace = dict(code.globals)
    exec(compile(code.src, "<aalconvert traced forward>", "exec"), namespace)  # noqa: S102
    return namespace["forward"], code.src


def _rebuild_variant(mixin: type, module: nn.Module, options: dict[str, Any]) -> nn.Module:
    """Unpickling: the variant of ``module`` built again (traced again) with the same options."""
    return mixin.from_module(module, **options)


class TracedForwardVariant(nn.Module):
    """Mixin of the variants built from a traced forward. ``core_code`` shows the rewritten forward.

    Subclasses implement ``rewrite`` (and ``make_options`` if they take options); ``nothing_found`` says
    what the rewrite looks for.
    """

    nothing_found: ClassVar[str]
    torch_class: ClassVar[type[nn.Module]]
    _variant_classes: ClassVar[dict[tuple[type, type], type]] = {}

    @classmethod
    def make_options(cls, options: dict[str, Any]) -> Any:
        """The validated options object the rewritten code reads as ``self.core_options``.

        By default a rewrite takes none (the exact ones); k-bit rewrites override this.
        """
        if options:
            raise ConversionError(f"{cls.__name__} takes no options, got {sorted(options)}")
        return None

    @classmethod
    def rewrite(cls, graph: fx.Graph, module: nn.Module) -> int:
        """Rewrite ``graph`` (``module``'s own forward) in place; return how many ops changed."""
        raise NotImplementedError

    @classmethod
    def variant_class(cls, torch_class: type[nn.Module]) -> type:
        """The subclass of ``cls`` and ``torch_class`` (one per pair, reused)."""
        name = f"{cls.__name__}[{torch_class.__name__}]"
        return mixed_class(cls, torch_class, name, cls._variant_classes, torch_class=torch_class)

    @classmethod
    def from_module(cls, module: nn.Module, **options: Any) -> "TracedForwardVariant":
        """The variant of ``module`` sharing everything it holds."""
        if isinstance(module, TracedForwardVariant):
            raise ConversionError(f"{type(module).__name__} is already a traced-forward variant")
        core_options = cls.make_options(options)
        _check_signature(module)
        reads: dict[tuple[str, str], Any] = {}
        graph = _trace(module, training=True, reads=reads)
        if graph.python_code("self").src != _trace(module, training=False).python_code("self").src:
            raise ConversionError(
                f"{type(module).__name__}.forward traces differently in train and eval mode "
                "(it reads self.training); its forward is left as it is"
            )
        if cls.rewrite(graph, module) == 0:
            raise ConversionError(f"{type(module).__name__}.forward {cls.nothing_found}")
        graph.lint()
        new = rebuild_as(cls.variant_class(type(module)), module)
        setattr(new, OPTIONS_ATTRIBUTE, core_options)
        new.core_option_values = dict(options)
        new.core_attributes = reads
        new.core_forward, new.core_code = _compile(graph)
        return new

    def __reduce_ex__(self, protocol: int) -> tuple:
        # The variant class is made at run time and cannot be pickled by name: pickle the
        # original module and rebuild the variant from it when loading.
        mixin = next(c for c in type(self).__bases__ if issubclass(c, TracedForwardVariant))
        return (_rebuild_variant, (mixin, self.to_module(), self.core_option_values))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self._check_attributes()
        return self.core_forward(self, *args, **kwargs)

    def _check_attributes(self) -> None:
        """Raise if a plain attribute the traced forward fixed as a constant has changed since."""
        for (path, name), recorded in self.__dict__.get("core_attributes", {}).items():
            owner = self
            for part in path.split(".") if path else ():
                owner = getattr(owner, part, None)
            current = getattr(owner, name, _MISSING)
            if current is _MISSING or _unchanged(current, recorded):
                continue
            where = f"{path}.{name}" if path else name
            raise ConversionError(
                f"{type(self).__name__}: attribute {where!r} is {current!r} now but was "
                f"{recorded!r} when the forward was traced at conversion, and the converted "
                f"forward computes with that value; convert the model again after changing it "
                f"(aalconvert.revert() then aalconvert.convert()), or set it before converting"
            )

    def to_module(self) -> nn.Module:
        """An instance of the original class holding this variant's Parameters, buffers and submodules."""
        return rebuild_as(self.torch_class, self, drop=_CODE_ATTRIBUTES)

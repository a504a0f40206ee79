"""Zoo activations and norms that keep only their input, and run their forward again in backward.

Model zoos write activations and RMS norms as small modules of several torch
ops (Hugging Face ``NewGELUActivation`` is ``0.5 * x * (1 + tanh(...))``,
``LlamaRMSNorm`` is ``w * x * rsqrt(mean(x^2) + eps)``). Under BP every one of
those ops keeps its own input, so such a module keeps two to four tensors the
size of its input. No type table can list these classes, and their formulas
differ from torch's ``nn.GELU`` in the last bits, so the torch-module variants
cannot stand in for them.

``PointwiseVariant`` keeps the module's input only (exactly, or as a k-bit copy
with ``ApproxOptions``) and in backward runs the module's own forward again on
it, under the autocast state of the forward, to get the gradients of the input
and of the module's Parameters. With the exact input the gradients are
bit-identical to BP's (the same ops on the same values); the extra work is one
elementwise forward. A module qualifies (``pointwise_problem``) when it has no
child modules and no buffers (a second forward must change nothing), its
forward takes one tensor, and it is a zoo norm (a class
named ``...Norm``, ``aalconvert.trace.is_norm_like``) or a zoo activation (a
class named ``...Activation``, or any class of ``timm.layers.activations``);
torch's own classes have dedicated variants. The forward must be deterministic
(recomputing a dropout inside would draw a new mask); no zoo activation or norm
seen so far draws random numbers. The variant is an instance of a
subclass of the zoo class, so isinstance checks, Parameters, state_dict keys
and hooks stay those of the module.
"""

import inspect
from typing import Any, ClassVar

import torch
from torch import nn

from aalconvert.errors import ConversionError
from aalconvert.nn.approx_common import (
    ApproxOptions,
    compress,
    functorch_active,
    make_options,
    needs_graph,
    restore,
)
from aalconvert.nn.rebuild import mixed_class, rebuild_as
from aalconvert.trace import is_norm_like

OPTIONS_ATTRIBUTE = "pointwise_options"
TIMM_ACTIVATIONS = "timm.layers.activations"


def pointwise_problem(module: nn.Module) -> str | None:
    """Why ``module`` is not a zoo activation or norm this variant can take, or None when it is one."""
    cls = type(module)
    name = cls.__name__
    if isinstance(module, PointwiseVariant) or cls.__module__.startswith("aalconvert."):
        return f"{name} is already converted"
    if cls.__module__.startswith("torch."):
        return f"{name} is a torch module (torch's own classes have dedicated variants)"
    zoo_activation = name.endswith("Activation") or cls.__module__.startswith(TIMM_ACTIVATIONS)
    if not (zoo_activation or is_norm_like(module)):
        return f"{name} is neither a zoo activation (a class named ...Activation) nor a zoo norm (...Norm)"
    if next(module.children(), None) is not None:
        return f"{name} has child modules; only a leaf activation or norm is recomputed"
    if next(module.buffers(), None) is not None:
        return f"{name} has buffers (say, running statistics) that a second forward could update again"
    parameters = list(inspect.signature(module.forward).parameters.values())
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(parameters) != 1 or len(positional) != 1:
        return f"{name}.forward takes {[p.name for p in parameters]}; one input tensor is needed"
    return None


def bp_keeps_more_than_input(module: nn.Module) -> bool:
    """Whether ``module`` keeps more than its input for backward under BP, on a small probe input.

    True when it cannot tell (Parameters on the meta device, a probe that fails):
    then keeping the input only is at worst as large as what BP keeps.
    """
    parameter = next(module.parameters(), None)
    if parameter is not None and parameter.device.type == "meta":
        return True
    device = parameter.device if parameter is not None else torch.device("cpu")
    dtype = parameter.dtype if parameter is not None and parameter.is_floating_point() else torch.float32
    features = tuple(parameter.shape) if parameter is not None and parameter.dim() >= 1 else (64,)
    probe = torch.randn((2, *features), device=device, dtype=dtype, requires_grad=True)
    from aalconvert.memory import measure_saved  # late: aalconvert.memory imports the variants

    try:  # the class's forward, not module(): hooks (a user's, say) must not see the probe
        kept = measure_saved(lambda: type(module).forward(module, probe), module.parameters()).nbytes
    except Exception:  # the probe does not fit the module's expectations
        return True
    return kept > probe.numel() * probe.element_size()


def bp_keeps_input(module: nn.Module) -> bool:
    """Whether ``module``'s backward keeps its very input under BP (on a small probe input).

    A chain may start only at a module that keeps its input anyway; a zoo
    activation keeping only its output (or a copy) does not. False when it
    cannot tell.
    """
    from aalconvert.memory import measure_saved, storage_key  # late, as above

    parameter = next(module.parameters(), None)
    if parameter is not None and parameter.device.type == "meta":
        return False
    features = tuple(parameter.shape) if parameter is not None and parameter.dim() >= 1 else (64,)
    probe = torch.randn((2, *features), requires_grad=True) * 1
    if parameter is not None:
        probe = probe.to(parameter.device, parameter.dtype if parameter.is_floating_point() else None)
    try:
        kept = measure_saved(lambda: type(module).forward(module, probe), module.parameters())
    except Exception:  # the probe does not fit the module's expectations
        return False
    return storage_key(probe.untyped_storage()) in kept.storages


def _autocast_state(device_type: str) -> tuple[bool, torch.dtype]:
    return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


def _rerun(module: "PointwiseVariant", names: tuple[str, ...], x: torch.Tensor,
           *parameters: torch.Tensor) -> torch.Tensor:
    """``module``'s zoo forward on ``x`` with ``parameters`` for its Parameters named ``names``.

    Runs on a per-call shallow copy holding ``parameters``: the shared module is
    never modified, so another thread's forward running meanwhile sees its own
    Parameters (``functional_call`` would swap them on the shared module). Calls
    the zoo forward directly, so none of the user's hooks runs again in backward
    (an output-changing hook would change the gradient).
    """
    view = rebuild_as(type(module), module)  # own registries, same tensors
    view._parameters.update(zip(names, parameters))  # on the copy only (a leaf: plain names)
    return view.zoo_forward(x)


class _KeepInputOnly(torch.autograd.Function):
    """Forward of the zoo module; keeps its input (exact or k-bit) and recomputes in backward.

    Backward differentiates the recomputed forward (``_rerun``) with
    ``torch.func.vjp`` (not ``torch.autograd.grad``, which torch.compile cannot
    trace inside a backward), so a converted model still compiles into one graph.
    """

    @staticmethod
    def forward(ctx, module: "PointwiseVariant", options: ApproxOptions | None, names: tuple[str, ...],
                x: torch.Tensor, *parameters: torch.Tensor) -> torch.Tensor:
        ctx.module, ctx.names, ctx.device_type = module, names, x.device.type
        ctx.autocast = _autocast_state(x.device.type)
        kept, ctx.layout = ((x,), None) if options is None else compress(x, options)
        ctx.save_for_backward(*kept, *parameters)  # Parameters cost nothing and get version checks
        return module.zoo_forward(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple:
        count = 1 if ctx.layout is None else ctx.layout.count
        saved = ctx.saved_tensors  # raises if x or a Parameter was modified in place since forward
        x = saved[0] if ctx.layout is None else restore(saved[:count], ctx.layout)
        module, names = ctx.module, ctx.names

        def recompute(x: torch.Tensor, *parameters: torch.Tensor) -> torch.Tensor:
            return _rerun(module, names, x, *parameters)

        enabled, dtype = ctx.autocast
        with torch.autocast(ctx.device_type, dtype=dtype, enabled=enabled):
            _, vjp = torch.func.vjp(recompute, x, *saved[count:])
            grads = vjp(grad)
        wanted = ctx.needs_input_grad[3:]
        return (None, None, None, *(g if need else None for g, need in zip(grads, wanted, strict=True)))


class PointwiseVariant(nn.Module):
    """Mixin put first in the bases of a zoo activation/norm class: keeps the input only.

    ``pointwise_options`` is None (exact input kept) or the ``ApproxOptions`` of a
    k-bit copy. Built with ``from_module``; ``to_module`` gives the zoo module back.
    """

    NAME: ClassVar[str] = "KeepInput"
    zoo_class: ClassVar[type[nn.Module]]
    _variant_classes: ClassVar[dict[tuple[type, type], type]] = {}

    @classmethod
    def variant_class(cls, zoo_class: type[nn.Module]) -> type:
        """The subclass of this mixin and ``zoo_class`` (one per zoo class, reused)."""
        name = f"{cls.NAME}[{zoo_class.__name__}]"
        return mixed_class(cls, zoo_class, name, cls._variant_classes, zoo_class=zoo_class)

    @classmethod
    def from_module(cls, module: nn.Module, **options: Any) -> "PointwiseVariant":
        """The variant of ``module``: exact input kept without options, a k-bit copy with ``bits=``."""
        problem = pointwise_problem(module)
        if problem is not None:
            raise ConversionError(f"{cls.__name__}.from_module cannot convert {type(module).__name__}: {problem}")
        pointwise_options = make_options(cls.__name__, options) if options else None
        return _rebuild_variant(module, pointwise_options, cls)

    def to_module(self) -> nn.Module:
        """An instance of the zoo class holding this variant's Parameters, buffers and hooks."""
        return rebuild_as(self.zoo_class, self, drop=(OPTIONS_ATTRIBUTE,))

    def __reduce_ex__(self, protocol: int) -> tuple:
        # The variant class is made at run time and cannot be pickled by name: pickle the
        # zoo module and rebuild the variant from it when loading.
        mixin = type(self).__bases__[0]  # this class's mixin: PointwiseVariant or a subclass of it
        return (_rebuild_variant, (self.to_module(), getattr(self, OPTIONS_ATTRIBUTE), mixin))

    def zoo_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.zoo_class.forward(self, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The zoo forward, keeping only ``x`` for backward."""
        named = tuple(self.named_parameters())
        parameters = tuple(p for _, p in named)
        if not needs_graph(x, *parameters) or functorch_active(x, *parameters):
            return self.zoo_forward(x)
        names = tuple(name for name, _ in named)
        return _KeepInputOnly.apply(self, getattr(self, OPTIONS_ATTRIBUTE), names, x, *parameters)

    def extra_repr(self) -> str:
        options = getattr(self, OPTIONS_ATTRIBUTE)
        kept = "input kept exact" if options is None else options.describe()
        base = super().extra_repr()
        return f"{base}, {kept}" if base else kept


def _rebuild_variant(module: nn.Module, options: ApproxOptions | None,
                     mixin: type[PointwiseVariant] = PointwiseVariant) -> PointwiseVariant:
    """The ``mixin`` variant of a checked zoo ``module`` (from_module, and unpickling)."""
    new = rebuild_as(mixin.variant_class(type(module)), module)
    setattr(new, OPTIONS_ATTRIBUTE, options)
    return new

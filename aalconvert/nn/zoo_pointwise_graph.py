"""Zoo norms and activations whose input also feeds other ops: keep only the input, with autograd's own graph.

``PointwiseVariant`` differentiates its recomputed forward as one autograd node,
so its input's gradient arrives as one sum. Where that input also feeds another
op (a pre-norm block's residual stream, ``x + attn(LlamaRMSNorm(x))``), BP adds
the norm's contributions (through ``x * rsqrt(...)`` and through ``x.pow(2)``)
to the residual's one at a time, and one sum rounds differently.

``GraphPointwiseVariant`` runs the zoo forward as it is, so autograd's graph and
its summation order are BP's, inside saved-tensor hooks: a saved tensor over the
input's storage (the input itself) or over a Parameter's is kept as BP keeps it;
every other one (the fp32 upcast, ``1/rms``, the normalised input before the
weight) is kept as its position in the forward's sequence of saves. In backward
the first such unpack runs the forward again on the input, in the forward's
autocast state and without the module's hooks, and hands out that run's saves by
position: the same ops on the same values, so the gradients are bit-identical.
A norm then keeps its input only (``LlamaRMSNorm`` in fp32: half of what BP
keeps; in bf16 the bf16 input instead of its fp32 upcast and the bf16 product).

Under torch.compile and torch.func transforms the module runs its plain zoo
forward (BP's memory, BP's gradients). The input must not be modified in place
between forward and backward (BP's own saves would catch that; here the rerun
checks the input's version and raises).
"""

from typing import Any

import torch

from aalconvert.errors import ConversionError
from aalconvert.memory import storage_key
from aalconvert.nn.approx_common import functorch_active, needs_graph
from aalconvert.nn.saved import parameter_versions, raise_if_parameters_changed
from aalconvert.nn.zoo_pointwise import PointwiseVariant


class _Rerun:
    """One forward call's input, and the saves of running the forward again on it (made on first use)."""

    def __init__(self, module: "GraphPointwiseVariant", x: torch.Tensor, outer: Any) -> None:
        self.module, self.outer = module, outer
        self.packed = x if outer is None else outer[0](x)
        self.storage, self.version, self.requires_grad = storage_key(x.untyped_storage()), x._version, x.requires_grad
        self.parameter_versions = parameter_versions((module,))
        self.device_type = x.device.type
        self.autocast = (torch.is_autocast_enabled(self.device_type), torch.get_autocast_dtype(self.device_type))
        self.expected: dict[int, tuple] = {}  # position -> (shape, dtype, stride) of the forward's save
        self.saves: dict[int, torch.Tensor] = {}

    def saved(self, position: int) -> torch.Tensor:
        """The forward's save at ``position``, from a rerun (each handed out once per rerun)."""
        if position not in self.saves:
            self.saves = self._run()
        t = self.saves.pop(position)
        if (t.shape, t.dtype, t.stride()) != self.expected[position]:
            raise ConversionError(
                f"{type(self.module).__name__}: running the forward again in backward saved a "
                f"{t.dtype} tensor of shape {tuple(t.shape)} where the forward saved "
                f"{self.expected[position][1]} {tuple(self.expected[position][0])}; its forward must "
                "be deterministic and its Parameters' requires_grad unchanged since the forward"
            )
        return t

    def _input(self) -> torch.Tensor:
        x = self.packed if self.outer is None else self.outer[1](self.packed)
        if storage_key(x.untyped_storage()) == self.storage and x._version != self.version:
            raise ConversionError(
                f"{type(self.module).__name__}: its input, kept to run its forward again in backward, "
                "was modified in place after the forward; do not modify it between forward and "
                "backward (clone it before modifying)"
            )
        return x

    def _run(self) -> dict[int, torch.Tensor]:
        raise_if_parameters_changed(self.parameter_versions, type(self.module).__name__)
        x = self._input()
        if not (torch.is_grad_enabled() and x.requires_grad):  # create_graph keeps x's own graph
            x = x.detach().requires_grad_(self.requires_grad)
        saves: list[torch.Tensor] = []

        def capture(t: torch.Tensor) -> torch.Tensor:
            saves.append(t)
            return t.detach()  # values: enough for second-order gradients through the rerun's graph

        enabled, dtype = self.autocast
        with torch.enable_grad(), torch.autocast(self.device_type, dtype=dtype, enabled=enabled), \
                torch.autograd.graph.saved_tensors_hooks(capture, lambda t: t):
            self.module.zoo_forward(x)
        found = len(saves)
        by_position = {position: saves[position] for position in self.expected if position < found}
        # Every save of the rerun's graph keeps ``capture``, and so this list, alive: left full, the
        # list would hold the rerun's outputs, whose grad_fn holds those saves -- a cycle through
        # C++ that no garbage collection frees, leaking the rerun on every backward.
        saves.clear()
        if len(by_position) < len(self.expected):
            raise ConversionError(
                f"{type(self.module).__name__}: running the forward again in backward saved {found} "
                "tensors, fewer than the forward; its forward must be deterministic"
            )
        return by_position


class _Noted:
    def __init__(self, rerun: _Rerun, position: int) -> None:
        self.rerun, self.position = rerun, position


class _PassedOn:
    def __init__(self, packed: Any, unpack_hook: Any) -> None:
        self.packed, self.unpack_hook = packed, unpack_hook


class _KeepInputHooks:
    """The saved-tensor hooks of one forward call: saves not over the input's or a Parameter's
    storage become positions in the forward's sequence of saves."""

    def __init__(self, module: "GraphPointwiseVariant", x: torch.Tensor) -> None:
        self.module, self.x = module, x
        self.kept = {storage_key(x.untyped_storage())} | {
            storage_key(p.untyped_storage()) for p in module.parameters()}
        self.outer = torch._C._autograd._top_saved_tensors_default_hooks(False)
        self.rerun: _Rerun | None = None
        self.position = 0

    def pack(self, t: torch.Tensor) -> Any:
        position, self.position = self.position, self.position + 1
        if storage_key(t.untyped_storage()) in self.kept:
            return t if self.outer is None else _PassedOn(self.outer[0](t), self.outer[1])
        if self.rerun is None:
            self.rerun = _Rerun(self.module, self.x, self.outer)
        self.rerun.expected[position] = (t.shape, t.dtype, t.stride())
        return _Noted(self.rerun, position)

    @staticmethod
    def unpack(packed: Any) -> torch.Tensor:
        if isinstance(packed, _Noted):
            return packed.rerun.saved(packed.position)
        if isinstance(packed, _PassedOn):
            return packed.unpack_hook(packed.packed)
        return packed


class GraphPointwiseVariant(PointwiseVariant):
    """A zoo norm/activation keeping only its input, with BP's autograd graph (module docstring)."""

    NAME = "KeepInputGraph"

    @classmethod
    def from_module(cls, module: torch.nn.Module, **options: Any) -> "GraphPointwiseVariant":
        """The variant of ``module`` (exact input kept; k-bit copies are ``PointwiseVariant``'s)."""
        if options:
            raise ConversionError(
                f"{cls.__name__}.from_module takes no options (got {sorted(options)}); for a k-bit "
                "copy of the input use PointwiseVariant.from_module(module, bits=...)"
            )
        return super().from_module(module)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The zoo forward, its saves other than the input rebuilt in backward."""
        parameters = tuple(self.parameters())
        if (
            not needs_graph(x, *parameters)
            or functorch_active(x, *parameters)
            or torch.compiler.is_compiling()
        ):
            return self.zoo_forward(x)
        hooks = _KeepInputHooks(self, x)
        with torch.autograd.graph.saved_tensors_hooks(hooks.pack, hooks.unpack):
            return self.zoo_forward(x)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, BP's graph"

"""A module whose own forward hands a child linear's weight to a function, with the child's variant in charge.

torchvision's Swin attention (``ShiftedWindowAttention``, V1 and V2) calls
``shifted_window_attention(x, self.qkv.weight, self.proj.weight, ...,
qkv_bias=..., proj_bias=...)``, which runs ``F.linear`` on those weights: the
children are never called, so swapping them changes nothing by itself.
``RoutedLinears`` runs the module's own forward unchanged under a
torch-function mode that sends each ``F.linear`` whose weight is a converted
child's weight to that child's ``routed_linear(x, bias)``, with the bias the
call passes (Swin V2 passes a copy of ``qkv.bias`` with its key third zeroed).
Every other op runs as written, so the module's own arithmetic stays torch's.

Routes are read from the children on every call: a child reverted on its own
is simply no longer routed. torch.compile traces the mode (Dynamo supports
torch-function modes). The variant class is a subclass of the module's own
class (isinstance checks hold) sharing its Parameters, buffers, submodules
and hooks; ``to_module()`` gives back the original class.
"""

from typing import Any

import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from aalconvert.nn.rebuild import OwnClassVariant


class _RouteLinears(TorchFunctionMode):
    """Sends ``F.linear(x, weight, bias)`` to the child owning ``weight``; other calls pass through."""

    def __init__(self, routes: tuple[tuple[Any, nn.Module], ...]) -> None:
        super().__init__()
        self.routes = routes

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            bound = dict(zip(("input", "weight", "bias"), args), **kwargs)
            for weight, child in self.routes:
                if bound.get("weight") is weight:
                    return child.routed_linear(bound["input"], bound.get("bias"))
        return func(*args, **kwargs)


class RoutedLinears(OwnClassVariant):
    """Mixin put before the module's own class: its forward, with converted children's ``F.linear`` routed."""

    @classmethod
    def from_module(cls, module: nn.Module) -> nn.Module:
        """``module`` as a ``RoutedLinears`` subclass of its own class, sharing everything it holds."""
        return module if isinstance(module, RoutedLinears) else cls.variant_of(module)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        routes = tuple(
            (child.weight, child) for child in self.children() if callable(getattr(child, "routed_linear", None))
        )
        if not routes:
            return super().forward(*args, **kwargs)
        with _RouteLinears(routes):
            return super().forward(*args, **kwargs)

"""The learning indicator: how well an auxiliary activation agrees with BP (methods.md 1, 2).

For a layer whose weight gradient uses an auxiliary ``a`` instead of its real
input ``h``, per sample over all features:
``LI = sum(a * (2h - a)) / sum(h * h) = 1 - |h - a|^2 / |h|^2``.
LI > 0 means the weight update stays within 90 degrees of BP's; LI = 1 is BP.

- ARA: ``h`` = the layer's input, ``a`` = the group's anchor (no anchor: LI = 1).
- ASA: ``h = x + eps*s`` (what the layer multiplies), ``a = eps*s``. With the
  ``"sign"`` variant every element adds ``2 eps |x| + eps^2 > 0`` to the
  numerator, so LI is always positive. With ``"relu"`` the elements with
  ``x <= 0`` have ``s = 0`` and add nothing: LI is positive for every sample
  with at least one positive input, 0 if all are negative, and undefined
  (0/0 = NaN) if all are exactly 0.
"""

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn

from aalconvert.nn.ara import ARAConv1d, ARAConv2d, ARALinear
from aalconvert.nn.asa import ASAConv1d, ASAConv2d, ASALinear, auxiliary_sign

ARA_LAYERS = (ARALinear, ARAConv1d, ARAConv2d)
ASA_LAYERS = (ASALinear, ASAConv1d, ASAConv2d)


def learning_indicator(real_input: torch.Tensor, auxiliary: torch.Tensor) -> torch.Tensor:
    """Per-sample LI (float32 tensor of shape [batch]; dim 0 is the batch).

    Accumulated in float64 so that tiny positive values do not round to 0.
    """
    if real_input.shape != auxiliary.shape:
        raise ValueError(
            f"learning_indicator: real input has shape {tuple(real_input.shape)} but the "
            f"auxiliary has {tuple(auxiliary.shape)}; they must be equal"
        )
    if real_input.dim() == 0:
        raise ValueError("learning_indicator needs a batch dimension (dim 0), got a scalar")
    h = real_input.detach().reshape(real_input.shape[0], -1).double()
    a = auxiliary.detach().reshape(auxiliary.shape[0], -1).double()
    return ((a * (2 * h - a)).sum(1) / (h * h).sum(1)).float()


def ara_learning_indicator(layer_input: torch.Tensor, anchor: torch.Tensor | None) -> torch.Tensor:
    """LI of an ARA layer: its input against the anchor; exactly 1 when it has none (BP)."""
    if anchor is None:
        return torch.ones(layer_input.shape[0], device=layer_input.device)
    return learning_indicator(layer_input, anchor)


def asa_learning_indicator(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """LI of an ASA layer on its input ``x``: ``h = x + eps*s`` against ``a = eps*s``."""
    if not isinstance(layer, ASA_LAYERS):
        raise TypeError(f"asa_learning_indicator takes an ASA layer, got {type(layer).__name__}")
    x = x.detach().double()
    perturbation = layer.eps * auxiliary_sign(x, layer.variant)
    return learning_indicator(x + perturbation, perturbation)


def auxiliary_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every ARA and ASA layer of ``model`` by qualified name."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, ARA_LAYERS + ASA_LAYERS)
    }


@contextmanager
def record_learning_indicators(
    layers: Mapping[str, nn.Module],
) -> Iterator[dict[str, torch.Tensor]]:
    """Within the block, each forward of a listed ARA/ASA layer stores its per-sample LI.

    Yields a dict filled as forwards run: name -> float32 tensor [batch] (a
    layer called several times keeps its last call). Only that small tensor
    is kept, never the inputs. Hooks are removed on exit.
    """
    for name, layer in layers.items():
        if not isinstance(layer, ARA_LAYERS + ASA_LAYERS):
            raise TypeError(
                f"record_learning_indicators: {name!r} is a {type(layer).__name__}, "
                "not an ARA or ASA layer"
            )
    indicators: dict[str, torch.Tensor] = {}

    def recorder(name: str):
        def hook(layer: nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0]
            with torch.no_grad():
                if isinstance(layer, ASA_LAYERS):
                    indicators[name] = asa_learning_indicator(layer, x)
                else:
                    anchor = args[1] if len(args) > 1 else kwargs.get("anchor")
                    indicators[name] = ara_learning_indicator(x, anchor)

        return hook

    handles = [
        layer.register_forward_pre_hook(recorder(name), with_kwargs=True)
        for name, layer in layers.items()
    ]
    try:
        yield indicators
    finally:
        for handle in handles:
            handle.remove()

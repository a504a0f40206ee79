"""Example inputs a model can tell about itself, for ``convert(model)`` called without any.

Hugging Face layers trace only on example values (their forwards unpack shapes
and take optional arguments), so without inputs almost nothing of a
``transformers`` model converts. Such models describe their input: the name of
their main input and, for token models, a small dummy batch (``dummy_inputs``);
image models give their channel count and image size in their config.
"""

import inspect

import torch
from torch import nn


def self_described_inputs(model: nn.Module) -> tuple | None:
    """Positional example inputs built from what ``model`` says of itself, or None if it says nothing.

    Token models: ``model.dummy_inputs`` (a few short sequences), each at its
    position in ``model.forward``'s parameters (an encoder-decoder's
    ``decoder_input_ids`` too), None between them.
    Image models (``main_input_name == "pixel_values"``): a batch of two random
    images of ``config.num_channels`` x ``config.image_size``. On the device
    (and, for images, the floating dtype) of the model's parameters.
    """
    name = getattr(model, "main_input_name", None)
    config = getattr(model, "config", None)
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    if name == "input_ids":
        dummy = getattr(model, "dummy_inputs", None)
        ids = dummy.get("input_ids") if isinstance(dummy, dict) else None
        if not isinstance(ids, torch.Tensor):
            return None
        return _positional(model, {key: value.to(device) for key, value in dummy.items()
                                   if isinstance(value, torch.Tensor)})
    if name == "pixel_values" and config is not None:
        size = getattr(config, "image_size", None)
        channels = getattr(config, "num_channels", 3)
        if isinstance(size, int):
            size = (size, size)
        if not (isinstance(size, (tuple, list)) and len(size) == 2 and isinstance(channels, int)):
            return None
        dtype = parameter.dtype if parameter is not None and parameter.is_floating_point() else torch.float32
        generator = torch.Generator().manual_seed(0)
        return (torch.randn(2, channels, *size, generator=generator).to(device=device, dtype=dtype),)
    return None


def _positional(model: nn.Module, named: dict[str, torch.Tensor]) -> tuple:
    """``named`` (always holding ``input_ids``) as positional arguments of ``model.forward``: each at its
    parameter's position, None between them; names the signature does not take positionally are left out."""
    try:
        parameters = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return (named["input_ids"],)
    positional = [p.name for p in parameters
                  if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    used = [positional.index(name) for name in named if name in positional]
    if positional[:1] != ["input_ids"]:
        return (named["input_ids"],)
    return tuple(named.get(name) for name in positional[:max(used) + 1])

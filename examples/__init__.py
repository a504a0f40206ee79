"""Example models the converter is tested and benchmarked on, written the way model zoos write them.

``EXAMPLES`` maps a name to an :class:`Example`, so a test can loop over every model::

    for name, example in EXAMPLES.items():
        model = example.build_model()
        output = model(*example.example_inputs(batch_size=4))
        assert output.shape == example.output_shape(batch_size=4)

Each build function takes overrides of its module's ``CONFIG`` fields; pass the
same overrides to ``example_inputs`` / ``output_shape`` so the inputs fit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn

from examples import bert, gpt, mixer, resnet, transformer, vit


@dataclass(frozen=True)
class Example:
    """How to build one example model, make a batch of inputs for it and what its output shape is.

    ``config`` is the frozen dataclass of defaults that ``build_model()`` uses.
    """

    config: object
    build_model: Callable[..., nn.Module]
    example_inputs: Callable[..., tuple[Tensor, ...]]
    output_shape: Callable[..., tuple[int, ...]]


EXAMPLES: dict[str, Example] = {
    "resnet_basic": Example(
        resnet.CONFIG, resnet.resnet_basic, resnet.example_inputs, resnet.output_shape),
    "resnet_bottleneck": Example(
        resnet.BOTTLENECK_CONFIG, resnet.resnet_bottleneck, resnet.example_inputs, resnet.output_shape),
    "transformer": Example(
        transformer.CONFIG, transformer.build_model, transformer.example_inputs, transformer.output_shape),
    "bert": Example(bert.CONFIG, bert.build_model, bert.example_inputs, bert.output_shape),
    "vit": Example(vit.CONFIG, vit.build_model, vit.example_inputs, vit.output_shape),
    "mixer": Example(mixer.CONFIG, mixer.build_model, mixer.example_inputs, mixer.output_shape),
    "gpt": Example(gpt.CONFIG, gpt.build_model, gpt.example_inputs, gpt.output_shape),
}

"""The ``example_inputs`` / ``output_shape`` functions the image and token-id examples share.

Each factory takes the module's default config (a frozen dataclass) and returns
the module-level function; the function applies the same ``**overrides`` as
``build_model`` so the batch fits the model built with them.
"""

import dataclasses
from collections.abc import Callable

import torch
from torch import Tensor


def image_inputs(default: object) -> Callable[..., tuple[Tensor]]:
    """``example_inputs`` for an image model whose config has in_channels and image_size."""

    def example_inputs(batch_size: int = 4, **overrides) -> tuple[Tensor]:
        """One reproducible batch of standard-normal images, ``(batch, in_channels, size, size)``."""
        config = dataclasses.replace(default, **overrides)
        generator = torch.Generator().manual_seed(0)
        images = torch.randn(batch_size, config.in_channels, config.image_size, config.image_size,
                             generator=generator)
        return (images,)

    return example_inputs


def token_inputs(default: object) -> Callable[..., tuple[Tensor]]:
    """``example_inputs`` for a token model whose config has vocab_size and seq_len."""

    def example_inputs(batch_size: int = 4, **overrides) -> tuple[Tensor]:
        """One reproducible batch of uniform token ids, int64 ``(batch, seq_len)`` in ``[0, vocab_size)``."""
        config = dataclasses.replace(default, **overrides)
        generator = torch.Generator().manual_seed(0)
        return (torch.randint(0, config.vocab_size, (batch_size, config.seq_len), generator=generator),)

    return example_inputs


def logits_shape(default: object, *fields: str) -> Callable[..., tuple[int, ...]]:
    """``output_shape`` giving ``(batch_size, *config.<fields>)`` for the overridden config."""

    def output_shape(batch_size: int = 4, **overrides) -> tuple[int, ...]:
        config = dataclasses.replace(default, **overrides)
        return (batch_size, *(getattr(config, field) for field in fields))

    output_shape.__doc__ = f"Shape of the logits for a batch: ``(batch, {', '.join(fields)})``."
    return output_shape

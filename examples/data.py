"""Real data for the training examples, all available offline.

- ``digits``: scikit-learn's handwritten digits (1797 grayscale 8x8 images,
  classes 0-9), upsampled for the image models, with a fixed held-out test split.
- ``stdlib_text``: bytes of a fixed list of Python standard-library source files,
  read at run time; each file's first 90% is training text, its last 10% validation.
  Byte-level tokens (ids 0-255), so any model vocabulary >= 257 fits (256 = MASK).
- ``reversal_batch``: the deterministic seq2seq task, reverse a sequence of digits.

Every function takes an explicit ``torch.Generator`` or seed, so the same seed gives
the same data and the split never depends on the training seed.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

DIGITS_SPLIT_SEED = 0  # the test split is the same for every training seed
DIGITS_TEST_FRACTION = 0.2  # 360 of the 1797 images are held out

STDLIB_MODULES = (
    "argparse", "textwrap", "csv", "difflib", "heapq", "bisect", "functools",
    "fractions", "calendar", "shlex", "json.decoder", "json.encoder",
)
"""Modules whose source files are the language-modelling corpus (about 380 kB on CPython 3.11)."""
VALIDATION_FRACTION = 0.1  # tail of every file held out for validation
MASK_ID = 256  # the byte vocabulary's extra token for masked-LM inputs

DIGIT_OFFSET = 2  # seq2seq token ids: 0 = padding (unused), 1 = start of target, 2..11 = digits 0..9
BOS_ID = 1
SEQ2SEQ_VOCAB = DIGIT_OFFSET + 10


@dataclass(frozen=True)
class ImageSplit:
    """Digits images ``(n, channels, size, size)`` float32 (standardised pixels) and int64 labels ``(n,)``."""

    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor


def digits(image_size: int = 32, in_channels: int = 1) -> ImageSplit:
    """scikit-learn's digits, bilinearly upsampled to ``image_size`` pixels and repeated over channels.

    Pixels (0..16 in the data set) are scaled to mean 0 and standard deviation 1 with
    the training split's statistics. The 20% test split is drawn once with
    ``DIGITS_SPLIT_SEED``: 1437 training and 360 test images.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise ImportError(
            "the image examples train on scikit-learn's digits; install it with "
            "pip install scikit-learn (or pip install -e '.[test]')"
        ) from error
    if image_size < 8 or in_channels < 1:
        raise ValueError(f"digits: image_size must be >= 8 and in_channels >= 1, got {image_size}, {in_channels}")
    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1)  # (1797, 1, 8, 8)
    labels = torch.tensor(bunch.target, dtype=torch.int64)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(DIGITS_SPLIT_SEED))
    n_test = math.ceil(len(labels) * DIGITS_TEST_FRACTION)
    test, train = order[:n_test], order[n_test:]
    mean, std = images[train].mean(), images[train].std()
    images = (images - mean) / std
    if image_size != 8:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    images = images.expand(-1, in_channels, -1, -1).contiguous()
    return ImageSplit(images[train], labels[train], images[test], labels[test])


@dataclass(frozen=True)
class TextSplit:
    """Byte-level corpus: int64 token ids (0..255), training and validation text as 1-D tensors."""

    train: Tensor
    validation: Tensor


def stdlib_text() -> TextSplit:
    """The source of ``STDLIB_MODULES`` as byte ids; each file's last 10% goes to validation.

    The text is whatever this Python installation ships, so figures depend on the
    Python version (they are reported with it).
    """
    train, validation = [], []
    for name in STDLIB_MODULES:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
            raise FileNotFoundError(
                f"stdlib_text: no Python source for module {name!r} in this installation; "
                "the language-modelling examples need the standard library's .py files"
            )
        with open(spec.origin, "rb") as source:
            data = torch.frombuffer(bytearray(source.read()), dtype=torch.uint8).long()
        cut = int(len(data) * (1 - VALIDATION_FRACTION))
        train.append(data[:cut])
        validation.append(data[cut:])
    return TextSplit(torch.cat(train), torch.cat(validation))


def random_windows(text: Tensor, batch_size: int, length: int, generator: torch.Generator) -> Tensor:
    """``batch_size`` windows of ``length`` consecutive tokens at random offsets, int64 ``(batch, length)``."""
    if len(text) <= length:
        raise ValueError(f"random_windows: text of {len(text)} tokens is too short for windows of {length}")
    starts = torch.randint(0, len(text) - length, (batch_size,), generator=generator)
    return text[starts.unsqueeze(1) + torch.arange(length)]


def consecutive_windows(text: Tensor, count: int, length: int) -> Tensor:
    """The first ``count`` non-overlapping windows of ``length`` tokens, int64 ``(count, length)`` (fixed)."""
    count = min(count, len(text) // length)
    return text[: count * length].view(count, length)


def mask_tokens(tokens: Tensor, probability: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Masked-LM inputs and targets: each position is replaced by ``MASK_ID`` with ``probability``.

    Returns ``(inputs, targets)``; targets are -100 (ignored by cross entropy) where
    nothing was masked. At least one position per row is masked, so every row counts.
    (Simpler than BERT's 80/10/10 replacement: every chosen position becomes MASK.)
    """
    chosen = torch.rand(tokens.shape, generator=generator) < probability
    first = torch.randint(0, tokens.shape[1], (tokens.shape[0],), generator=generator)
    chosen[torch.arange(tokens.shape[0]), first] = True
    inputs = tokens.masked_fill(chosen, MASK_ID)
    targets = tokens.masked_fill(~chosen, -100)
    return inputs, targets


def reversal_batch(batch_size: int, length: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """Seq2seq task: the target is the source digit sequence reversed.

    Returns int64 ``(source, decoder_input, target)``, each ``(batch, length)``:
    source = random digits (ids ``DIGIT_OFFSET..DIGIT_OFFSET+9``), target = source
    flipped, decoder input = ``BOS_ID`` followed by the target shifted right
    (teacher forcing).
    """
    source = torch.randint(0, 10, (batch_size, length), generator=generator) + DIGIT_OFFSET
    target = source.flip(1)
    decoder_input = torch.cat((torch.full((batch_size, 1), BOS_ID), target[:, :-1]), dim=1)
    return source, decoder_input, target

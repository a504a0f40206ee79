"""Shared parts of the approximate-activation variants (methods.md section 3).

The forward of every variant is exact; only the copy of an activation kept for
backward is quantized to ``bits`` per element (``aalconvert.kernels.quantize``)
and decoded in backward. Parameters are never quantized, and activations with
fewer than ``min_numel`` elements (or of a dtype the quantizer does not take,
e.g. float64) are kept exact, since their metadata would cost more than it saves.
With nearest rounding the copy is companded by default (levels evenly spaced in
``sign(x) * sqrt(|x|)``), and at 4 and 2 bits groups are 64 elements rather than
256: together they keep the gradient cosine to BP above 0.99 at 4 bits on
heavy-tailed activations (Student-t(3), lognormal), where one outlier would
otherwise stretch the steps of a whole 256-element group.
"""

import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
from torch import nn

from aalconvert.errors import ConversionError
from aalconvert.kernels import QuantizedTensor, dequantize, quantize
from aalconvert.nn.rebuild import rebuild_as

ALLOWED_BITS = (8, 4, 2)
ALLOWED_SCALE_DTYPES = (torch.float16, torch.bfloat16)
# Names accepted for scale_dtype besides the dtypes themselves (e.g. from a config file).
SCALE_DTYPE_NAMES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
ALLOWED_COMPANDINGS = ("auto", "sqrt", "none")
QUANTIZABLE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Default elements per (min, scale) pair. At 8 bits a 256-element group's steps
# are fine enough even with outliers; at 4 and 2 bits 64-element groups cost 3/64
# byte per element more (4 bytes per 64 elements instead of per 256) but confine
# an outlier's coarse steps to 64 neighbours.
DEFAULT_GROUP_SIZE = {8: 256, 4: 64, 2: 64}


@dataclass(frozen=True)
class ApproxOptions:
    """How the copy kept for backward is quantized.

    bits: bits per element (8, 4 or 2). stochastic: unbiased stochastic rounding
    instead of nearest. group_size: elements per (min, scale) pair, a positive
    multiple of 8; None (the default) means 256 at 8 bits and 64 at 4 and 2 bits
    (``DEFAULT_GROUP_SIZE``). min_numel: activations with fewer elements are kept exact.
    scale_dtype: dtype of the per-group min and scale, torch.float16 (the
    default) or torch.bfloat16 (or their names "float16", "bfloat16"). With
    float16 a group beyond its range (values below -65504, ranges above about
    1.6e7) keeps a bfloat16 pair instead (``aalconvert.kernels.quantize``), so
    finite activations never decode to NaN; bfloat16 everywhere trades 3 bits of
    min/step precision in every group for nothing else. companding: "sqrt" quantizes
    ``sign(x) * sqrt(|x|)`` (nearest rounding only), "none" quantizes ``x``;
    "auto" (the default) becomes "sqrt" with nearest rounding and "none" with
    stochastic rounding, which must stay uniform to stay unbiased.
    """

    bits: int = 4
    stochastic: bool = False
    group_size: int | None = None
    min_numel: int = 4096
    scale_dtype: torch.dtype = torch.float16
    companding: str = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or self.bits not in ALLOWED_BITS:
            raise ConversionError(f"bits must be one of {ALLOWED_BITS}, got {self.bits!r}")
        if self.group_size is None:  # frozen dataclass: resolve once, here
            object.__setattr__(self, "group_size", DEFAULT_GROUP_SIZE[self.bits])
        if not isinstance(self.stochastic, bool):
            raise ConversionError(f"stochastic must be True or False, got {self.stochastic!r}")
        if (
            isinstance(self.group_size, bool)
            or not isinstance(self.group_size, int)
            or self.group_size <= 0
            or self.group_size % 8
        ):
            raise ConversionError(
                f"group_size must be a positive multiple of 8 (e.g. 64, 256), got {self.group_size!r}"
            )
        if isinstance(self.min_numel, bool) or not isinstance(self.min_numel, int) or self.min_numel < 0:
            raise ConversionError(
                f"min_numel must be an int >= 0 (0 quantizes every tensor), got {self.min_numel!r}"
            )
        if isinstance(self.scale_dtype, str) and self.scale_dtype in SCALE_DTYPE_NAMES:
            object.__setattr__(self, "scale_dtype", SCALE_DTYPE_NAMES[self.scale_dtype])
        if not isinstance(self.scale_dtype, torch.dtype) or self.scale_dtype not in ALLOWED_SCALE_DTYPES:
            raise ConversionError(
                f"scale_dtype must be one of {ALLOWED_SCALE_DTYPES} (or their names "
                f"{tuple(SCALE_DTYPE_NAMES)}), got {self.scale_dtype!r}"
            )
        if self.companding not in ALLOWED_COMPANDINGS:
            raise ConversionError(
                f"companding must be one of {ALLOWED_COMPANDINGS}, got {self.companding!r}"
            )
        if self.companding == "sqrt" and self.stochastic:
            raise ConversionError(
                "companding='sqrt' works with nearest rounding only (stochastic rounding must "
                "stay uniform to stay unbiased); use companding='none' or 'auto' with stochastic=True"
            )
        if self.companding == "auto":  # frozen dataclass: resolve once, here
            object.__setattr__(self, "companding", "none" if self.stochastic else "sqrt")

    def describe(self) -> str:
        """The options as ``extra_repr`` shows them."""
        return (
            f"bits={self.bits}, stochastic={self.stochastic}, group_size={self.group_size}, "
            f"min_numel={self.min_numel}, scale_dtype={self.scale_dtype}, "
            f"companding={self.companding}"
        )


def make_options(module_name: str, options: dict) -> ApproxOptions:
    """Validated ``ApproxOptions`` from keyword options; unknown names are reported with the allowed ones."""
    allowed = [f.name for f in fields(ApproxOptions)]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ConversionError(
            f"{module_name}: unknown option(s) {unknown}; allowed options are {allowed}"
        )
    return ApproxOptions(**options)


@dataclass(frozen=True)
class SavedLayout:
    """How an activation was kept: exact (one tensor) or quantized (codes, mins, scales)."""

    quantized: bool
    shape: torch.Size
    dtype: torch.dtype
    bits: int
    group_size: int
    companding: str = "none"

    @property
    def count(self) -> int:
        """How many tensors this activation occupies in ``ctx.saved_tensors``."""
        return 3 if self.quantized else 1


def should_quantize(x: torch.Tensor, options: ApproxOptions) -> bool:
    """True when ``x`` is large enough and of a dtype the quantizer takes."""
    return x.dtype in QUANTIZABLE_DTYPES and x.numel() >= max(options.min_numel, 1)


_SEED_MASK = 2**64 - 1
_seed_state = {"counter": 0}


def manual_seed(seed: int) -> None:
    """Restart the sequence of stochastic-rounding seeds (``next_seed``) from ``seed``."""
    _seed_state["counter"] = int(seed) & _SEED_MASK


def next_seed() -> int:
    """A fresh seed in [0, 2**63) for one stochastic quantization.

    Seeds come from a counter owned by aalconvert, mixed by the splitmix64
    finalizer: unlike drawing from torch's generator, a converted forward leaves
    torch's RNG state untouched, so dropout and every other draw after it stay
    those of the unconverted model under the same ``torch.manual_seed``. Each
    call gives a different seed; ``manual_seed`` restarts the sequence.
    """
    counter = (_seed_state["counter"] + 0x9E3779B97F4A7C15) & _SEED_MASK
    _seed_state["counter"] = counter
    z = counter
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _SEED_MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _SEED_MASK
    return (z ^ (z >> 31)) >> 1


class _Packs(threading.local):
    """This thread's packs by (tensor identity, options), each with a weak reference to its tensor."""

    def __init__(self) -> None:
        self.entries: dict[tuple[int, ApproxOptions], tuple[weakref.ref, int, tuple, SavedLayout]] = {}


_packs = _Packs()


def compress(x: torch.Tensor, options: ApproxOptions) -> tuple[tuple[torch.Tensor, ...], SavedLayout]:
    """Tensors to pass to ``ctx.save_for_backward`` for ``x``, and how to decode them.

    Layers that read the same tensor (q, k and v projections of one input; a
    norm and the layer after it under recompute) share one k-bit copy: a pack is
    reused for the very same tensor at the same version with the same options,
    for as long as the tensor lives (the entry goes with it). Not under
    torch.compile, whose graphs cannot hold the cache, and not with stochastic
    rounding, whose copies of one tensor must differ from forward to forward.
    """
    if not should_quantize(x, options):
        return (compact(x),), SavedLayout(False, x.shape, x.dtype, 0, 0)
    caching = not options.stochastic and not torch.compiler.is_compiling()
    key = (id(x), options)
    entries = _packs.entries
    cached = entries.get(key) if caching else None
    if cached is not None and cached[0]() is x and cached[1] == x._version:
        return cached[2], cached[3]
    q = quantize(
        x.detach(),
        options.bits,
        group_size=options.group_size,
        stochastic=options.stochastic,
        scale_dtype=options.scale_dtype,
        seed=next_seed() if options.stochastic else 0,
        companding=options.companding,
    )
    layout = SavedLayout(True, x.shape, x.dtype, q.bits, q.group_size, q.companding)
    if caching:
        def forget(reference: weakref.ref, key=key, entries=entries) -> None:
            entry = entries.get(key)
            if entry is not None and entry[0] is reference:
                del entries[key]

        entries[key] = (weakref.ref(x, forget), x._version, q.tensors(), layout)
    return q.tensors(), layout


def redate_copy(x: torch.Tensor, options: ApproxOptions) -> None:
    """Let layers reading ``x`` share the copy its own in-place Function just made of it.

    A Function that modifies its input in place (``ctx.mark_dirty``) makes the
    copy in its forward, and autograd bumps the version once more as the Function
    returns; the values are those the copy was made of, so the entry takes the
    new version. Call it right after the Function returns, before anything else
    can touch ``x``.
    """
    key = (id(x), options)
    entry = _packs.entries.get(key)
    if entry is not None and entry[0]() is x:
        _packs.entries[key] = (entry[0], x._version, *entry[2:])


def compact(x: torch.Tensor) -> torch.Tensor:
    """``x``, or a copy of it when ``x`` is a small view of a much larger storage.

    Saving a view keeps its whole storage alive: a ViT's head saving its class
    token ``x[:, 0]`` would keep every token. A copy of the view is kept instead
    when the storage holds at least twice its bytes. Not under torch.compile,
    which plans its own saved tensors (and cannot trace a storage's size).
    """
    if torch.compiler.is_compiling():
        return x
    if x.untyped_storage().nbytes() >= 2 * x.numel() * x.element_size() > 0:
        return x.detach().clone(memory_format=torch.contiguous_format)
    return x


def restore(tensors: Sequence[torch.Tensor], layout: SavedLayout) -> torch.Tensor:
    """The activation (exact, or decoded to its original shape and dtype) from ``compress``'s tensors."""
    if not layout.quantized:
        return tensors[0]
    q = QuantizedTensor.from_tensors(
        tuple(tensors), layout.shape, layout.dtype, layout.bits, layout.group_size,
        layout.companding,
    )  # fmt: skip
    return dequantize(q)


def needs_graph(*tensors: torch.Tensor | None) -> bool:
    """True when autograd will record this call (so a copy for backward is worth making).

    False while a torch.func transform is active (``functorch_active``): the
    variants then run their plain torch forward, which the transforms handle
    (exact gradients, no memory saving).
    """
    if functorch_active(*tensors):
        return False
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def functorch_active(*tensors: torch.Tensor | None) -> bool:
    """True while a torch.func transform (grad, vmap, jacrev, jvp, ...) is active.

    The variants' ``torch.autograd.Function``s have no ``setup_context`` (and
    quantizing a batched or gradient-tracking wrapper would be wrong anyway), so
    under a transform a variant must compute its plain torch forward instead:
    exact gradients, no memory saving. ``tensors`` (the call's inputs and
    Parameters; None entries are ignored) are also checked for functorch
    wrappers that outlived their transform; that check is skipped while
    torch.compile traces, which cannot trace it (the global check is traceable
    and enough there).
    """
    if torch._C._are_functorch_transforms_active():
        return True
    if torch.compiler.is_compiling():
        return False
    is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    return any(t is not None and is_wrapped(t) for t in tensors)


def check_module_type(module: nn.Module, torch_class: type, variant: str) -> None:
    """Raise unless ``module`` is exactly ``torch_class`` (a subclass may change forward)."""
    if type(module) is not torch_class:
        raise ConversionError(
            f"{variant}.from_module takes a torch.nn.{torch_class.__name__}, got "
            f"{type(module).__module__}.{type(module).__qualname__}; subclasses are not converted "
            "because their forward may differ"
        )


class ApproxVariant:
    """Mixin for a torch module class rebuilt to keep a k-bit copy for backward.

    Subclasses list the torch class they replace in ``torch_class`` and put this
    mixin first in their bases (``class ApproxLinear(ApproxVariant, nn.Linear)``),
    so isinstance checks, hooks, state_dict keys and Parameters stay those of the
    original module.
    """

    torch_class: type[nn.Module]
    approx_options: ApproxOptions

    @classmethod
    def from_module(cls, module: nn.Module, **options) -> nn.Module:
        """The variant of ``module`` sharing its Parameters; ``options`` as in ``ApproxOptions``."""
        check_module_type(module, cls.torch_class, cls.__name__)
        approx_options = cls.make_options(options)
        cls.check_convertible(module)
        new = rebuild_as(cls, module)
        new.approx_options = approx_options
        return new

    @classmethod
    def make_options(cls, options: dict) -> ApproxOptions:
        """Validated options for this variant (a variant may change defaults or refuse values)."""
        return make_options(cls.__name__, options)

    @classmethod
    def check_convertible(cls, module: nn.Module) -> None:
        """Raise ``ConversionError`` when ``module``'s own settings cannot be converted."""

    def to_module(self) -> nn.Module:
        """The plain torch module, sharing this variant's Parameters."""
        return rebuild_as(self.torch_class, self, drop=("approx_options",))

    def extra_repr(self) -> str:
        base = super().extra_repr()  # type: ignore[misc]
        options = self.approx_options.describe()
        return f"{base}, {options}" if base else options

"""Choose between the Triton kernel and the torch reference for one call, and explain failures."""

import importlib
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import Any

import torch

BACKENDS = ("auto", "triton", "reference")
ENVIRONMENT_VARIABLE = "AALCONVERT_KERNELS"
ENVIRONMENT_VALUES = ("auto", "reference")
FALLBACK_ADVICE = (
    "to run the torch reference implementation instead (the same bytes, slower), set the "
    "environment variable AALCONVERT_KERNELS=reference (or pass backend='reference')"
)


class KernelLaunchError(RuntimeError):
    """A Triton kernel could not be imported, compiled or launched; the message names it."""


def use_triton(tensor: torch.Tensor, backend: str) -> bool:
    """True when this call should run the Triton kernel.

    ``auto`` picks Triton for CUDA tensors unless ``AALCONVERT_KERNELS=reference``
    (then every ``auto`` call, i.e. every call the package itself makes, runs the
    torch reference); ``triton`` forces it (CPU tensors then need ``TRITON_INTERPRET=1``).
    """
    chosen = _chosen(backend)
    return chosen == "triton" or (chosen == "auto" and tensor.is_cuda)


def use_cpu_path(tensor: torch.Tensor, backend: str) -> bool:
    """True when this call should run the CPU path: same bytes as the reference, fewer passes.

    ``auto`` picks it for CPU tensors unless ``AALCONVERT_KERNELS=reference``.
    """
    return _chosen(backend) == "auto" and tensor.device.type == "cpu"


def call_op(op: Callable, impl: Callable, tensor: torch.Tensor, *args: Any) -> Any:
    """``op(tensor, *args)``, or its implementation ``impl`` directly where that is all the
    dispatcher would do: a plain tensor, no dispatch or function mode, not traced by
    torch.compile and not wrapped by torch.func. The custom op's dispatch costs about
    0.1 ms of Python per call, as much as packing a small mask."""
    plain = (
        type(tensor) is torch.Tensor
        and not torch.compiler.is_compiling()
        and torch._C._len_torch_dispatch_stack() == 0
        and not torch._C._is_torch_function_mode_enabled()
        and not torch._C._functorch.is_functorch_wrapped_tensor(tensor)
    )
    if not plain:
        return op(tensor, *args)
    with torch.no_grad():  # as the custom op runs it: outputs never require grad
        return impl(tensor, *args)


def _chosen(backend: str) -> str:
    """``backend`` checked, with ``auto`` turned into ``reference`` where the environment asks."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    setting = os.environ.get(ENVIRONMENT_VARIABLE, "auto")
    if setting not in ENVIRONMENT_VALUES:
        raise ValueError(
            f"the environment variable {ENVIRONMENT_VARIABLE} must be one of "
            f"{ENVIRONMENT_VALUES}, got {setting!r}"
        )
    return setting


def triton_module(name: str, kernel: str) -> ModuleType:
    """``aalconvert.kernels.<name>``, importing triton; an ImportError names ``kernel`` and the fallback."""
    try:
        return importlib.import_module(f"aalconvert.kernels.{name}")
    except ImportError as error:
        raise KernelLaunchError(
            f"the Triton kernel {kernel} cannot run: importing triton failed "
            f"({type(error).__name__}: {error}); {FALLBACK_ADVICE}"
        ) from error


@contextmanager
def launching(kernel: str, device: torch.device) -> Iterator[None]:
    """Around one kernel launch: a compile or launch error names ``kernel`` and the fallback."""
    try:
        yield
    except Exception as error:
        raise KernelLaunchError(
            f"the Triton kernel {kernel} failed to compile or launch on {device} "
            f"({type(error).__name__}: {error}); {FALLBACK_ADVICE}"
        ) from error

"""The CPU path's compiled passes (``cpu_kernels.c``): built with the system C compiler at first use.

Quantizing in torch ops takes a dozen passes over memory per tensor (subtract,
divide, round, clamp, pack, ...); on a CPU that took ``auto+approx4`` to
1.6-2.1x BP's step time on ViT-S, ResNet-50 and Llama (1.2-1.6x with these
passes, benchmarks/results/peers_cpu.md). The C file does each direction in one pass, with the
reference's fp32 arithmetic. It is compiled once per process into a
temporary directory (a fraction of a second; ``-march=native`` since it runs
where it is built) and loaded with ctypes, which releases the GIL, so large
tensors are split across ``torch.get_num_threads()`` threads.

Without a working compiler (``CC``, else ``cc``) the CPU path keeps its torch
ops, which give the same bytes: ``unavailable_reason()`` says why, and a
warning says it once. ``AALCONVERT_CPU_KERNELS=torch`` chooses the torch ops
on purpose (to compare the two).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import tempfile
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("cpu_kernels.c")
ENVIRONMENT_VARIABLE = "AALCONVERT_CPU_KERNELS"
# Strict IEEE fp32: no fast-math, no fused multiply-add (the reference rounds every operation);
# -fno-math-errno only lets sqrtf vectorize (errno is its one side effect, the value is the same).
FLAGS = ["-O3", "-std=c99", "-shared", "-fPIC", "-fno-fast-math", "-ffp-contract=off", "-fno-math-errno"]
TUNING = ["-march=native"]  # dropped when the compiler refuses it
PARALLEL_MINIMUM = 1 << 20  # elements under which one thread does the whole tensor

_lock = threading.Lock()
_state: dict[str, object] = {}

_P = ctypes.c_void_p
_I64 = ctypes.c_int64
_I32 = ctypes.c_int32
_SIGNATURES = {
    "companded_bounds": [_P, _I64, _I64, _P, _P],
    "encode_groups": [_P, _I64, _I64, _I32, _I32, _P, _P, _P, _P, _P, _I64, _I64],
    "decode_groups": [_P, _I64, _I64, _I32, _P, _P, _I32, _P, _I64, _I64],
    "group_pairs": [_P, _P, _I64, _I32, _I32, _I32, _P, _P, _P, _P, _P],
    "decode_pairs": [_P, _P, _I64, _I32, _P, _P],
}


def library() -> ctypes.CDLL | None:
    """The compiled kernels, built on the first call; None when they cannot be (see ``unavailable_reason``).

    Called several times per quantized tensor: once built, it answers without the lock."""
    if _torch_chosen():
        return None
    if "library" not in _state:
        with _lock:
            if "library" not in _state:
                loaded, _state["reason"] = _build()
                _state["library"] = loaded  # last: other threads read it without the lock
                if loaded is None:
                    warnings.warn(
                        f"aalconvert: the compiled CPU kernels are unavailable ({_state['reason']}); the CPU "
                        "path quantizes in torch ops instead: the same bytes, several times slower",
                        RuntimeWarning, stacklevel=3)
    return _state["library"]  # type: ignore[return-value]


def unavailable_reason() -> str | None:
    """Why ``library()`` returned None (None when it loaded, or was not tried yet)."""
    if _torch_chosen():
        return f"{ENVIRONMENT_VARIABLE}=torch"
    return _state.get("reason")  # type: ignore[return-value]


def _torch_chosen() -> bool:
    return os.environ.get(ENVIRONMENT_VARIABLE, "native") == "torch"


def _build() -> tuple[ctypes.CDLL | None, str | None]:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        return None, "no C compiler found (set CC)"
    with tempfile.TemporaryDirectory(prefix="aalconvert-") as directory:
        target = Path(directory) / "cpu_kernels.so"
        errors = ""
        for flags in (FLAGS + TUNING, FLAGS):
            done = subprocess.run([compiler, *flags, str(SOURCE), "-o", str(target), "-lm"],
                                  capture_output=True, text=True)
            if done.returncode == 0:
                break
            errors = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"
        else:
            return None, f"{compiler} failed: {errors}"
        try:
            loaded = ctypes.CDLL(str(target))  # the mapping outlives the file, removed with the directory
        except OSError as error:
            return None, f"loading the compiled kernels failed: {error}"
    for name, arguments in _SIGNATURES.items():
        function = getattr(loaded, name)
        function.argtypes, function.restype = arguments, None
    return loaded, None


def _address(tensor: torch.Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


def companded_bounds(flat: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group of contiguous fp32 ``flat``, the min and max of ``quantize.compand`` of its values (NaN where
    one is NaN), without making the companded tensor."""
    groups = -(-flat.numel() // group_size)
    lows, highs = torch.empty(groups), torch.empty(groups)
    library().companded_bounds(flat.data_ptr(), flat.numel(), group_size, lows.data_ptr(), highs.data_ptr())
    return lows, highs


def group_pairs(low: torch.Tensor, high: torch.Tensor, levels: int, scale_dtype: torch.dtype, lift: bool
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``quantize.group_pairs`` of contiguous fp32 ``low`` and ``high``: (mins, scales) as stored, the fp32
    (min, step) encoding uses, and ``encode_groups``' flags (the lift where ``lift``, i.e. nearest rounding)."""
    groups = low.numel()
    mins, steps = (torch.empty(groups, dtype=torch.int16) for _ in range(2))
    min_values, step_values = torch.empty(groups), torch.empty(groups)
    flags = torch.empty(groups, dtype=torch.uint8)
    library().group_pairs(low.data_ptr(), high.data_ptr(), groups, levels, int(scale_dtype == torch.bfloat16),
                          int(lift), mins.data_ptr(), steps.data_ptr(), min_values.data_ptr(), step_values.data_ptr(),
                          flags.data_ptr())
    return mins.view(scale_dtype), steps.view(scale_dtype), min_values, step_values, flags


def decode_pairs(mins: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize.decoded_min_and_step`` of contiguous stored pairs: the fp32 (min, step) per group."""
    groups = mins.numel()
    min_values, step_values = torch.empty(groups), torch.empty(groups)
    library().decode_pairs(mins.data_ptr(), scales.data_ptr(), groups, int(scales.dtype == torch.bfloat16),
                           min_values.data_ptr(), step_values.data_ptr())
    return min_values, step_values


def encode_groups(flat: torch.Tensor, group_size: int, bits: int, companded: bool, lows: torch.Tensor,
                  steps: torch.Tensor, flags: torch.Tensor, noise: torch.Tensor | None, out: torch.Tensor) -> None:
    """Codes of contiguous fp32 ``flat`` (companded first where ``companded``) into ``out`` (uint8), per group
    (fp32 ``lows`` and ``steps``, uint8 ``flags``: bit 0 gets codes, bit 1 the sign-preserving lift);
    ``noise``: stochastic offsets or None."""
    kernel = library().encode_groups
    pointers = (flat.data_ptr(), flat.numel(), group_size, bits, int(companded), lows.data_ptr(), steps.data_ptr(),
                flags.data_ptr(), _address(noise), out.data_ptr())
    _over_groups(lambda first, last: kernel(*pointers, first, last), lows.numel(), flat.numel())


def decode_groups(codes: torch.Tensor, numel: int, group_size: int, bits: int, lows: torch.Tensor,
                  steps: torch.Tensor, companded: bool) -> torch.Tensor:
    """fp32 values of ``numel`` packed codes, per group (fp32 ``lows`` and ``steps``), squared back if companded."""
    out = torch.empty(numel, dtype=torch.float32)
    kernel = library().decode_groups
    pointers = (codes.data_ptr(), numel, group_size, bits, lows.data_ptr(), steps.data_ptr(), int(companded),
                out.data_ptr())
    _over_groups(lambda first, last: kernel(*pointers, first, last), lows.numel(), numel)
    return out


def _over_groups(run, groups: int, numel: int) -> None:
    """``run(first, last)`` over all groups: in one call, or split across torch's CPU threads."""
    threads = min(torch.get_num_threads(), groups)
    if threads <= 1 or numel < PARALLEL_MINIMUM:
        run(0, groups)
        return
    bounds = [groups * k // threads for k in range(threads + 1)]
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(run, bounds[:-1], bounds[1:]))

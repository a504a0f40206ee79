"""Every Triton kernel compiles for real GPUs, without one; and a failing kernel names the fallback.

The interpreter (``TRITON_INTERPRET=1``) that the other kernel tests use on CPU
never compiles anything, so a kernel can pass them all and still fail to
compile for a GPU. Here each kernel is compiled to PTX and cubin (ptxas ships
in the triton wheel) with ``triton.compile(ASTSource(...), target=GPUTarget(
"cuda", arch, 32))``, which needs no device.

Which specializations: the launchers decide them, so they are read off the
launchers, not listed by hand. Each launcher of ``triton_bitpack.py`` and
``triton_quantize.py`` runs on small CPU tensors with its kernel replaced by a
recorder, for every value of the constants the package launches with (bits in
``SUPPORTED_BITS``, input dtypes in ``SUPPORTED_INPUT_DTYPES``, scale dtypes in
the launcher's ``_TRITON_SCALE_DTYPES``, nearest/stochastic, every companding
``check_companding`` accepts, every decoding in ``_DECODE_CODES``, the group
sizes of ``DEFAULT_GROUP_SIZE``, ``quantize``'s default, 8, a non-power of two
and ``MAX_GROUP_SIZE``), and at three kinds of size, each of which Triton
specializes differently: "ones" (one element, so every size argument is 1 and
Triton turns it into a constant; with a seed whose key_low is 1 as well; key_high
cannot be 1 for a seed below 2**63), "plain" (odd sizes, an input not 16-byte
aligned) and "aligned" (every size and key a multiple of 16). Triton's own
binder then turns each recorded call into the (signature, constants,
attributes, options) that a real launch on that GPU would compile.

What is compiled, for CI time (230 compiles, about 5 CPU-minutes: quantize ~2 s
each, dequantize ~0.5 s, bitpack ~0.3 s; up to 4 worker processes; measured 12
minutes wall on a 2-core machine shared with other jobs):

- sm_90: every type specialization (kernel x bits x input/output dtype x scale
  dtype x rounding x companding x decoding) at the package's default group size
  for those bits, plain sizes; plus every group size x bits of quantize and
  dequantize at one type combination; plus the "ones" and "aligned" sizes for
  every rounding/companding/scale dtype (one input dtype) and every bitpack dtype.
- sm_80: a representative subset: every type specialization of bitpack, and of
  quantize/dequantize every (input or output dtype, scale dtype, rounding or
  companding) at 4 bits and every bits at one combination, plain sizes.

The IR also shows what the interpreter hides: the PTX of launches that pass
``enable_fp_fusion=False`` has no ``fma`` and the SASS no FFMA (control: with
fusion allowed the same kernel does fuse), division and square root are the
IEEE ``div.rn``/``sqrt.rn``, and the bf16 output path tests NaN before its
integer rounding.
"""

import contextlib
import importlib.util
import inspect
import math
import os
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from types import ModuleType, SimpleNamespace

import pytest
import torch

from aalconvert.kernels import dequantize, pack_bits, quantize, unpack_bits
from aalconvert.kernels.dispatch import KernelLaunchError, use_triton
from aalconvert.nn.approx_common import DEFAULT_GROUP_SIZE

# The submodules by name: ``aalconvert.kernels.quantize`` the attribute is the function.
bitpack = importlib.import_module("aalconvert.kernels.bitpack")
quantize_module = importlib.import_module("aalconvert.kernels.quantize")

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

ARCHES = (90, 80)
FULL_ARCH = 90
SIZE_CASES = ("plain", "ones", "aligned")
_MASK32 = 0xFFFFFFFF


# ------------------------------------------------------------ compilable kernels


def load_compilable(name: str) -> ModuleType:
    """A private copy of ``aalconvert.kernels.<name>`` whose kernels are compilable JITFunctions.

    The suite runs with ``TRITON_INTERPRET=1`` (tests/conftest.py), under which
    ``@triton.jit`` makes interpreter objects; the copy is executed without it.
    """
    original = importlib.import_module(f"aalconvert.kernels.{name}")
    spec = importlib.util.spec_from_file_location(f"_compilable_{name}", original.__file__)
    module = importlib.util.module_from_spec(spec)
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("TRITON_INTERPRET", raising=False)
        spec.loader.exec_module(module)
    module._check_device = lambda tensor, name: None  # CPU tensors stand in for CUDA ones
    return module


BITPACK = load_compilable("triton_bitpack")
QUANTIZE = load_compilable("triton_quantize")
KERNELS = {
    name: getattr(module, name)
    for module in (BITPACK, QUANTIZE)
    for name, value in vars(module).items()
    if isinstance(value, JITFunction) and name.endswith("_kernel")
}


class Recorder:
    """Stands in for a kernel: ``kernel[grid](*args, **kwargs)`` records the call instead of launching."""

    def __init__(self) -> None:
        self.calls: list[tuple[tuple, dict]] = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((args, kwargs))


def record(module: ModuleType, kernel: str, launch) -> tuple[tuple, dict]:
    """(args, kwargs) of the one launch of ``kernel`` that ``launch()`` makes."""
    recorder, real = Recorder(), getattr(module, kernel)
    setattr(module, kernel, recorder)
    try:
        launch()
    finally:
        setattr(module, kernel, real)
    assert len(recorder.calls) == 1, f"{kernel}: expected one launch, got {len(recorder.calls)}"
    return recorder.calls[0]


# --------------------------------------------------------- the launchers' choices


def _unmix32(h: int) -> int:
    """Inverse of ``quantize.mix32`` (a bijection on 32-bit integers)."""
    h ^= h >> 16
    h = (h * pow(0x846CA68B, -1, 2**32)) & _MASK32
    h ^= (h >> 15) ^ (h >> 30)
    h = (h * pow(0x7FEB352D, -1, 2**32)) & _MASK32
    return h ^ (h >> 16)


def seed_for(case: str) -> int:
    """A valid seed whose (key_low, key_high) fall in ``case``'s class (checked with ``seed_keys``)."""
    targets = {"ones": (1, 0x2345677), "plain": (0x3456789, 0x2345677), "aligned": (16, 16)}[case]
    low = _unmix32(targets[0])
    high_target = targets[1]
    while True:  # key_high's seed half must stay below 2**31 (seeds < 2**63)
        high = _unmix32(high_target) ^ 0x5BD1E995
        if high < 2**31:
            break
        high_target += 16 if case == "aligned" else 2
    seed = low | (high << 32)
    key_low, key_high = quantize_module.seed_keys(seed)
    assert (key_low, key_high) == (targets[0], high_target), "seed_keys changed: update _unmix32"
    return seed


def input_tensor(numel: int, dtype: torch.dtype, case: str) -> torch.Tensor:
    """``numel`` elements; in the "plain" case one element past an aligned start (not 16-byte aligned)."""
    if case == "plain":
        return torch.zeros(numel + 1, dtype=dtype)[1:]
    return torch.zeros(numel, dtype=dtype)


def numel_for(case: str, group: int) -> int:
    """Elements for a size case: 1, an odd count over three groups and a bit, or 32 whole groups."""
    return {"ones": 1, "plain": 3 * group + 5, "aligned": 32 * group}[case]


def group_sizes() -> list[int]:
    """Group sizes the package launches with, and the launcher's limits."""
    default = inspect.signature(quantize_module.quantize).parameters["group_size"].default
    return sorted({8, 24, default, *DEFAULT_GROUP_SIZE.values(), QUANTIZE.MAX_GROUP_SIZE})


PACK_DTYPES = (torch.bool, torch.float64, *quantize_module.SUPPORTED_INPUT_DTYPES)
UNPACK_DTYPES = (torch.float64, *quantize_module.SUPPORTED_INPUT_DTYPES)


@dataclass(frozen=True)
class Launch:
    """One recorded launch: the kernel, what the launcher was asked, and the arguments it passed."""

    kernel: str
    label: str
    axes: dict = field(hash=False, compare=False)
    args: tuple = field(hash=False, compare=False)
    kwargs: dict = field(hash=False, compare=False)


BITPACK_NUMEL = {"ones": 1, "plain": 299, "aligned": 512}  # 38 / 64 packed bytes


def bitpack_launches() -> list[Launch]:
    launches = []
    for case in SIZE_CASES:
        for dtype in PACK_DTYPES:
            numel = BITPACK_NUMEL[case]
            x = input_tensor(numel, dtype, case)
            args, kwargs = record(BITPACK, "_pack_bits_kernel", lambda: BITPACK.pack_bits_triton(x))
            axes = dict(dtype=dtype, case=case)
            launches.append(Launch("_pack_bits_kernel", f"pack {dtype} {case}", axes, args, kwargs))
        for decode in BITPACK._DECODE_CODES:
            for dtype in (torch.uint8,) if decode == "bool" else UNPACK_DTYPES:
                numel = BITPACK_NUMEL[case]
                packed = input_tensor(math.ceil(numel / 8), torch.uint8, case)
                args, kwargs = record(BITPACK, "_unpack_bits_kernel",
                                      lambda: BITPACK.unpack_bits_triton(packed, (numel,), decode, dtype))
                axes = dict(decode=decode, dtype=dtype, case=case)
                launches.append(Launch("_unpack_bits_kernel", f"unpack {decode} {dtype} {case}",
                                       axes, args, kwargs))
    return launches


def rounding_modes() -> list[tuple[bool, str]]:
    """(stochastic, companding) pairs that ``quantize`` accepts."""
    modes = []
    for stochastic in (False, True):
        for companding in quantize_module.COMPANDINGS:
            with contextlib.suppress(ValueError):
                quantize_module.check_companding(companding, stochastic)
                modes.append((stochastic, companding))
    return modes


def quantize_launches() -> list[Launch]:
    assert set(QUANTIZE._TRITON_SCALE_DTYPES) == set(quantize_module.SUPPORTED_SCALE_DTYPES)
    launches = []
    for case in SIZE_CASES:
        for group in group_sizes():
            for bits in quantize_module.SUPPORTED_BITS:
                numel = numel_for(case, group)
                for scale_dtype in quantize_module.SUPPORTED_SCALE_DTYPES:
                    for dtype in quantize_module.SUPPORTED_INPUT_DTYPES:
                        for stochastic, companding in rounding_modes():
                            # quantize() passes seed 0 to nearest rounding, a drawn seed otherwise
                            seed = seed_for(case) if stochastic else 0
                            x = input_tensor(numel, dtype, case)
                            args, kwargs = record(QUANTIZE, "_quantize_kernel", lambda: QUANTIZE.quantize_triton(
                                x, bits, group, stochastic, scale_dtype, seed, companding))
                            axes = dict(bits=bits, group=group, dtype=dtype, scale_dtype=scale_dtype,
                                        stochastic=stochastic, companding=companding, case=case)
                            launches.append(Launch(
                                "_quantize_kernel",
                                f"quantize {bits}b g{group} {dtype} {scale_dtype} "
                                f"{'stochastic' if stochastic else 'nearest'} {companding} {case}",
                                axes, args, kwargs))
                        groups = math.ceil(numel / group)
                        for companding in quantize_module.COMPANDINGS:
                            codes = input_tensor(math.ceil(numel * bits / 8), torch.uint8, case)
                            mins = torch.zeros(groups, dtype=scale_dtype)
                            scales = torch.zeros(groups, dtype=scale_dtype)
                            args, kwargs = record(QUANTIZE, "_dequantize_kernel", lambda: QUANTIZE.dequantize_triton(
                                codes, mins, scales, [numel], dtype, bits, group, companding))
                            axes = dict(bits=bits, group=group, dtype=dtype, scale_dtype=scale_dtype,
                                        companding=companding, case=case)
                            launches.append(Launch(
                                "_dequantize_kernel",
                                f"dequantize {bits}b g{group} {dtype} {scale_dtype} {companding} {case}",
                                axes, args, kwargs))
    return launches


ALL_LAUNCHES = bitpack_launches() + quantize_launches()


def specialization(launch: Launch, arch: int) -> tuple[dict, dict, dict, object]:
    """(signature, constexprs, attrs, options) that a launch with these arguments compiles for ``arch``.

    Triton's own binder and ``_pack_args`` (what ``JITFunction.run`` calls), so
    integers equal to 1 become constants and 16-divisible ones get the attribute.
    """
    kernel = KERNELS[launch.kernel]
    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, spec, options = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, launch.kwargs, bound, spec, options)
    return signature, constexprs, attrs, options


def specialization_key(launch: Launch, arch: int) -> str:
    signature, constexprs, attrs, options = specialization(launch, arch)
    return repr((launch.kernel, sorted(signature.items()), sorted(constexprs.items(), key=str),
                 sorted((k, repr(v)) for k, v in attrs.items()), sorted(options.__dict__.items())))


def default_group(axes: dict) -> bool:
    return axes["group"] == DEFAULT_GROUP_SIZE[axes["bits"]]


def selected(launch: Launch, arch: int) -> bool:
    """Whether ``launch`` is compiled for ``arch`` (the plan in the module docstring)."""
    a = launch.axes
    if "bits" not in a:  # bitpack: every specialization, plain sizes on sm_80
        return arch == FULL_ARCH or a["case"] == "plain"
    quant = launch.kernel == "_quantize_kernel"
    heavy = dict(dtype=torch.bfloat16, scale_dtype=torch.float16,
                 stochastic=True, companding="none") if quant else dict(
                     dtype=torch.bfloat16, scale_dtype=torch.float16, companding="sqrt")
    at_heavy = all(a[k] == v for k, v in heavy.items())
    if arch == FULL_ARCH:
        types = a["case"] == "plain" and default_group(a)
        groups = a["case"] == "plain" and at_heavy
        cases = a["case"] != "plain" and default_group(a) and a["bits"] == 4 and a["dtype"] == torch.float32
        return types or groups or cases
    if a["case"] != "plain" or not default_group(a):
        return False
    return a["bits"] == 4 or at_heavy


def compile_plan() -> list[tuple[int, Launch]]:
    """(arch, launch) pairs to compile, one per distinct specialization."""
    plan, seen = [], set()
    for arch in ARCHES:
        for launch in ALL_LAUNCHES:
            if selected(launch, arch):
                key = (arch, specialization_key(launch, arch))
                if key not in seen:
                    seen.add(key)
                    plan.append((arch, launch))
    return plan


PLAN = compile_plan()


def compile_launch(launch: Launch, arch: int, **option_overrides):
    """The CompiledKernel of ``launch`` for ``arch`` (PTX and cubin)."""
    signature, constexprs, attrs, options = specialization(launch, arch)
    source = ASTSource(KERNELS[launch.kernel], signature, constexprs, attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32),
                          options={**options.__dict__, **option_overrides})


LAUNCHES_BY_LABEL = {launch.label: launch for launch in ALL_LAUNCHES}
assert len(LAUNCHES_BY_LABEL) == len(ALL_LAUNCHES)


def _special(kernel: str, arch: int, overrides: dict | None = None, **axes) -> tuple:
    matches = [launch for launch in ALL_LAUNCHES if launch.kernel == kernel
               and all(launch.axes.get(k) == v for k, v in axes.items())]
    assert matches, (kernel, axes)
    return (arch, matches[0].label, overrides or {}, True)


# Compiled once more with their PTX and SASS kept, for the tests that read the IR.
SPECIAL = {
    **{f"dequantize-unfused-sm{arch}": _special(
        "_dequantize_kernel", arch, bits=4, dtype=torch.float32, scale_dtype=torch.float16,
        companding="none", case="plain", group=64) for arch in ARCHES},
    **{f"dequantize-fused-sm{arch}": _special(
        "_dequantize_kernel", arch, dict(enable_fp_fusion=True), bits=4, dtype=torch.float32,
        scale_dtype=torch.float16, companding="none", case="plain", group=64) for arch in ARCHES},
    "quantize-sqrt": _special("_quantize_kernel", FULL_ARCH, bits=4, dtype=torch.float32,
                              scale_dtype=torch.float16, stochastic=False, companding="sqrt",
                              case="plain", group=64),
    "dequantize-bf16-out": _special("_dequantize_kernel", FULL_ARCH, bits=4, dtype=torch.bfloat16,
                                    scale_dtype=torch.bfloat16, companding="none", case="plain",
                                    group=64),
}


def _compile_job(job: tuple) -> dict:
    """Compile one (arch, label, option overrides, keep asm) job; facts about the result, or the error.

    Runs in a process started without TRITON_INTERPRET: triton's own @jit library
    functions (tl.sum, tl.max, ...) are interpreter objects in a process that
    imported triton under it, and could not be compiled there.
    """
    arch, label, overrides, keep_asm = job
    start = time.perf_counter()
    try:
        compiled = compile_launch(LAUNCHES_BY_LABEL[label], arch, **overrides)
    except Exception as error:  # reported by the test, with the specialization
        return dict(ok=False, error=f"{type(error).__name__}: {error}", seconds=time.perf_counter() - start)
    ptx = compiled.asm["ptx"]
    facts = dict(ok=True, seconds=time.perf_counter() - start, fma=len(re.findall(r"\bfma\.", ptx)),
                 cubin_bytes=len(compiled.asm.get("cubin", b"")),
                 unrounded_float_ops=re.findall(r"^\s*((?:add|sub|mul)\.f32)\s", ptx, re.M))
    if keep_asm:
        from triton.tools.disasm import get_sass

        facts.update(ptx=ptx, sass=get_sass(compiled.asm["cubin"]))
    return facts


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict:
    """{"plan": facts per PLAN index, "special": facts per SPECIAL name}, compiled in fresh
    processes (spawned without TRITON_INTERPRET, a fresh Triton cache), up to 4 at a time."""
    cache = tmp_path_factory.mktemp("triton_cache")
    jobs = [(arch, launch.label, {}, False) for arch, launch in PLAN] + list(SPECIAL.values())
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRITON_CACHE_DIR", str(cache))
        patch.delenv("TRITON_INTERPRET", raising=False)
        workers = max(1, min(4, os.cpu_count() or 1))
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            results = list(pool.map(_compile_job, jobs))
    return dict(plan=dict(enumerate(results[: len(PLAN)])),
                special=dict(zip(SPECIAL, results[len(PLAN):])))


# ------------------------------------------------------------------------- tests


def test_specializations_come_from_every_launcher_and_cover_every_size_class():
    assert {launch.kernel for launch in ALL_LAUNCHES} == set(KERNELS) == {
        "_pack_bits_kernel", "_unpack_bits_kernel", "_quantize_kernel", "_dequantize_kernel"}
    # For every integer argument of every kernel: some compiled launch has it as the
    # constant 1, some with the divisible-by-16 attribute and some with neither.
    for name, kernel in KERNELS.items():
        integer_params = [p.name for p in kernel.params if not p.is_constexpr and not p.name.endswith("_ptr")]
        classes = {param: set() for param in integer_params}
        for arch, launch in PLAN:
            if launch.kernel != name or arch != FULL_ARCH:
                continue
            signature, constexprs, attrs, _ = specialization(launch, arch)
            names = list(signature)
            for param in integer_params:
                index = names.index(param)
                if signature[param] == "constexpr":
                    classes[param].add(constexprs[(index,)])
                else:
                    classes[param].add("D" if attrs.get((index,)) else "plain")
        # key_high cannot be 1 (a seed below 2**63 never gives it), so it has two classes
        expected = {param: {1, "D", "plain"} for param in integer_params}
        if "key_high" in expected:
            expected["key_high"] = {"D", "plain"}
        assert classes == expected, name


@pytest.mark.parametrize("index", range(len(PLAN)),
                         ids=[f"sm{arch}-{launch.label}" for arch, launch in PLAN])
def test_kernel_compiles_to_ptx_and_cubin_for_a_real_gpu(compiled, index):
    result = compiled["plan"][index]
    assert result["ok"], f"sm_{PLAN[index][0]} {PLAN[index][1].label}: {result['error']}"
    assert result["cubin_bytes"] > 0
    # No kernel rounds a product and a sum as one fma: launches that pass
    # enable_fp_fusion=False must not fuse, and the bitpack kernels have nothing to fuse.
    assert result["fma"] == 0
    # Without fusion every f32 add/mul is emitted with an explicit .rn, which ptxas may not contract.
    assert result["unrounded_float_ops"] == []


def test_compile_plan_covers_both_targets_and_every_kernel():
    for arch in ARCHES:
        assert {launch.kernel for a, launch in PLAN if a == arch} == set(KERNELS)


@pytest.mark.parametrize("arch", ARCHES)
def test_dequantize_does_not_fuse_to_ffma_in_sass_while_fusion_would(compiled, arch):
    """The interpreter rounds min + code * scale twice anyway; a GPU would fuse it unless told not to."""
    assert LAUNCHES_BY_LABEL[SPECIAL[f"dequantize-unfused-sm{arch}"][1]].kwargs["enable_fp_fusion"] is False
    unfused = compiled["special"][f"dequantize-unfused-sm{arch}"]
    fused = compiled["special"][f"dequantize-fused-sm{arch}"]
    assert unfused["ok"] and fused["ok"], (unfused.get("error"), fused.get("error"))
    assert "fma.rn.f32" in fused["ptx"] and "fma." not in unfused["ptx"]
    assert "FFMA" in fused["sass"] and "FFMA" not in unfused["sass"]


def test_quantize_divides_and_takes_square_roots_correctly_rounded(compiled):
    result = compiled["special"]["quantize-sqrt"]
    assert result["ok"], result.get("error")
    assert "div.rn.f32" in result["ptx"] and "sqrt.rn.f32" in result["ptx"]
    assert not re.search(r"\b(div|sqrt|rcp)\.(approx|full)", result["ptx"])


def test_bfloat16_output_tests_nan_before_its_integer_rounding(compiled):
    """GPU maths makes NaN as 0x7FFFFFFF, whose integer rounding would give -0.0; the kernel
    checks for NaN and stores 0x7FC0. The check must survive compilation (no fast-math folding)."""
    result = compiled["special"]["dequantize-bf16-out"]
    assert result["ok"], result.get("error")
    assert "setp.nan.f32" in result["ptx"]
    assert re.search(r"\b(32704|0x7FC0|0x7fc0)\b", result["ptx"])
    assert not re.search(r"cvt\.rn\.bf16\.f32", result["ptx"])  # rounded by the integer path


# ---------------------------------------------------- run-time failure and fallback


class FailingKernel:
    """A kernel whose launch fails as a compile error would."""

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            raise RuntimeError("simulated: PTX assembly aborted")
        return launch


@pytest.mark.parametrize("op, module, kernel", [
    ("pack", "triton_bitpack", "_pack_bits_kernel"),
    ("unpack", "triton_bitpack", "_unpack_bits_kernel"),
    ("quantize", "triton_quantize", "_quantize_kernel"),
    ("dequantize", "triton_quantize", "_dequantize_kernel"),
])
def test_a_failing_kernel_names_itself_and_the_reference_fallback(monkeypatch, op, module, kernel):
    real = importlib.import_module(f"aalconvert.kernels.{module}")
    x = torch.randn(100)
    q = quantize(x, backend="reference")
    packed = pack_bits(x, backend="reference")
    monkeypatch.setattr(real, kernel, FailingKernel())
    calls = {
        "pack": lambda: pack_bits(x, backend="triton"),
        "unpack": lambda: unpack_bits(packed, x.shape, backend="triton"),
        "quantize": lambda: quantize(x, backend="triton"),
        "dequantize": lambda: dequantize(q, backend="triton"),
    }
    with pytest.raises(KernelLaunchError, match=kernel) as info:
        calls[op]()
    message = str(info.value)
    assert "AALCONVERT_KERNELS=reference" in message and "PTX assembly aborted" in message
    assert isinstance(info.value.__cause__, RuntimeError)


def test_missing_triton_names_the_kernel_and_the_fallback(monkeypatch):
    monkeypatch.delitem(sys.modules, "aalconvert.kernels.triton_bitpack", raising=False)
    monkeypatch.setitem(sys.modules, "triton", None)  # import triton now raises ImportError
    with pytest.raises(KernelLaunchError, match="_pack_bits_kernel.*AALCONVERT_KERNELS=reference"):
        pack_bits(torch.randn(10), backend="triton")


def test_environment_variable_sends_cuda_tensors_to_the_reference(monkeypatch):
    cuda_tensor = SimpleNamespace(is_cuda=True)  # use_triton reads only .is_cuda
    monkeypatch.delenv("AALCONVERT_KERNELS", raising=False)
    assert use_triton(cuda_tensor, "auto")
    monkeypatch.setenv("AALCONVERT_KERNELS", "reference")
    assert not use_triton(cuda_tensor, "auto")
    assert not use_triton(cuda_tensor, "reference")
    assert use_triton(cuda_tensor, "triton")  # an explicit request is honoured
    monkeypatch.setenv("AALCONVERT_KERNELS", "refrence")
    with pytest.raises(ValueError, match="AALCONVERT_KERNELS must be one of"):
        use_triton(cuda_tensor, "auto")


def test_with_the_fallback_set_every_auto_op_runs_the_reference_even_where_triton_fails(monkeypatch):
    """A CUDA machine whose Triton is broken: with AALCONVERT_KERNELS=reference nothing reaches it.

    Simulated on CPU: ``use_triton`` is made to see every tensor as CUDA and every
    launcher raises; with the variable set, the ops give the reference's bytes.
    """
    import aalconvert.kernels.dispatch as dispatch

    def broken(*args, **kwargs):
        raise AssertionError("the Triton path was taken")

    for module in (bitpack, quantize_module):
        monkeypatch.setattr(module, "triton_module", broken)
    real_use_triton = dispatch.use_triton
    as_if_cuda = lambda tensor, backend: real_use_triton(SimpleNamespace(is_cuda=True), backend)  # noqa: E731
    monkeypatch.setattr(bitpack, "use_triton", as_if_cuda)
    monkeypatch.setattr(quantize_module, "use_triton", as_if_cuda)
    x = torch.randn(1000)
    with pytest.raises(AssertionError, match="Triton path"):
        pack_bits(x)  # without the variable, auto goes to Triton on "CUDA"
    monkeypatch.setenv("AALCONVERT_KERNELS", "reference")
    assert torch.equal(pack_bits(x), pack_bits(x, backend="reference"))
    packed = pack_bits(x)
    assert torch.equal(unpack_bits(packed, x.shape), unpack_bits(packed, x.shape, backend="reference"))
    q = quantize(x, 4, stochastic=True, seed=3)
    reference = quantize(x, 4, stochastic=True, seed=3, backend="reference")
    assert all(torch.equal(a, b) for a, b in zip(q.tensors(), reference.tensors()))
    assert torch.equal(dequantize(q), dequantize(q, backend="reference"))

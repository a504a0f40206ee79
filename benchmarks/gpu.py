"""Everything that needs a GPU, in one command: run it first whenever a CUDA GPU is available.

    python benchmarks/gpu.py                 # < 8 minutes on one H100/H200-class GPU
    python benchmarks/gpu.py --readme        # rewrite README's "GPU" section from the newest result

Steps, in order, each in its own process with its own time limit (a failure,
a crash or a CUDA error that poisons the process is recorded as that step's
status, duration and error, and the next step runs):

1. ``kernel_tests``: ``pytest tests/test_kernels_bitpack.py tests/test_kernels_quantize.py``
   with every Triton launcher running on the GPU (the tests build CPU tensors and
   compare ``backend="triton"`` with the reference byte for byte; a pytest plugin
   here moves the launchers' inputs to CUDA and their outputs back).
2. ``kernel_throughput``: pack/unpack and quantize/dequantize GB/s next to ``clone()``
   (``benchmarks/kernels.py``'s ``measure``); target >= 0.8x clone.
3. ``layers``: ``benchmarks/layers.py``'s rows (variant time / torch layer time and
   bytes kept) at ResNet-50 and ViT-B/16 shapes, then the other shapes while time lasts.
4. ``memory``: ``benchmarks/memory.py``'s step peak per rule set / BP and the largest
   batch under a memory cap per rule set, ResNet and ViT examples.
5. ``predicted_peak``: ``aalconvert.inspect(...).totals`` predicted step peak vs
   ``torch.cuda.max_memory_allocated`` per example, BP and converted.
6. ``amp``: one bf16-autocast and one fp16-autocast + ``torch.amp.GradScaler``
   training step per rule set.
7. ``compile``: a ``torch.compile`` (inductor) training step of one converted example
   against eager.
8. ``peers``: issue 14's target on the GPU, on ``benchmarks/peers.py``'s Hugging Face
   Llama at GPU sizes: BP, ``torch.utils.checkpoint`` per block, and the planner at
   checkpointing's measured step peak and at a kept budget of its measured bytes kept;
   bytes kept and step peak from the CUDA allocator, step times synchronized, every
   method stepped once per round, and ``peers.target_verdict`` read from them.

Writes ``benchmarks/results/gpu_<device>_<date>.json`` and ``.md`` (a summary); the
README's "GPU" section is rendered from the newest such file (``render_readme_section``).
Without a CUDA device it prints one line and exits 0. Every step function takes a
device and a ``Sizes`` so that the tests run them on CPU at tiny sizes.
"""

import argparse
import contextlib
import datetime
import importlib.util
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import torch

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
RESULTS = BENCHMARKS / "results"
README = ROOT / "README.md"
sys.path.insert(0, str(ROOT))  # examples/

TOTAL_BUDGET_S = 450.0
"""Hard limit of all steps together (seconds); the issue allows 8 minutes."""
KERNEL_TEST_FILES = ("tests/test_kernels_bitpack.py", "tests/test_kernels_quantize.py")
THROUGHPUT_TARGET = 0.8
"""Issue target: kernel GB/s at least this fraction of clone()'s."""
PEAK_TOLERANCE = 0.05
"""Issue target: predicted step peak within 5 % of measured."""
README_SECTION = "GPU"


# ----------------------------------------------------------------------------- sizes


@dataclass(frozen=True)
class Sizes:
    """What each step runs; ``full()`` on a GPU, ``tiny()`` for CPU tests. Budgets in seconds."""

    budgets: dict[str, float]
    kernel_test_args: tuple[str, ...] = KERNEL_TEST_FILES
    throughput_sizes: tuple[str, ...] = ("16MB", "256MB", "1GB")
    throughput_dtypes: tuple[str, ...] = ("float32", "bfloat16")
    throughput_repeats: int = 10
    layer_batch: int = 64
    layer_quick: bool = False
    layer_repeats: int = 5
    layer_models: tuple[str, ...] = ("ResNet-50", "ViT-B/16")
    memory_examples: tuple[str, ...] = ("resnet_bottleneck", "vit")
    memory_batch: int = 64
    memory_rules: tuple[str, ...] = ("exact", "ara", "asa", "approx4", "auto", "auto+approx4")
    memory_cap_gib: float | None = 2.0
    memory_rounds: int = 3
    peak_batch: int = 32
    peak_examples: tuple[str, ...] | None = None  # None: every example
    peak_rules: tuple[str, ...] = ("bp", "auto")
    amp_examples: tuple[str, ...] = ("resnet_bottleneck", "vit")
    amp_batch: int = 16
    amp_rules: tuple[str, ...] = ("exact", "recompute", "ara", "asa", "approx8", "approx4", "auto",
                                  "auto+approx4")
    compile_example: str = "resnet_basic"
    compile_rules: str = "auto"
    compile_batch: int = 32
    compile_backend: str = "inductor"
    peers_batch: int = 8
    peers_tokens: int = 512
    peers_llama: dict = field(default_factory=lambda: {
        "hidden_size": 1024, "num_hidden_layers": 4, "intermediate_size": 2816, "num_attention_heads": 16,
        "num_key_value_heads": 8, "vocab_size": 32000})
    peers_rounds: int = 30
    example_overrides: dict[str, dict] = field(default_factory=dict)

    @classmethod
    def full(cls) -> "Sizes":
        return cls(budgets=dict(kernel_tests=110, kernel_throughput=35, layers=50, memory=50,
                                predicted_peak=35, amp=40, compile=40, peers=90))

    @classmethod
    def tiny(cls) -> "Sizes":
        """Seconds on a CPU: small shapes, few repeats, a C++-free compile backend."""
        small = {
            "resnet_basic": dict(width=4, layers=(1, 1, 1, 1), image_size=16),
            "resnet_bottleneck": dict(width=4, layers=(1, 1, 1, 1), image_size=16),
            "vit": dict(dim=32, depth=1, image_size=16),
            "transformer": dict(), "bert": dict(), "mixer": dict(), "gpt": dict(),
        }
        return cls(
            budgets={name: 120 for name in STEP_NAMES},
            kernel_test_args=("tests/test_kernels_bitpack.py", "-k", "layout_puts_element"),
            throughput_sizes=("64KB",), throughput_dtypes=("float32",), throughput_repeats=1,
            layer_batch=2, layer_quick=True, layer_repeats=1, layer_models=("ResNet-50",),
            memory_examples=("resnet_basic",), memory_batch=2, memory_rules=("exact", "approx4"),
            memory_cap_gib=None, memory_rounds=1,
            peak_batch=2, peak_rules=("bp", "approx4"), peak_examples=("resnet_basic", "gpt"),
            amp_examples=("vit",), amp_batch=2, amp_rules=("exact", "approx4"),
            compile_batch=2, compile_backend="aot_eager", example_overrides=small,
            peers_batch=2, peers_tokens=16, peers_rounds=2,
            peers_llama={"hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128,
                         "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256},
        )


# ----------------------------------------------------------------------------- helpers


def load_benchmark(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` as a module (they are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()})"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def example_model(name: str, batch: int, device: torch.device, sizes: Sizes):
    """(model, inputs) of an example on ``device``, seeded, with the sizes' overrides."""
    from examples import EXAMPLES

    overrides = sizes.example_overrides.get(name, {})
    torch.manual_seed(0)
    model = EXAMPLES[name].build_model(**overrides).to(device)
    inputs = tuple(t.to(device) for t in EXAMPLES[name].example_inputs(batch, **overrides))
    return model, inputs


def convert(model, rules: str, inputs: tuple):
    """``rules`` as the benchmarks name them ("bp", "auto+approx4", ...) applied to ``model``."""
    import aalconvert

    if rules == "bp":
        return model
    return aalconvert.convert(model, rules.split("+"), example_inputs=inputs)


class Deadline:
    """Seconds left of a step's budget; long steps stop between measurements when it runs out."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def passed(self, reserve: float = 0.0) -> bool:
        return self.left() <= reserve


# --------------------------------------------------------------- step 1: kernel tests


class KernelsOnDevice:
    """pytest plugin: each Triton launcher runs on ``device``, taking and returning CPU tensors.

    The kernel tests build CPU tensors and call ``backend="triton"``; with this
    plugin the launch happens on the GPU and the bytes come back to be compared
    with the CPU reference (the reference defines the layout).
    """

    def __init__(self, device: str) -> None:
        self.device = torch.device(device)

    def pytest_configure(self, config) -> None:
        import aalconvert.kernels.triton_bitpack as bitpack
        import aalconvert.kernels.triton_quantize as quantize

        for module, name in ((bitpack, "pack_bits_triton"), (bitpack, "unpack_bits_triton"),
                             (quantize, "quantize_triton"), (quantize, "dequantize_triton")):
            setattr(module, name, self.wrap(getattr(module, name)))

    def wrap(self, launcher: Callable) -> Callable:
        device = self.device

        def on_device(*args, **kwargs):
            back = next((a.device for a in args if isinstance(a, torch.Tensor)), None)
            moved = [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]
            out = launcher(*moved, **kwargs)
            if isinstance(out, tuple):
                return tuple(t.to(back) for t in out)
            return out.to(back)

        return on_device


PYTEST_CODE = (
    "import sys; sys.path.insert(0, sys.argv[1]); import gpu, pytest; "
    "sys.exit(pytest.main(sys.argv[3:], plugins=[gpu.KernelsOnDevice(sys.argv[2])]))"
)


def step_kernel_tests(device: torch.device, sizes: Sizes, deadline: Deadline) -> dict:
    """The kernel test files with the launchers on ``device``: counts, failures, seconds."""
    command = [sys.executable, "-c", PYTEST_CODE, str(BENCHMARKS), str(device),
               "-v", "-p", "no:cacheprovider", *sizes.kernel_test_args]
    environment = dict(os.environ)
    if device.type == "cuda":
        environment.pop("TRITON_INTERPRET", None)
    timed_out = False
    try:
        run = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True,
                             timeout=max(1.0, deadline.left() - 2))
        output, returncode = run.stdout + run.stderr, run.returncode
    except subprocess.TimeoutExpired as expired:
        timed_out = True
        output = _text(expired.stdout) + _text(expired.stderr)
        returncode = None
    outcomes = re.findall(r"^(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)", output, re.M)
    counts: dict[str, int] = {}
    for _, outcome in outcomes:
        counts[outcome.lower()] = counts.get(outcome.lower(), 0) + 1
    failed = [test for test, outcome in outcomes if outcome in ("FAILED", "ERROR")]
    result = dict(command="pytest -v " + " ".join(sizes.kernel_test_args) + " (launchers on "
                  f"{device})", returncode=returncode, timed_out=timed_out, counts=counts,
                  failed=failed[:50], output_tail=output[-3000:])
    if timed_out or returncode != 0:
        raise StepFailed(f"kernel tests: {counts} {'timed out' if timed_out else f'exit {returncode}'}"
                         + (f"; first failures: {failed[:5]}" if failed else ""), result)
    return result


def _text(value) -> str:
    if value is None:
        return ""
    return value.decode(errors="replace") if isinstance(value, bytes) else value


class StepFailed(Exception):
    """A step that ran but whose result is a failure; carries the details it gathered."""

    def __init__(self, message: str, details: dict) -> None:
        super().__init__(message)
        self.details = details


# ---------------------------------------------------------- step 2: kernel throughput


def step_kernel_throughput(device: torch.device, sizes: Sizes, deadline: Deadline) -> dict:
    """GB/s of each kernel and its ratio to clone() at each size and dtype."""
    kernels = load_benchmark("kernels")
    rows, truncated = [], False
    for dtype_name in sizes.throughput_dtypes:
        for size in sizes.throughput_sizes:
            if deadline.passed(reserve=3):
                truncated = True
                break
            measured = kernels.measure(kernels.parse_size(size), getattr(torch, dtype_name), device,
                                       sizes.throughput_repeats)
            clone = next(r["gbps"] for r in measured if r["op"] == "clone")
            for row in measured:
                row.update(dtype=dtype_name, x_clone=row["gbps"] / clone)
                if row["op"] != "clone":
                    row["meets_target"] = row["x_clone"] >= THROUGHPUT_TARGET
            rows += measured
    return dict(target_x_clone=THROUGHPUT_TARGET, truncated=truncated, rows=rows)


# ---------------------------------------------------------------------- step 3: layers


def step_layers(device: torch.device, sizes: Sizes, deadline: Deadline) -> dict:
    """benchmarks/layers.py's rows, the ResNet-50 and ViT-B/16 shapes first."""
    layers = load_benchmark("layers")
    shapes = (layers.Sizes.quick if sizes.layer_quick else layers.Sizes.full)(sizes.layer_batch)
    every = layers.all_layers(shapes)
    first = [layer for layer in every if layer.model in sizes.layer_models]
    ordered = first + [layer for layer in every if layer not in first]
    rows, done = [], 0
    for layer in ordered:
        if deadline.passed(reserve=5):
            break
        rows += layers.measure_layer(layer, device, torch.float32, sizes.layer_repeats,
                                     device.type == "cuda")
        done += 1
    judged = [r["meets_target"] for r in rows if r["meets_target"] is not None]
    return dict(batch=sizes.layer_batch, repeats=sizes.layer_repeats, layers_measured=done,
                layers_total=len(ordered), targets_met=sum(judged), targets_judged=len(judged),
                rows=rows)


# ---------------------------------------------------------------------- step 4: memory


def step_memory(device: torch.device, sizes: Sizes, deadline: Deadline) -> dict:
    """Step peak (CUDA) or bytes kept (CPU) / BP per rule set; largest batch under the cap."""
    memory = load_benchmark("memory")
    rules = list(sizes.memory_rules)
    rows, max_batch = [], {}
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    for name in sizes.memory_examples:
        if deadline.passed(reserve=5):
            break
        rows += memory.measure_example(name, sizes.memory_batch, rules, sizes.memory_rounds, device)
    if sizes.memory_cap_gib is not None and device.type == "cuda":
        for name in sizes.memory_examples:
            if deadline.passed(reserve=10):
                break
            max_batch[name] = memory.max_batches(name, rules, sizes.memory_cap_gib, device)
    return dict(batch=sizes.memory_batch, rules=rules, cap_gib=sizes.memory_cap_gib,
                command=f"python benchmarks/memory.py --device cuda --batch {sizes.memory_batch} "
                        f"--examples {','.join(sizes.memory_examples)} --rules {','.join(rules)} "
                        f"--cap-gib {sizes.memory_cap_gib}",
                rows=rows, max_batch=max_batch)


# -------------------------------------------------------------- step 5: predicted peak


def measured_step_peak(model, inputs: tuple, device: torch.device) -> int | None:
    """max_memory_allocated over one SGD-momentum step after a warm-up step (bytes; None on CPU)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step():
        optimizer.zero_grad(set_to_none=True)
        model(*inputs).float().square().mean().backward()
        optimizer.step()

    step()  # momentum buffers, library workspaces, lazy state
    optimizer.zero_grad(set_to_none=True)
    if device.type != "cuda":
        step()
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device)


def step_predicted_peak(device: torch.device, sizes: Sizes, deadline: Deadline) -> dict:
    """Per example and rule set: inspect()'s predicted step peak, the measured one, their ratio."""
    import aalconvert
    from examples import EXAMPLES

    rows = []
    for name in sizes.peak_examples or tuple(EXAMPLES):
        for rules in sizes.peak_rules:
            if deadline.passed(reserve=3):
                break
            model, inputs = example_model(name, sizes.peak_batch, device, sizes)
            inspect_rules = "auto" if rules == "bp" else rules.split("+")
            totals = aalconvert.inspect(model, inputs, inspect_rules, optimizer="sgd_momentum").totals
            predicted = totals.peak_bp_bytes if rules == "bp" else totals.peak_converted_bytes
            model = convert(model, rules, inputs).train()
            measured = measured_step_peak(model, inputs, device)
            row = dict(example=name, rules=rules, batch=sizes.peak_batch, predicted_bytes=predicted,
                       measured_bytes=measured)
            if measured:
                row["predicted_over_measured"] = predicted / measured
                row["within_tolerance"] = abs(predicted / measured - 1) <= PEAK_TOLERANCE
            rows.append(row)
            del model, inputs
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return dict(tolerance=PEAK_TOLERANCE, optimizer="sgd_momentum", rows=rows)


# ------------------------------------------------------------------------- step 6: amp


def amp_step(model, inputs: tuple, device: torch.device, dtype: torch.dtype, steps: int = 2) -> dict:
    """``steps`` training steps under autocast(dtype); fp16 with a GradScaler. Facts of the last."""
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    seconds = []
    for _ in range(steps):
        synchronize(device)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype):
            loss = model(*inputs).float().square().mean()
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return dict(loss=loss.item(), loss_finite=bool(torch.isfinite(loss)),
                grads_finite=all(bool(torch.isfinite(g).all()) for g in grads),
                scale=scaler.get_scale() if scaler is not None else None, step_s=seconds[-1])


def step_amp(device: torch.device, sizes: Sizes, deadline: Deadline) -> dict:
    """A bf16 autocast and an fp16 autocast + GradScaler step per example and rule set (and BP)."""
    rows, errors = [], 0
    precisions = {"bf16": torch.bfloat16, "fp16+GradScaler": torch.float16}
    if device.type == "cpu":
        precisions = {"bf16": torch.bfloat16}  # CPU autocast: fp16 GradScaler steps need CUDA
    for name in sizes.amp_examples:
        for rules in ("bp", *sizes.amp_rules):
            for label, dtype in precisions.items():
                if deadline.passed(reserve=3):
                    break
                row = dict(example=name, rules=rules, precision=label)
                try:
                    model, inputs = example_model(name, sizes.amp_batch, device, sizes)
                    row.update(amp_step(convert(model, rules, inputs).train(), inputs, device, dtype))
                    row["ok"] = row["loss_finite"] and row["grads_finite"]
                except Exception as error:  # recorded per row; the other rows still run
                    row.update(ok=False, error=f"{type(error).__name__}: {error}")
                    errors += 1
                rows.append(row)
    failed = [r for r in rows if not r["ok"]]
    result = dict(batch=sizes.amp_batch, rows=rows)
    if failed:
        raise StepFailed(f"{len(failed)} of {len(rows)} AMP steps failed or were not finite: "
                         + ", ".join(f"{r['example']} {r['rules']} {r['precision']}" for r in failed[:6]),
                         result)
    return result


# --------------------------------------------------------------------- step 7: compile


def step_compile(device: torch.device, sizes: Sizes, deadline: Deadline) -> dict:
    """A torch.compile training step of one converted example: compile time, step time, vs eager."""
    import copy

    model, inputs = example_model(sizes.compile_example, sizes.compile_batch, device, sizes)
    model = convert(model, sizes.compile_rules, inputs).train()
    eager_model = copy.deepcopy(model)

    def step(m):
        m.zero_grad(set_to_none=True)
        loss = m(*inputs).float().square().mean()
        loss.backward()
        return loss.detach(), [p.grad.detach().clone() for p in m.parameters() if p.grad is not None]

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=sizes.compile_backend)
    synchronize(device)
    start = time.perf_counter()
    loss, grads = step(compiled)
    synchronize(device)
    first_s = time.perf_counter() - start
    start = time.perf_counter()
    step(compiled)
    synchronize(device)
    compiled_s = time.perf_counter() - start
    start = time.perf_counter()
    eager_loss, eager_grads = step(eager_model)
    synchronize(device)
    eager_s = time.perf_counter() - start
    difference = max([(a.float() - b.float()).abs().max().item() for a, b in zip(grads, eager_grads)],
                     default=0.0)
    scale = max([g.float().abs().max().item() for g in eager_grads], default=0.0)
    return dict(example=sizes.compile_example, rules=sizes.compile_rules, backend=sizes.compile_backend,
                batch=sizes.compile_batch, first_step_s=first_s, compiled_step_s=compiled_s,
                eager_step_s=eager_s, loss=loss.item(), eager_loss=eager_loss.item(),
                max_grad_difference=difference, max_grad=scale,
                grads_close=difference <= 1e-3 * max(scale, 1e-12) + 1e-6)


# ------------------------------------------------------------------------- step 8: peers


def allocator_step_memory(runner, device: torch.device):
    """One training step's bytes kept at the end of forward + loss and its peak, above the step's start, from
    the CUDA caching allocator's counters (a ``StepMemory``, as peers.py's profiler gives; nothing goes to the
    host)."""
    from aalconvert.step_memory import StepMemory

    method = runner.method
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    start = torch.cuda.memory_allocated(device)
    with method.context():
        loss = runner.workload.loss(method.model)
    synchronize(device)
    kept = torch.cuda.memory_allocated(device) - start
    loss.backward()
    runner.optimizer.step()
    runner.optimizer.zero_grad(set_to_none=True)
    synchronize(device)
    return StepMemory(kept_bytes=kept, peak_bytes=torch.cuda.max_memory_allocated(device) - start, host_bytes=0)


def step_peers(device: torch.device, sizes: Sizes, deadline: Deadline) -> dict:
    """BP, checkpointing and the planner at checkpointing's peak and bytes kept on a Hugging Face Llama:
    peers.py's rows and target verdict, measured on ``device`` (the profiler's CPU events where it is a CPU)."""
    peers = load_benchmark("peers")
    workload = peers.llama(sizes.peers_batch, sizes.peers_tokens, sizes.peers_llama)
    workload.model.to(device)
    workload.inputs = tuple(t.to(device) for t in workload.inputs)

    class Runner(peers.Runner):
        def timed_step(self) -> float:
            """The step with the device's queue drained before and after (CUDA runs asynchronously)."""
            synchronize(device)
            start = time.perf_counter()
            self.step()
            synchronize(device)
            return time.perf_counter() - start

    def measure(runner):
        return allocator_step_memory(runner, device) if device.type == "cuda" else peers.profile_step(runner)

    def prepare(method) -> tuple:
        return peers.prepare(workload, method, Runner, measure)

    prepared = {name: prepare(peers.build_method(name, workload)) for name in (peers.BP, peers.CHECKPOINT)}
    bp_memory, ckpt_memory = prepared[peers.BP][2], prepared[peers.CHECKPOINT][2]
    if bp_memory is None or ckpt_memory is None:
        raise StepFailed("BP or checkpointing did not run: "
                         + "; ".join(str(m.error) for m, _, memory in prepared.values() if memory is None),
                         dict(rows=[]))
    parameter_bytes = sum(p.numel() * p.element_size() for p in workload.model.parameters())
    planned = [(peers.AT_CHECKPOINT, parameter_bytes + ckpt_memory.peak_bytes, None),
               (peers.KEPT_AS_CHECKPOINT, None, ckpt_memory.kept_bytes)]
    for label, budget, kept_budget in planned:
        if deadline.passed(reserve=20):
            break
        method = peers.planner_method(workload, label, budget, kept_budget)
        prepared[method.name] = prepare(method)
    runners = {name: runner for name, (_, runner, _) in prepared.items() if runner is not None}
    times = peers.step_times(runners, sizes.peers_rounds)
    bp_seconds = statistics.median(times[peers.BP])
    rows = [peers.make_row(method, memory, times.get(name), None, bp_memory, bp_seconds)
            for name, (method, _, memory) in prepared.items()]
    return dict(model=workload.name, sizes=workload.sizes, parameter_bytes=parameter_bytes,
                rounds=len(times[peers.BP]), rows=rows, target=peers.target_verdict(rows))


# ----------------------------------------------------------------------- orchestration


STEPS: dict[str, Callable[[torch.device, Sizes, Deadline], dict]] = {
    "kernel_tests": step_kernel_tests,
    "kernel_throughput": step_kernel_throughput,
    "layers": step_layers,
    "memory": step_memory,
    "predicted_peak": step_predicted_peak,
    "amp": step_amp,
    "compile": step_compile,
    "peers": step_peers,
}
STEP_NAMES = tuple(STEPS)


def run_step_here(name: str, device: torch.device, sizes: Sizes, budget: float) -> dict:
    """One step in this process: {status, seconds, error, details}; never raises."""
    start = time.perf_counter()
    record: dict = dict(step=name)
    try:
        record["details"] = STEPS[name](device, sizes, Deadline(budget))
        record["status"] = "passed"
    except StepFailed as failure:
        record.update(status="failed", error=str(failure), details=failure.details)
    except Exception as error:  # isolated: the next step runs
        record.update(status="error", error=f"{type(error).__name__}: {error}",
                      traceback=traceback.format_exc()[-4000:])
    record["seconds"] = time.perf_counter() - start
    return record


def run_step_in_subprocess(name: str, device: torch.device, sizes_name: str, budget: float) -> dict:
    """One step in a fresh process, killed after ``budget`` + a grace period; never raises."""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "step.json"
        command = [sys.executable, str(Path(__file__).resolve()), "--run-step", name,
                   "--device", str(device), "--sizes", sizes_name, "--budget", f"{budget:.1f}",
                   "--step-output", str(out)]
        try:
            run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=budget + 20)
            if out.exists():
                return json.loads(out.read_text())
            return dict(step=name, status="error", seconds=time.perf_counter() - start,
                        error=f"the step's process exited {run.returncode} without a result: "
                              + (run.stderr or run.stdout)[-2000:])
        except subprocess.TimeoutExpired as expired:
            return dict(step=name, status="timeout", seconds=time.perf_counter() - start,
                        error=f"killed after {budget + 20:.0f} s",
                        output_tail=(_text(expired.stdout) + _text(expired.stderr))[-2000:])


def run_all(device: torch.device, sizes_name: str = "full", total_budget: float = TOTAL_BUDGET_S,
            runner: Callable[[str, torch.device, str, float], dict] = run_step_in_subprocess,
            steps: tuple[str, ...] = STEP_NAMES, echo: Callable[[str], None] = print) -> dict:
    """Every step in order, each isolated, within ``total_budget`` seconds; the result document."""
    sizes = SIZES[sizes_name]()
    start = time.monotonic()
    records = []
    for name in steps:
        left = total_budget - (time.monotonic() - start)
        budget = min(sizes.budgets[name], left)
        if budget < 10:
            records.append(dict(step=name, status="skipped", seconds=0.0,
                                error=f"the total budget of {total_budget:.0f} s was spent"))
            continue
        echo(f"[{time.monotonic() - start:6.1f} s] {name} (limit {budget:.0f} s)")
        record = runner(name, device, sizes_name, budget)
        echo(f"         {record['status']} in {record['seconds']:.1f} s"
             + (f": {record['error'][:300]}" if record.get("error") else ""))
        records.append(record)
    return dict(environment=environment(device), sizes=sizes_name,
                total_seconds=time.monotonic() - start, total_budget_s=total_budget, steps=records)


SIZES = {"full": Sizes.full, "tiny": Sizes.tiny}


def environment(device: torch.device) -> dict:
    info = dict(device=device_name(device), device_type=device.type, torch=torch.__version__,
                cuda=torch.version.cuda, python=platform.python_version(),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    with contextlib.suppress(ImportError):
        import triton

        info["triton"] = triton.__version__
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        info.update(memory_gib=round(properties.total_memory / 2**30, 1),
                    capability=f"sm_{properties.major}{properties.minor}")
    return info


def result_paths(result: dict, folder: Path = RESULTS) -> tuple[Path, Path]:
    """``gpu_<device>_<date>.json`` and ``.md`` for a result document."""
    slug = re.sub(r"[^a-z0-9]+", "_", result["environment"]["device"].lower()).strip("_")
    date = result["environment"]["date"][:10]
    stem = folder / f"gpu_{slug}_{date}"
    return stem.with_suffix(".json"), stem.with_suffix(".md")


# --------------------------------------------------------------------------- rendering


def _pct(x: float) -> str:
    return f"{x * 100:.1f} %"


def _mib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.1f} MiB"


def render_markdown(result: dict) -> str:
    """A summary of one result document: environment, each step's status, the key figures."""
    env = result["environment"]
    lines = [f"Device: **{env['device']}** ({env.get('capability', env['device_type'])}), "
             f"torch {env['torch']}, triton {env.get('triton', '-')}, CUDA {env.get('cuda') or '-'}, "
             f"{env['date']}; all steps {result['total_seconds']:.0f} s.", "",
             "| step | status | seconds | note |", "|---|---|---:|---|"]
    for record in result["steps"]:
        note = (record.get("error") or "").replace("|", "\\|").replace("\n", " ")[:160]
        lines.append(f"| {record['step']} | {record['status']} | {record['seconds']:.1f} | {note} |")
    details = {r["step"]: r.get("details") for r in result["steps"] if r.get("details")}
    if "kernel_tests" in details:
        d = details["kernel_tests"]
        lines += ["", f"Kernel tests with the launchers on the device: "
                      + ", ".join(f"{v} {k}" for k, v in sorted(d["counts"].items())) + "."]
    if "kernel_throughput" in details:
        rows = [r for r in details["kernel_throughput"]["rows"] if r["op"] != "clone"]
        if rows:
            largest = max(r["input_bytes"] for r in rows)
            lines += ["", f"Kernel throughput at {largest / 2**20:g} MiB input, x clone() "
                          f"(target >= {THROUGHPUT_TARGET}):", "",
                      "| dtype | op | bits | GB/s | x clone |", "|---|---|---:|---:|---:|"]
            for r in rows:
                if r["input_bytes"] == largest:
                    lines.append(f"| {r['dtype']} | {r['op']} | {r['bits']} | {r['gbps']:.0f} | "
                                 f"{r['x_clone']:.2f} |")
    if "layers" in details:
        d = details["layers"]
        lines += ["", f"Layers (batch {d['batch']}): {d['targets_met']} of {d['targets_judged']} rows "
                      f"with a time target meet it ({d['layers_measured']} of {d['layers_total']} "
                      "layer shapes measured).", "",
                  "| model | layer | variant | time / torch | kept / torch | target |",
                  "|---|---|---|---:|---:|---|"]
        for r in d["rows"]:
            kept = "-" if r["kept_ratio"] is None else f"{r['kept_ratio']:.3f}"
            target = "-" if r["target_time_ratio"] is None else (
                f"<= {r['target_time_ratio']}x " + ("pass" if r["meets_target"] else "**miss**")
                if r["meets_target"] is not None else f"<= {r['target_time_ratio']}x")
            lines.append(f"| {r['model']} | {r['layer']} | {r['label']} | {r['time_ratio']:.2f}x | "
                         f"{kept} | {target} |")
    if "memory" in details:
        d = details["memory"]
        lines += ["", f"Memory (batch {d['batch']}): step peak / BP and step time / BP per rule set.",
                  "", "| example | rules | peak / BP | time / BP |", "|---|---|---:|---:|"]
        for r in d["rows"]:
            lines.append(f"| {r['example']} | {r['rules']} | {r['ratio']:.3f} | {r['step_ratio']:.2f}x |")
        for name, found in d.get("max_batch", {}).items():
            bp = max(found.get("bp", 0), 1)
            lines.append("")
            lines.append(f"Largest batch of {name} under {d['cap_gib']} GiB: "
                         + ", ".join(f"{rules} {n} ({n / bp:.1f}x)" for rules, n in found.items()))
    if "predicted_peak" in details:
        d = details["predicted_peak"]
        lines += ["", f"Predicted (inspect, SGD momentum) vs measured step peak "
                      f"(target within {_pct(d['tolerance'])}):", "",
                  "| example | rules | predicted | measured | predicted / measured |",
                  "|---|---|---:|---:|---:|"]
        for r in d["rows"]:
            ratio = r.get("predicted_over_measured")
            lines.append(f"| {r['example']} | {r['rules']} | {_mib(r['predicted_bytes'])} | "
                         f"{_mib(r['measured_bytes'])} | {'-' if ratio is None else f'{ratio:.3f}'} |")
    if "amp" in details:
        rows = details["amp"]["rows"]
        good = sum(r["ok"] for r in rows)
        lines += ["", f"Mixed precision: {good} of {len(rows)} training steps finite "
                      "(bf16 autocast; fp16 autocast + GradScaler)."]
        lines += [f"- {r['example']} {r['rules']} {r['precision']}: {r.get('error', 'not finite')}"
                  for r in rows if not r["ok"]]
    if "compile" in details:
        d = details["compile"]
        lines += ["", f"torch.compile ({d['backend']}) of {d['example']} with {d['rules']}: first step "
                      f"{d['first_step_s']:.1f} s, then {d['compiled_step_s'] * 1e3:.1f} ms vs eager "
                      f"{d['eager_step_s'] * 1e3:.1f} ms; gradients "
                      + ("match eager" if d["grads_close"] else
                         f"differ from eager by up to {d['max_grad_difference']:.2e}") + "."]
    if "peers" in details:
        d = details["peers"]
        lines += ["", f"Peers (`benchmarks/peers.py`'s rows on the device) on {d['model']}, {d['sizes']}, "
                      f"{d['rounds']} rounds:", "",
                  "| method | kept / BP | peak / BP | time / BP | notes |", "|---|---:|---:|---:|---|"]
        for r in d["rows"]:
            if r["ok"]:
                lines.append(f"| {r['method']} | {r['kept_ratio']:.3f} | {r['peak_ratio']:.3f} | "
                             f"{r['time_ratio']:.2f}x | {r['note']} |")
            else:
                lines.append(f"| {r['method']} | | | | did not run: {r['error'][:120]} |")
        lines += ["", d["target"]["text"]]
    return "\n".join(lines) + "\n"


def newest_result(folder: Path = RESULTS) -> Path | None:
    """The newest ``gpu_*.json`` by the date in its name, then by name; None when there is none."""
    files = sorted(folder.glob("gpu_*.json"), key=lambda p: (p.stem.rsplit("_", 1)[-1], p.name))
    return files[-1] if files else None


def render_readme_section(result_file: Path | None) -> str:
    """The README's GPU section (heading included) from a result file, or a note that none exists."""
    lines = [f"## {README_SECTION}", "",
             "Everything that needs a GPU (the Triton kernels compiled and byte-checked on CUDA, their "
             "throughput, layer and step times, step peaks and the largest batch under a cap, "
             "predicted vs measured peak, bf16/fp16 AMP steps, torch.compile, the planner against "
             "checkpointing on a Hugging Face Llama) runs in one command, "
             "under 8 minutes on one H100/H200-class GPU; it writes "
             "`benchmarks/results/gpu_<device>_<date>.json` and `.md`, and this section is generated "
             "from the newest of them:", "",
             "    python benchmarks/gpu.py            # run it first whenever a GPU is available",
             "    python benchmarks/gpu.py --readme   # regenerate this section", "",
             "Without a GPU the script says so and exits. CI, without one, compiles every Triton "
             "kernel for sm_80 and sm_90 (`tests/test_kernels_compile.py`). If the Triton path fails "
             "on a machine (Triton missing, a compile error), the error names the kernel; "
             "`AALCONVERT_KERNELS=reference` runs the torch reference everywhere instead (the same "
             "bytes, slower). On CPU tensors the package runs its CPU path (`kernels/quantize_cpu.py` with "
             "C passes compiled at first use, `kernels/cpu_native.py`; numpy's `packbits`); the same variable "
             "sends those calls to the reference too.", ""]
    if result_file is None:
        lines += ["No GPU result yet: no `benchmarks/results/gpu_*.json` exists, so none of the GPU "
                  "figures above (speed vs torch, measured peaks, largest batch) has been measured.", ""]
    else:
        result = json.loads(Path(result_file).read_text())
        lines += [f"From `{Path(result_file).relative_to(ROOT) if Path(result_file).is_relative_to(ROOT) else result_file}`:", "",
                  render_markdown(result)]
    return "\n".join(lines).rstrip("\n") + "\n"


def replace_readme_section(readme_text: str, section: str) -> str:
    """``readme_text`` with its ``## GPU`` section replaced by ``section`` (added before "## Layout" if absent)."""
    pattern = re.compile(rf"^## {README_SECTION}\n.*?(?=^## |\Z)", re.M | re.S)
    if pattern.search(readme_text):
        return pattern.sub(lambda _: section + "\n", readme_text, count=1)
    anchor = readme_text.find("\n## Layout")
    if anchor < 0:
        return readme_text.rstrip("\n") + "\n\n" + section
    return readme_text[: anchor + 1] + section + "\n" + readme_text[anchor + 1:]


# --------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readme", action="store_true",
                        help="only rewrite README's GPU section from the newest result file")
    parser.add_argument("--steps", default=",".join(STEP_NAMES), help="comma-separated steps to run")
    parser.add_argument("--run-step", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    parser.add_argument("--sizes", default="full", choices=tuple(SIZES), help=argparse.SUPPRESS)
    parser.add_argument("--budget", type=float, default=60.0, help=argparse.SUPPRESS)
    parser.add_argument("--step-output", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder for the result files")
    args = parser.parse_args(argv)

    if args.run_step:  # one step, in the process run_step_in_subprocess started
        record = run_step_here(args.run_step, torch.device(args.device), SIZES[args.sizes](), args.budget)
        args.step_output.write_text(json.dumps(record, indent=1, default=str))
        return 0
    if args.readme:
        README.write_text(replace_readme_section(README.read_text(),
                                                 render_readme_section(newest_result(args.results))))
        print(f"rewrote the {README_SECTION} section of {README}")
        return 0
    if not torch.cuda.is_available():
        print("benchmarks/gpu.py: no CUDA GPU visible to torch; nothing to measure here "
              "(run it on a machine with one).")
        return 0
    steps = tuple(s for s in args.steps.split(",") if s)
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        parser.error(f"unknown steps {unknown}; steps: {list(STEP_NAMES)}")
    device = torch.device("cuda", torch.cuda.current_device())
    print(f"benchmarks/gpu.py on {device_name(device)} ({device}), limit {TOTAL_BUDGET_S:.0f} s")
    result = run_all(device, "full", steps=steps)
    json_path, md_path = result_paths(result, args.results)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=1, default=str) + "\n")
    md_path.write_text(render_markdown(result))
    print(f"wrote {json_path} and {md_path}; update the README with: python benchmarks/gpu.py --readme")
    failed = [r["step"] for r in result["steps"] if r["status"] != "passed"]
    print(f"{len(result['steps']) - len(failed)} of {len(result['steps'])} steps passed"
          + (f"; not passed: {', '.join(failed)}" if failed else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

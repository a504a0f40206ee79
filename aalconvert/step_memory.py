"""The bytes one training step allocates: measured on real tensors, simulated on fake ones.

Measured (``measure_step``): ``torch.profiler``'s memory events of one real
step, replayed as a running sum of allocations and frees. It sees what
saved-tensor hooks cannot (checkpoint regions, compiled graphs, gradients,
transients). The step marks its forward with
``torch.profiler.record_function(FORWARD)``; bytes allocated inside a
``HOST_COPY`` region (a ``save_on_cpu`` pack hook) count as moved to the host,
not as kept.

Simulated (``StepSimulation``): the same running sum on fake tensors, the
estimate behind every predicted peak (``Report.totals``). A dispatch mode sees
every op of the forward, the loss and backward (checkpointed blocks
recomputing and k-bit copies decoded included), counts each new storage when
an op makes it and drops it when torch frees it, and adds the workspace of
CPU convolutions' and batch norms' backward (``workspace_bytes``; depthwise
ones on channels-last inputs: ``depthwise_weight_buffer_bytes``).

Both count above the step's start: parameters, optimizer state and inputs
made before it do not count; gradients start as None
(``zero_grad(set_to_none=True)``, torch's default).
"""

from __future__ import annotations

import functools
import gc
import os
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.weak import WeakIdKeyDictionary


FORWARD, HOST_COPY = "aalconvert::forward", "aalconvert::to_host"


@dataclass(frozen=True)
class Allocation:
    """One CPU allocation (+bytes) or free (-bytes) seen by the profiler; ``host``: made by save_on_cpu's pack."""

    time_ns: int
    ptr: int
    nbytes: int
    host: bool = False


@dataclass(frozen=True)
class StepMemory:
    """Bytes alive at the end of the forward, the step's peak, and bytes packed to the host (all above the start)."""

    kept_bytes: int
    peak_bytes: int
    host_bytes: int


def allocations(prof: torch.profiler.profile) -> tuple[list[Allocation], int]:
    """Every allocation event of a profiled step, and when its forward region ended (ns)."""
    events: list[Allocation] = []
    forward_end = None

    def walk(nodes: list, host: bool) -> None:
        nonlocal forward_end
        for node in nodes:
            fields = node.extra_fields
            if isinstance(fields, torch._C._profiler._ExtraFields_Allocation):
                events.append(Allocation(node.start_time_ns, fields.ptr, fields.alloc_size, host))
            if node.name == FORWARD:
                forward_end = node.end_time_ns
            walk(node.children, host or node.name == HOST_COPY)

    walk(prof.profiler.kineto_results.experimental_event_tree(), False)
    if forward_end is None:
        raise RuntimeError(f"the profiler recorded no {FORWARD!r} region: mark the step's forward with "
                           f"torch.profiler.record_function(aalconvert.step_memory.FORWARD)")
    return events, forward_end


def replay(events: list[Allocation], forward_end_ns: int) -> StepMemory:
    """Running sum of allocations in time order: its level when the forward ends, its peak, host copies apart.

    A host copy's allocation and its later free are left out of the sum (they
    would live in host memory on a device); their allocated bytes are summed.
    """
    level = peak = host = 0
    kept = None
    host_live: set[int] = set()
    for event in sorted(events, key=lambda e: e.time_ns):
        if kept is None and event.time_ns > forward_end_ns:
            kept = level
        if event.host and event.nbytes > 0:
            host_live.add(event.ptr)
            host += event.nbytes
            continue
        if event.nbytes < 0 and event.ptr in host_live:
            host_live.discard(event.ptr)
            continue
        level += event.nbytes
        peak = max(peak, level)
    return StepMemory(level if kept is None else kept, peak, host)


def measure_step(step: Callable[[], None]) -> StepMemory:
    """Run ``step()`` (one training step, its forward marked) under the profiler's memory events, replayed."""
    gc.collect()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    return replay(*allocations(prof))


class StepSimulation(TorchDispatchMode):
    """Counts the bytes of storages that ops make while it is active, until torch frees them.

    ``known`` tensors (parameters, buffers, inputs) existed before: ops that
    write into them or view them make nothing new. ``peak_bytes`` is the
    most alive at once.
    """

    def __init__(self, known: Iterable[torch.Tensor]) -> None:
        super().__init__()
        self.seen: WeakIdKeyDictionary = WeakIdKeyDictionary()
        for tensor in known:
            self.seen[tensor.untyped_storage()] = True
        self.level = self.peak_bytes = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        output = func(*args, **(kwargs or {}))
        for tensor in pytree.tree_leaves(output):
            if isinstance(tensor, torch.Tensor):
                self._count(tensor.untyped_storage())
        # What ops hold beyond their outputs while they run (fakes make outputs only).
        self.peak_bytes = max(self.peak_bytes, self.level + workspace_bytes(func, args))
        return output

    def _count(self, storage: torch.UntypedStorage) -> None:
        if storage in self.seen:
            return
        self.seen[storage] = True
        nbytes = storage.nbytes()
        if nbytes:
            self.level += nbytes
            self.peak_bytes = max(self.peak_bytes, self.level)
            weakref.finalize(storage, self._freed, nbytes)

    def _freed(self, nbytes: int) -> None:
        self.level -= nbytes


def workspace_bytes(func: Any, args: tuple) -> int:
    """Bytes an op holds beyond its outputs while it runs, where that is known and large.

    Measured on CPU with the profiler: the backward of a convolution copies
    the output's gradient into its memory format when it arrives in another
    (behind batch norm's backward in ResNets), and with a kernel wider than 1
    also keeps a copy of the input (exact for 3x3 stride 1, 4 % over for a
    7x7 stride-2 stem); a strided one holds two input-sized buffers less the
    weight's size, if more (exact for 1x1 and 3x3 stride 2, 8x8 to 56x56
    maps); and where the weight is larger than all of that (small feature
    maps: the last stages of a ResNet, where checkpointed nets peak), one
    weight-sized temporary instead (exact for 1x1 and 3x3 on 1x1 and 2x2
    maps, 128 to 2048 channels); batch norm's backward
    keeps one tensor of its input's size. A depthwise convolution on a
    channels-last input (ConvNeXt's 7x7) takes its weight's gradient through
    oneDNN with a buffer of 256 weights of one channel multiplier on AVX-512,
    64 on AVX2 (``depthwise_weight_buffer_bytes``). Not modelled: GPU
    libraries' workspaces, and the temporaries of our kernels' CPU path (the
    Triton kernels make none).
    """
    if func is torch.ops.aten.convolution_backward.default:
        grad_output, source, weight = args[:3]
        if source.device.type != "cpu":
            return 0
        source_bytes, weight_bytes = (t.numel() * t.element_size() for t in (source, weight))
        wide = any(size > 1 for size in weight.shape[2:])
        held = grad_output.numel() * grad_output.element_size() + (source_bytes if wide else 0)
        if any(step > 1 for step in args[4]):  # strided: two input-sized buffers before the weight's gradient
            held = max(held, 2 * source_bytes - weight_bytes)
        weight_buffers = 0
        if args[10][1]:
            weight_buffers = small_map_weight_buffers(source, weight) * weight_bytes
        return max(held, weight_buffers, depthwise_weight_buffer_bytes(source, weight, args))
    if func is torch.ops.aten.native_batch_norm_backward.default:
        source = args[1]
        return source.numel() * source.element_size() if source.device.type == "cpu" else 0
    return 0


def small_map_weight_buffers(source: torch.Tensor, weight: torch.Tensor) -> int:
    """Weight-sized buffers a CPU convolution's backward holds for its weight's gradient: 4 with oneDNN's
    AVX2 kernels when the input map is smaller than the kernel (the last stages of a ResNet on small images),
    else 1.

    Measured with the profiler (torch 2.13, AMD EPYC with AVX2, fp32, one thread, batch 4 to 64, 64 to 512
    channels): 3x3 kernels on 1x1 and 2x2 maps (stride 1 or 2) hold 4.00-4.06 weights, 5x5 on 4x4 4.25,
    7x7 on 5x5 4.39; maps as large as the kernel and 1x1 kernels hold one weight, as they do, small maps
    included, with the AVX-512 kernels.
    """
    smaller = any(side < kernel for side, kernel in zip(source.shape[2:], weight.shape[2:]))
    mkldnn = torch.backends.mkldnn.enabled and source.dtype == torch.float32
    return 4 if smaller and mkldnn and _onednn_isa() == "avx2" else 1


def depthwise_weight_buffer_bytes(source: torch.Tensor, weight: torch.Tensor, args: tuple) -> int:
    """Bytes a CPU depthwise convolution's backward holds for its weight's gradient in oneDNN (fp32, channels-last).

    Measured with the profiler (torch 2.13 and 2.14, x86-64, fp32, 1 to 4
    threads, batch 1 to 8, 2x2 to 56x56 maps, 7 to 768 channels, stride 1
    or 2): with a 4-d channels-last input, groups equal to the input channels
    and the weight's gradient asked for, oneDNN's AVX-512 kernels allocate
    256 x in_channels x kh x kw floats, then a weight-sized copy: 257.02 x the
    weight for 7x7 (ConvNeXt), 5x5, 4x4, 9x9, 11x11, 7x1 and 3x5 kernels
    (128 x at channel multiplier 2, 85.3 x at 3); square 3x3 and 2x2 kernels
    at multiplier 1 take another kernel (about 2 weights, left to
    ``workspace_bytes``' general rule), 1x1 ones torch's own. Its AVX2 kernels
    (``ONEDNN_MAX_CPU_ISA=AVX2``) hold 64 x in_channels x kh x kw floats
    at multiplier 1 once the input is at least as high and wide as the
    kernel, and about 4 weights below (0 here); other instruction sets,
    multipliers above 1 on AVX2, contiguous inputs and other dtypes: 0.
    """
    if not args[10][1] or source.dim() != 4 or source.dtype != torch.float32 or not torch.backends.mkldnn.enabled:
        return 0
    groups, in_channels = args[9], source.shape[1]
    if groups <= 1 or groups != in_channels or args[7]:  # depthwise, not transposed
        return 0
    if source.is_contiguous() or not source.is_contiguous(memory_format=torch.channels_last):
        return 0
    multiplier = weight.shape[0] // in_channels
    kernel_h, kernel_w = weight.shape[2:]
    if kernel_h * kernel_w == 1 or (multiplier == 1 and kernel_h == kernel_w and kernel_h <= 3):
        return 0
    isa = _onednn_isa()
    if isa == "avx512":
        copies = 256
    elif isa == "avx2" and multiplier == 1 and source.shape[2] >= kernel_h and source.shape[3] >= kernel_w:
        copies = 64
    else:
        return 0
    return copies * in_channels * kernel_h * kernel_w * weight.element_size() + weight.numel() * weight.element_size()


@functools.cache
def _onednn_isa() -> str:
    """The widest x86 vector set oneDNN uses here ("avx512", "avx2" or "other"): torch's CPU capability, lowered
    by ``ONEDNN_MAX_CPU_ISA`` (or ``DNNL_MAX_CPU_ISA``) when set."""
    if not torch.backends.mkldnn.is_available():
        return "other"
    capability = torch.backends.cpu.get_cpu_capability().upper()
    isa = "avx512" if capability.startswith("AVX512") else "avx2" if capability.startswith("AVX2") else "other"
    limit = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "ALL").upper()
    if limit == "ALL" or limit.startswith(("AVX512", "AVX10")):
        return isa
    return "avx2" if limit.startswith("AVX2") and isa != "other" else "other"


def training_loss(output: Any) -> torch.Tensor | None:
    """The loss a training step takes from a model's output (None when nothing needs a gradient).

    A scalar that needs a gradient (a loss the model computed itself, first
    in its output) is the loss. Otherwise the first tensor that needs a
    gradient goes through ``logsumexp`` over its last dimension, a stand-in
    for cross-entropy with the same cost: it keeps its input and sends back a
    gradient of the same size.
    """
    tensors = [t for t in pytree.tree_leaves(output) if isinstance(t, torch.Tensor) and t.requires_grad]
    if not tensors:
        return None
    first = tensors[0]
    return first if first.dim() == 0 else first.float().logsumexp(-1).mean()


def backward_of(output: Any) -> None:
    """Backward from a model's output as training runs it (``training_loss``); nothing needs a gradient: no-op."""
    loss = training_loss(output)
    del output  # the caller hands its reference over: the output is freed as backward passes it
    if loss is not None:
        loss.backward()


OPTIMIZERS: dict[str, Callable[[Iterable[torch.Tensor]], torch.optim.Optimizer]] = {
    "sgd": lambda parameters: torch.optim.SGD(parameters, lr=1e-4),
    "sgd_momentum": lambda parameters: torch.optim.SGD(parameters, lr=1e-4, momentum=0.9),
    "adam": lambda parameters: torch.optim.Adam(parameters, lr=1e-4),
    "adamw": lambda parameters: torch.optim.AdamW(parameters, lr=1e-4),
}
"""The optimizers ``inspect(optimizer=...)`` counts, with torch's default implementation for the device."""


def measure_training_step(model: torch.nn.Module, loss_of: Callable[[], torch.Tensor],
                          optimizer: str = "sgd") -> StepMemory:
    """The measured bytes of one training step of ``model``: forward (``loss_of()``), backward, optimizer step.

    One warm-up step first makes the optimizer state, which the measured step
    finds in place as training would (inspect counts it apart, as optimizer
    state). Compare ``peak_bytes`` with a report's predicted peak less its
    parameters and optimizer state. The model takes one small optimizer step
    (learning rate 1e-4) per call.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")
    step_optimizer = OPTIMIZERS[optimizer](model.parameters())

    def step() -> None:
        with torch.profiler.record_function(FORWARD):
            loss = loss_of()
        loss.backward()
        step_optimizer.step()
        step_optimizer.zero_grad(set_to_none=True)

    step()
    return measure_step(step)

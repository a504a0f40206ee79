"""Peers side by side: what each way of saving activation memory keeps, its step peak and its step time.

On real models (torchvision ResNet-50, timm ViT-S/16, a Hugging Face Llama
decoder trained on its own loss with ``labels=``), one full training step
(forward, loss, backward, SGD step) under:

- ``bp``: ordinary backprop;
- ``checkpoint``: ``torch.utils.checkpoint(..., use_reentrant=False)`` around
  every block (the outermost members with children of an ``nn.Sequential`` /
  ``nn.ModuleList``: ResNet bottlenecks, ViT blocks, decoder layers);
- ``checkpoint, 4-bit inputs``: aalconvert's checkpoint of the same blocks
  as the budget planner's ``checkpoint4`` sets it (``CheckpointedForward``):
  each block keeps 4-bit copies of its inputs and backward runs it again on
  the decoded copies; blocks with batch norm or ReLU keep their inputs in full;
- ``selective checkpoint``: the same blocks with
  ``create_selective_checkpoint_contexts`` saving the outputs of the matmuls
  (``mm``, ``addmm``, ``bmm``, ``baddbmm``, and ``convolution``, the ResNet's
  matmul) and recomputing everything else;
- ``torch.compile``: inductor with ``torch._functorch.config.activation_memory_budget = 0.5``;
- ``save_on_cpu``: ``torch.autograd.graph.save_on_cpu()``;
- ``exact``, ``auto``, ``auto+approx4``: ``aalconvert.convert``;
- ``plan @ ...``: ``aalconvert.plan(model, budget=..., optimizer="sgd")``, the
  model converted with that plan (``convert(model, budget=plan)``), at six
  budgets: checkpointing's measured step peak plus the parameters (which
  the planner's budget counts and the measured peak does not; SGD without
  momentum keeps no optimizer state); 1/4, 1/2 and 3/4 of the way from it to
  the planner's floor, and the floor (the least budget any of its plans fits);
  halfway from the first to BP's measured peak plus the parameters; and
  ``aalconvert.plan(model, kept_budget=...)`` with checkpointing's measured
  bytes kept as the kept budget (no step budget). The target line per model
  is read at the first (faster) and at every planner row as fast as
  checkpointing (keeps less): the budgets toward the floor trace the
  planner's trade-off curve where checkpointing's step time lies, and the
  kept budget asks for checkpointing's memory outright.
  The planner's predicted peaks of BP and of every block checkpointed are
  printed beside the measured ones.

How each column is measured (CPU, one thread, fp32):

- bytes kept for backward: the bytes allocated during the forward and loss and
  still alive when they return, i.e. what the step holds across the
  forward/backward boundary (the inputs, allocated before the step, are not
  counted), from the allocation events of ``torch.profiler``
  (``profile_memory=True``; the running sum of every CPU allocation and free,
  in time order). This sees what checkpoints, selective checkpointing and
  compiled graphs hold, which saved-tensor hooks (``aalconvert.memory.measure_saved``)
  do not; the hooks' count is kept in the JSON (``saved_hooks_bytes``) for the
  rows where they see everything (BP and aalconvert without checkpointed blocks).
- step peak: the largest running sum of the same events over the whole step,
  above what was alive before it (parameters, inputs): activations, gradients,
  transients.
- step time / BP: median over the rounds of the step time, every method's
  step interleaved in each round, over BP's median. At least ``--rounds``
  rounds, and enough that each method runs ``--seconds`` of steps (the
  Llama's 0.3 s steps get the most, 60); the target's "faster" and "slower" need
  the 95 % interval of the median ratio of the two methods' steps in the same
  round (bootstrap over the rounds) to lie wholly on one side of 1.
- ``save_on_cpu(pin_memory=True)`` on a CPU-only machine copies each saved
  tensor into new memory of the same kind; those copies (the allocations made
  inside its pack hook) are counted as moved off the device ("to host"), not as
  kept or in the peak. On a GPU the unpacked copies come back to the device one
  node at a time in backward, which this peak cannot show. It packs the
  parameters layers save too: they count in "to host".

    python benchmarks/peers.py                 # the README run (about 40 min on 2 CPU cores); re-runs in .zoo-venv/
    python benchmarks/peers.py --quick         # tiny sizes, 2 rounds: a smoke run written to /tmp
    python benchmarks/peers.py --models vit_small --rounds 3 --no-compile
    python benchmarks/peers.py --render benchmarks/results/peers_cpu.json   # redraw .md and .png from a run

Needs torchvision, timm and transformers (``python benchmarks/zoo.py --setup``
builds ``.zoo-venv``) and matplotlib for the plot, installed into that venv
with ``.zoo-venv/bin/python -m pip install matplotlib`` (no plot without it).
"""

import argparse
import contextlib
import copy
import functools
import gc
import json
import math
import platform
import random
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # examples/ and aalconvert at the repo root
sys.path.insert(0, str(ROOT / "benchmarks"))  # zoo.py's builders

import aalconvert  # noqa: E402
from cpu_malloc import malloc_for_timing  # noqa: E402
from aalconvert.checkpointing import (  # noqa: E402
    CHECKPOINT_RULES, CheckpointedForward, CopiedBoundaryRule, why_not_copied)
from aalconvert.memory import measure_saved  # noqa: E402
from aalconvert.step_memory import FORWARD, HOST_COPY, StepMemory, measure_step  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
BP, CHECKPOINT, CHECKPOINT4, SELECTIVE, COMPILE, SAVE_ON_CPU = (
    "bp", "checkpoint", "checkpoint, 4-bit inputs", "selective checkpoint", "torch.compile (budget 0.5)",
    "save_on_cpu")
RULE_SETS = ["exact", "auto", "auto+approx4"]
AT_CHECKPOINT, AT_FLOOR, TOWARD_BP = "checkpointing's measured peak", "the planner's floor", "halfway to BP's measured peak"
TOWARD_FLOOR = {f"{share} of the way from it to the floor": fraction
                for share, fraction in (("1/4", 0.25), ("1/2", 0.5), ("3/4", 0.75))}
"""Budgets between checkpointing's peak and the floor: the planner's trade-off curve where checkpointing sits."""
BUDGETS = (AT_CHECKPOINT, *TOWARD_FLOOR, AT_FLOOR, TOWARD_BP)
KEPT_AS_CHECKPOINT = "a kept budget of checkpointing's measured bytes kept"
"""The planner given checkpointing's bytes kept as its kept budget (no step budget): what it keeps for them, in what time."""
MATMULS = [torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
           torch.ops.aten.baddbmm.default, torch.ops.aten.convolution.default]
COMPILE_MEMORY_BUDGET = 0.5
LEARNING_RATE = 1e-5  # small: a dozen steps must not move the weights far from where BP started


# --------------------------------------------------------------------------- workloads

@dataclass
class Workload:
    """A model with fixed inputs; ``targets`` are class ids, or None for a language model trained with labels=."""

    name: str
    sizes: str
    model: nn.Module
    inputs: tuple
    targets: torch.Tensor | None

    def loss(self, model: nn.Module) -> torch.Tensor:
        """The training loss of one forward: cross-entropy on the classes, or the model's own (labels=)."""
        if self.targets is None:
            return model(*self.inputs, labels=self.inputs[0]).loss
        return F.cross_entropy(model(*self.inputs), self.targets)


def vision_workload(name: str, model: nn.Module, inputs: tuple) -> Workload:
    """A classifier with targets drawn from its own number of classes (read from one no-grad forward)."""
    with torch.no_grad():
        classes = model(*inputs).shape[-1]
    targets = torch.randint(0, classes, (inputs[0].shape[0],), generator=torch.Generator().manual_seed(2))
    sizes = "batch " + " x ".join(str(s) for s in inputs[0].shape)
    return Workload(name, sizes, model.train(), inputs, targets)


def resnet50(batch: int, side: int) -> Workload:
    """torchvision ResNet-50, random init, as the zoo builds it."""
    import zoo

    entry = next(e for e in zoo.torchvision_entries() if e.name == "torchvision/resnet50")
    model, _ = entry.build()
    return vision_workload("torchvision/resnet50", model, zoo._images(side, batch))


def vit_small(batch: int, side: int) -> Workload:
    """timm ViT-S/16 built for the input side (``img_size``, as the zoo does), random init."""
    import timm
    import zoo

    model = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=side)
    return vision_workload("timm/vit_small_patch16_224", model, zoo._images(side, batch))


LLAMA_SIZES = {"hidden_size": 256, "num_hidden_layers": 4, "intermediate_size": 688,
               "num_attention_heads": 8, "num_key_value_heads": 4, "vocab_size": 4096}


def llama(batch: int, tokens: int, sizes: dict | None = None) -> Workload:
    """A Hugging Face Llama from the zoo's config table with larger sizes, trained on its own loss."""
    import transformers
    import zoo

    model_class, config_class, fields, _ = zoo.HF_ARCHITECTURES["llama"]
    sizes = sizes or LLAMA_SIZES
    config = getattr(transformers, config_class)(**{**fields, **sizes, "use_cache": False})
    model = getattr(transformers, model_class)(config).train()
    ids = torch.randint(0, sizes["vocab_size"], (batch, tokens), generator=torch.Generator().manual_seed(1))
    described = ", ".join(f"{k} {v}" for k, v in sizes.items())
    return Workload("hf/llama (LlamaForCausalLM)", f"batch {batch} x {tokens} tokens; {described}", model,
                    (ids,), None)


WORKLOADS: dict[str, Callable[[bool], Workload]] = {
    "resnet50": lambda quick: resnet50(2, 64) if quick else resnet50(8, 160),
    "vit_small": lambda quick: vit_small(2, 64) if quick else vit_small(8, 160),
    "llama": lambda quick: (llama(2, 32, {**LLAMA_SIZES, "hidden_size": 64, "num_hidden_layers": 2,
                                          "intermediate_size": 128, "num_attention_heads": 4,
                                          "num_key_value_heads": 2, "vocab_size": 256})
                            if quick else llama(4, 128)),
}


# --------------------------------------------------------------------------- the peers

def outermost_blocks(model: nn.Module) -> list[str]:
    """Members of an nn.Sequential / nn.ModuleList that have children and parameters, none inside another.

    The same blocks the planner's ``checkpoint`` option takes, so the two
    checkpoint the same units; nested ones are left out (checkpointing inside a
    checkpoint keeps nothing less).
    """
    chosen: list[str] = []
    for parent_name, parent in model.named_modules():
        if not isinstance(parent, (nn.Sequential, nn.ModuleList)):
            continue
        for child_name, child in parent.named_children():
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            has_children = next(child.children(), None) is not None
            has_parameters = next(child.parameters(), None) is not None
            if has_children and has_parameters and not any(name.startswith(b + ".") for b in chosen):
                chosen.append(name)
    return chosen


class CheckpointedBlock:
    """A block's instance-level ``forward`` under non-reentrant ``torch.utils.checkpoint`` (optionally selective)."""

    def __init__(self, module: nn.Module, context_fn: Callable | None) -> None:
        self.module, self.context_fn = module, context_fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        forward = type(self.module).forward
        extra = {"context_fn": self.context_fn} if self.context_fn is not None else {}
        return checkpoint(forward, self.module, *args, use_reentrant=False, **extra, **kwargs)


def checkpoint_blocks(model: nn.Module, context_fn: Callable | None = None) -> nn.Module:
    """A deep copy of ``model`` with every outermost block checkpointed; raises when it has none."""
    model = copy.deepcopy(model)
    names = outermost_blocks(model)
    if not names:
        raise ValueError(f"{type(model).__name__} has no blocks (members of nn.Sequential / nn.ModuleList) "
                         "to checkpoint")
    for name in names:
        block = model.get_submodule(name)
        block.forward = CheckpointedBlock(block, context_fn)
    return model


def copied_boundary_blocks(model: nn.Module) -> tuple[nn.Module, int]:
    """A deep copy of ``model`` with every outermost block checkpointed as the planner's ``checkpoint4``
    does: inputs kept as 4-bit copies, except in blocks with batch norm or ReLU (kept in full); and how
    many blocks keep copies."""
    model = copy.deepcopy(model)
    copied = 0
    for name in outermost_blocks(model):
        block = model.get_submodule(name)
        full = why_not_copied(block) is not None
        block.forward = CheckpointedForward(block, None if full else CopiedBoundaryRule.boundary)
        copied += not full
    return model, copied


def save_matmuls_context() -> Callable:
    """``context_fn`` for selective checkpointing: save matmul and convolution outputs, recompute the rest."""
    return functools.partial(create_selective_checkpoint_contexts, MATMULS)


def host_copies() -> torch.autograd.graph.saved_tensors_hooks:
    """``save_on_cpu(pin_memory=True)`` whose pack hook runs in a profiler region, so its copies can be told apart.

    ``pin_memory=True`` (the setting for a GPU) copies every saved tensor into
    a new host tensor even on a CPU-only machine (without it, ``tensor.cpu()``
    of a CPU tensor is the tensor itself and nothing would move).
    """
    hooks = torch.autograd.graph.save_on_cpu(pin_memory=True)
    pack = hooks.pack_hook

    def pack_marked(tensor: torch.Tensor) -> Any:
        with torch.profiler.record_function(HOST_COPY):
            return pack(tensor)

    hooks.pack_hook = pack_marked
    return hooks


@contextlib.contextmanager
def compile_memory_budget() -> Iterator[None]:
    """``activation_memory_budget`` for torch.compile's partitioner while the compiled model runs."""
    with torch._functorch.config.patch(activation_memory_budget=COMPILE_MEMORY_BUDGET):
        yield


@dataclass
class Method:
    """One way to train ``model``: its name, the module stepped, a context around each forward, notes."""

    name: str
    model: nn.Module | None
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    note: str = ""
    error: str | None = None
    warmups: int = 1
    hooks_see_all: bool = False
    plan: dict | None = None


def failed(name: str, error: BaseException, note: str = "") -> Method:
    """A method that could not be built or run: its row says why instead of stopping the run."""
    text = " ".join(f"{type(error).__name__}: {error}".split())
    return Method(name, None, note=note, error=text[:300])


def build_method(name: str, workload: Workload) -> Method:
    """The method ``name`` for ``workload`` (a failure becomes a row saying why)."""
    model = workload.model
    try:
        if name == BP:
            return Method(name, model, hooks_see_all=True)
        if name == CHECKPOINT:
            return Method(name, checkpoint_blocks(model), note=f"{len(outermost_blocks(model))} blocks")
        if name == CHECKPOINT4:
            checkpointed, copied = copied_boundary_blocks(model)
            return Method(name, checkpointed, note=f"{len(outermost_blocks(model))} blocks, {copied} of them "
                                                   "keep 4-bit copies of their inputs")
        if name == SELECTIVE:
            return Method(name, checkpoint_blocks(model, save_matmuls_context()),
                          note=f"{len(outermost_blocks(model))} blocks, saves mm/addmm/bmm/conv outputs")
        if name == COMPILE:
            return Method(name, torch.compile(copy.deepcopy(model)), compile_memory_budget, warmups=2,
                          note="inductor")
        if name == SAVE_ON_CPU:
            return Method(name, model, host_copies)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            converted = aalconvert.convert(model, name.split("+"), example_inputs=workload.inputs)
        return Method(name, converted, hooks_see_all=True)
    except Exception as error:  # a peer that does not build on this model is a row, not a crash
        return failed(name, error)


def planner_method(workload: Workload, label: str, budget: int | None, kept_budget: int | None = None) -> Method:
    """``aalconvert.plan(model, budget=..., kept_budget=...)`` with SGD (no optimizer state), the model converted
    with that plan; the plan's rules in the note."""
    name = f"plan @ {label}"
    limits = {"budget": budget, "kept_budget": kept_budget}
    said = "; ".join(f"{what.replace('_', ' ')} {mib(value)}" for what, value in limits.items() if value is not None)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            chosen = aalconvert.plan(workload.model, example_inputs=workload.inputs, optimizer="sgd", **limits)
            converted = aalconvert.convert(workload.model, budget=chosen, example_inputs=workload.inputs)
    except Exception as error:  # BudgetError (under the floor) included: the row says so
        return failed(name, error, said)
    rules = sorted(set(chosen.decisions.values()))
    blocks = sum(1 for rule in chosen.decisions.values() if rule in CHECKPOINT_RULES)
    note = f"{said}; " + (", ".join(rules) if rules else "no change")
    note += f" ({blocks} blocks checkpointed)" if blocks else ""
    return Method(name, converted, note=note, hooks_see_all=not blocks,
                  plan={"budget_bytes": budget, "kept_budget_bytes": kept_budget,
                        "predicted_peak_bytes": chosen.peak_bytes, "predicted_kept_bytes": chosen.kept_bytes,
                        "floor_bytes": chosen.floor_bytes, "rules": rules, "checkpointed_blocks": blocks})


# --------------------------------------------------------------------------- stepping and measuring

class Runner:
    """One method's training step on a workload: forward + loss (marked for the profiler), backward, SGD."""

    def __init__(self, workload: Workload, method: Method) -> None:
        self.workload, self.method = workload, method
        # the method's own parameters: a checkpointed or compiled copy has its own
        self.optimizer = torch.optim.SGD(method.model.parameters(), lr=LEARNING_RATE)

    def step(self) -> None:
        with torch.profiler.record_function(FORWARD), self.method.context():
            loss = self.workload.loss(self.method.model)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)  # every step starts with no gradients alive

    def timed_step(self) -> float:
        start = time.perf_counter()
        self.step()
        return time.perf_counter() - start


def profile_step(runner: Runner) -> StepMemory:
    """One step under the profiler's memory events (after warm-up), replayed."""
    return measure_step(runner.step)


def saved_hooks_bytes(runner: Runner) -> int:
    """What saved-tensor hooks see one forward keep (``measure_saved``, parameters excluded); runs its backward."""
    model = runner.method.model
    saved = measure_saved(lambda: runner.workload.loss(model), model.parameters())
    saved.output.backward()
    runner.optimizer.zero_grad(set_to_none=True)
    return saved.nbytes


def step_times(runners: dict[str, Runner], rounds: int) -> dict[str, list[float]]:
    """Step times (s) per method, one per round, every method stepped once in each round.

    The order rotates by one each round, so no method always follows the same
    one; the garbage collector runs before each step, not during it.
    """
    names = list(runners)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            gc.collect()
            gc.disable()
            try:
                times[name].append(runners[name].timed_step())
            finally:
                gc.enable()
    return times


def rounds_for(bp_step_seconds: float, rounds: int, seconds: float) -> int:
    """At least ``rounds``, and enough that a method as fast as BP runs ``seconds`` of steps (at most 60):
    one short step strays by 10 % on this machine, and the median of many does not."""
    return max(rounds, min(60, math.ceil(seconds / max(bp_step_seconds, 1e-6))))


def spread(times: list[float]) -> float:
    """The rounds' median absolute deviation over their median: how far one round strays (0.03 = 3 %)."""
    middle = statistics.median(times)
    return statistics.median(abs(t - middle) for t in times) / middle


def prepare(workload: Workload, method: Method, runner_class: type[Runner] = Runner,
            measure: Callable[[Runner], StepMemory] = profile_step) -> tuple[Method, Runner | None, StepMemory | None]:
    """Warm ``method`` up and ``measure`` one step (the profiler's events here; gpu.py passes the CUDA
    allocator's counters); a failure turns the method into a row saying why."""
    if method.error:
        return method, None, None
    runner = runner_class(workload, method)
    try:
        for _ in range(method.warmups):
            runner.step()
        return method, runner, measure(runner)
    except Exception as error:
        runner.optimizer.zero_grad(set_to_none=True)
        return failed(method.name, error, method.note), None, None


def planner_budgets(parameter_bytes: int, checkpoint_peak: int, bp_peak: int,
                    predicted: dict[str, int | None]) -> dict[str, int]:
    """The planner budgets (bytes, parameters included), from the most to the least memory but the last.

    Checkpointing's measured step peak plus the parameters (the memory it
    needed, as a user would set the budget); when the planner gave a floor
    under it, 1/4, 1/2 and 3/4 of the way from there to the floor, and the
    floor (the planner's plans between checkpointing's peak and its least, where
    the one as fast as checkpointing is to be found); halfway from the first
    to BP's measured step peak plus the parameters.
    """
    at_checkpoint = parameter_bytes + checkpoint_peak
    floor = predicted.get("floor")
    budgets = {AT_CHECKPOINT: at_checkpoint}
    if floor is not None:
        if floor < at_checkpoint:
            budgets.update({label: round(at_checkpoint - fraction * (at_checkpoint - floor))
                            for label, fraction in TOWARD_FLOOR.items()})
        budgets[AT_FLOOR] = floor
    budgets[TOWARD_BP] = (at_checkpoint + parameter_bytes + bp_peak) // 2
    return budgets


def planner_predictions(workload: Workload) -> dict[str, int | None]:
    """The planner's own figures (bytes, parameters included), to hold against the measurements.

    ``bp_peak``: BP's predicted step peak; ``floor``: the least budget any of
    its plans fits; ``checkpoint_all``: the predicted peak with every block
    checkpointed (the plan at the floor of checkpointing alone). None where
    planning fails, and ``error`` says why.
    """
    found: dict[str, Any] = {"bp_peak": None, "floor": None, "checkpoint_all": None}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            plan = aalconvert.plan(workload.model, budget=1 << 60, example_inputs=workload.inputs, optimizer="sgd")
            found.update(bp_peak=plan.peak_bp_bytes, floor=plan.floor_bytes)
            only = aalconvert.plan(workload.model, budget=1 << 60, example_inputs=workload.inputs,
                                   optimizer="sgd", rules=["checkpoint"])
            every_block = aalconvert.plan(workload.model, budget=only.floor_bytes, example_inputs=workload.inputs,
                                          optimizer="sgd", rules=["checkpoint"])
            found["checkpoint_all"] = every_block.peak_bytes
        except Exception as error:  # kept in the record: the budgets that need it are left out
            found["error"] = " ".join(f"{type(error).__name__}: {error}".split())[:300]
    return found


def measure_workload(workload: Workload, methods: list[str], rounds: int, log: Callable[[str], None] = print,
                     seconds: float = 0.0) -> dict:
    """Every method (and the planner at its budgets) on one workload: a record with one row per method."""
    prepared: dict[str, tuple[Method, Runner | None, StepMemory | None]] = {}
    for name in methods:
        log(f"  {workload.name}: {name}")
        prepared[name] = prepare(workload, build_method(name, workload))
    bp_memory, ckpt_memory = prepared[BP][2], prepared.get(CHECKPOINT, (None, None, None))[2]
    if bp_memory is None:
        raise RuntimeError(f"BP did not run on {workload.name}: {prepared[BP][0].error}")
    parameter_bytes = sum(p.numel() * p.element_size() for p in workload.model.parameters())
    budgets, kept_budgets, predicted = {}, {}, {}
    if ckpt_memory is not None:
        log(f"  {workload.name}: the planner's predictions")
        predicted = planner_predictions(workload)
        budgets = planner_budgets(parameter_bytes, ckpt_memory.peak_bytes, bp_memory.peak_bytes, predicted)
        kept_budgets = {KEPT_AS_CHECKPOINT: ckpt_memory.kept_bytes}
    planned = [(label, budget, None) for label, budget in budgets.items()]
    planned += [(label, None, kept) for label, kept in kept_budgets.items()]
    for label, budget, kept_budget in planned:
        log(f"  {workload.name}: plan @ {label}")
        method = planner_method(workload, label, budget, kept_budget)
        prepared[method.name] = prepare(workload, method)
    runners = {name: runner for name, (_, runner, _) in prepared.items() if runner is not None}
    rounds = rounds_for(runners[BP].timed_step(), rounds, seconds)
    log(f"  {workload.name}: timing {len(runners)} methods x {rounds} rounds")
    times = step_times(runners, rounds)
    saved = {name: saved_hooks_bytes(runner) for name, runner in runners.items()
             if runner.method.hooks_see_all}
    bp_seconds = statistics.median(times[BP])
    rows = [make_row(method, memory, times.get(name), saved.get(name), bp_memory, bp_seconds)
            for name, (method, _, memory) in prepared.items()]
    return {"model": workload.name, "sizes": workload.sizes, "parameter_bytes": parameter_bytes, "rounds": rounds,
            "budgets": budgets, "kept_budgets": kept_budgets, "predicted": predicted, "rows": rows,
            "target": target_verdict(rows)}


def make_row(method: Method, memory: StepMemory | None, rounds: list[float] | None, saved: int | None,
             bp: StepMemory, bp_seconds: float) -> dict:
    """One table row: bytes kept, step peak and median step time, each also as a ratio to BP's."""
    row: dict[str, Any] = {"method": method.name, "note": method.note, "ok": method.error is None}
    if method.error or memory is None or not rounds:
        row["error"] = method.error or "not measured"
        return row
    seconds = statistics.median(rounds)
    row.update(kept_bytes=memory.kept_bytes, peak_bytes=memory.peak_bytes, host_bytes=memory.host_bytes,
               kept_ratio=memory.kept_bytes / bp.kept_bytes, peak_ratio=memory.peak_bytes / bp.peak_bytes,
               step_s=seconds, time_ratio=seconds / bp_seconds, time_spread=spread(rounds), rounds_s=rounds,
               saved_hooks_bytes=saved)
    if method.plan:
        row["plan"] = method.plan
    return row


# --------------------------------------------------------------------------- the target and the report

MIN_KEPT_GAIN = 0.01  # "keeps less" needs at least 1 % fewer bytes than checkpointing, not a few kilobytes


CONFIDENCE = 0.95
RESAMPLES = 2000


def ratio_interval(rounds: list[float], reference: list[float]) -> tuple[float, float]:
    """The ``CONFIDENCE`` interval of the median ratio of two methods' steps in the same round: a
    bootstrap over the rounds.

    Both methods step once in every round, so what slows the machine for a
    while (a neighbour on the host, the CPU's clock) slows both: the ratio
    within a round cancels it, and its median over the rounds is known far
    better than each median alone. Seeded, so a rendering of the same rounds
    gives the same verdict.
    """
    if len(rounds) != len(reference):
        raise ValueError(f"rounds of unequal count ({len(rounds)} vs {len(reference)}): not paired by round")
    paired = [time / other for time, other in zip(rounds, reference)]
    sample = random.Random(0)
    ratios = sorted(statistics.median(sample.choices(paired, k=len(paired))) for _ in range(RESAMPLES))
    tail = int(RESAMPLES * (1 - CONFIDENCE) / 2)
    return ratios[tail], ratios[-1 - tail]


def target_verdict(rows: list[dict]) -> dict:
    """Issue 14's target on one model, from the rows: is the planner at checkpointing's measured peak faster
    than checkpointing, and does some planner row at checkpointing's step time or less keep less?

    Faster means the ``CONFIDENCE`` interval of the median ratio of the two
    methods' step times in the same round (``ratio_interval``) lies under 1; a
    planner row counts as at checkpointing's step time unless that interval
    lies over 1; keeping less
    means by at least ``MIN_KEPT_GAIN``. The planner at its floor is reported
    beside it (the speed part counts only at checkpointing's peak).
    """
    by_name = {row["method"]: row for row in rows}
    ckpt = by_name.get(CHECKPOINT)
    plans = [row for row in rows if row["method"].startswith("plan @") and row["ok"]]
    if not ckpt or not ckpt["ok"]:
        return {"met": False, "faster": None, "keeps_less": None, "text": "target not measured: checkpointing "
                "did not run"}

    def interval(row: dict) -> tuple[float, float]:
        return ratio_interval(row["rounds_s"], ckpt["rounds_s"])

    def speed(label: str) -> tuple[bool, str]:
        row = by_name.get(f"plan @ {label}")
        if not row or not row["ok"]:
            why = row["error"].split(" (", 1)[0] if row else "no row"  # a BudgetError's first clause
            return False, f"at {label} the planner did not run ({why})"
        low, high = interval(row)
        faster = high < 1
        verdict = "faster" if faster else "NOT faster" if low > 1 else "NOT faster (within noise)"
        return faster, (f"at {label} the planner takes {row['time_ratio']:.2f}x BP vs checkpointing's "
                        f"{ckpt['time_ratio']:.2f}x: {verdict} (time ratio {low:.2f}-{high:.2f} at "
                        f"{CONFIDENCE:.0%} confidence, paired over {len(row['rounds_s'])} rounds)")

    faster, faster_text = speed(AT_CHECKPOINT)
    _, floor_text = speed(AT_FLOOR)
    in_time = [row for row in plans if interval(row)[0] <= 1]
    best = min(in_time, key=lambda row: row["kept_bytes"], default=None)
    keeps_less = best is not None and best["kept_bytes"] <= ckpt["kept_bytes"] * (1 - MIN_KEPT_GAIN)
    if best is None:
        less_text = (f"no planner row is as fast as checkpointing ({ckpt['time_ratio']:.2f}x): "
                     "keeps less at its step time NOT shown")
    else:
        less_text = (f"at checkpointing's step time (not shown slower) the planner keeps as little as "
                     f"{best['kept_ratio']:.3f} of BP ({best['method']}, {best['time_ratio']:.2f}x) vs checkpointing's "
                     f"{ckpt['kept_ratio']:.3f}: {'less' if keeps_less else f'NOT {MIN_KEPT_GAIN:.0%} less'}")
    met = bool(faster and keeps_less)
    return {"met": met, "faster": faster, "keeps_less": keeps_less,
            "text": f"target {'met' if met else 'MISSED'}: {faster_text}; {less_text} "
                    f"(beside the target: {floor_text})"}


def mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f} MiB"


def table(record: dict) -> list[str]:
    """A markdown table of one model's rows, then its target line."""
    lines = [f"**{record['model']}** ({record['sizes']}; parameters {mib(record['parameter_bytes'])})", "",
             "| method | kept for backward | kept / BP | step peak | peak / BP | step time / BP (± rounds) | notes |",
             "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for row in record["rows"]:
        if not row["ok"]:
            note = f"{row['note']}; " if row["note"] else ""
            lines.append(f"| {row['method']} | | | | | | {note}did not run: {row['error']} |")
            continue
        notes = [row["note"]] if row["note"] else []
        if row["host_bytes"]:
            notes.append(f"to host: {mib(row['host_bytes'])}")
        lines.append(f"| {row['method']} | {mib(row['kept_bytes'])} | {row['kept_ratio']:.3f} | "
                     f"{mib(row['peak_bytes'])} | {row['peak_ratio']:.3f} | {row['time_ratio']:.2f}x "
                     f"±{row.get('time_spread', 0):.0%} | "
                     f"{'; '.join(notes)} |")
    lines += ["", f"*{record['target']['text']}*", ""]
    lines += predictions_line(record)
    return lines


def predictions_line(record: dict) -> list[str]:
    """The planner's predicted peaks next to the measured ones (parameters added), when it gave them."""
    predicted, rows = record.get("predicted") or {}, {row["method"]: row for row in record["rows"]}
    pairs = [(what, predicted.get(key), rows.get(method)) for what, key, method in
             (("BP", "bp_peak", BP), ("every block checkpointed", "checkpoint_all", CHECKPOINT))]
    said = [f"{what} {mib(value)} (measured: {mib(record['parameter_bytes'] + row['peak_bytes'])}, "
            f"{value / (record['parameter_bytes'] + row['peak_bytes']) - 1:+.1%})"
            for what, value, row in pairs if value is not None and row and row["ok"]]
    if predicted.get("error"):
        said.append(f"planning failed: {predicted['error']}")
    if not said:
        return []
    floor = f"; its floor (least budget) {mib(predicted['floor'])}" if predicted.get("floor") else ""
    return [f"Planner's predicted step peaks, parameters included: {', '.join(said)}{floor}.", ""]


def short_name(model: str) -> str:
    """``timm/vit_small_patch16_224`` -> ``vit_small_patch16_224``; ``hf/llama (LlamaForCausalLM)`` -> ``llama``."""
    return model.split("/", 1)[-1].split(" ", 1)[0]


def summary_cell(row: dict | None) -> str:
    """kept / BP, peak / BP, time / BP in one cell; why not, when it did not run."""
    if row is None:
        return ""
    if not row["ok"]:
        return "under the planner's floor" if "BudgetError" in row["error"] else "did not run"
    return f"{row['kept_ratio']:.3f} / {row['peak_ratio']:.3f} / {row['time_ratio']:.2f}x"


def summary_table(result: dict) -> list[str]:
    """One table over every model: per method, kept / BP, step peak / BP and step time / BP; then the targets."""
    records = result["records"]
    methods = list(dict.fromkeys(row["method"] for record in records for row in record["rows"]))
    lines = ["| method | " + " | ".join(f"{short_name(r['model'])}: kept / peak / time" for r in records) + " |",
             "| --- |" + " ---: |" * len(records)]
    for method in methods:
        cells = [summary_cell(next((row for row in r["rows"] if row["method"] == method), None)) for r in records]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines.append("")
    lines += [f"- {short_name(r['model'])}: {r['target']['text']}" for r in records]
    return lines + [""]


def markdown(result: dict) -> str:
    """The whole report: how it was run and measured, one table and target line per model."""
    lines = [f"# Peers side by side ({result['date'][:10]}, CPU)", "",
             f"`{result['command']}`: torch {result['torch']}, {result['machine']}, {result['threads']} thread(s), "
             f"fp32, median of {rounds_text(result)} interleaved rounds, {result['seconds'] / 60:.1f} min; "
             f"{result.get('malloc', 'the system malloc as it is')}.", "",
             "Kept for backward: bytes allocated in the forward + loss and alive when it returns; step peak: "
             "the most bytes alive above the step's start (activations, gradients, transients; parameters and "
             "inputs excluded); both from torch.profiler's CPU allocation events. save_on_cpu's copies count as "
             "\"to host\", not as kept. Planner budgets: parameters + checkpointing's measured step peak; 1/4, 1/2 "
             "and 3/4 of the way from it to the planner's floor, and the floor (the least budget any of its plans "
             "fits); halfway from the first to parameters + BP's measured step peak (SGD, no optimizer state); and "
             "a kept budget (bytes kept for backward, no step budget) of checkpointing's measured bytes kept. The "
             "target's speed part is read at the first. ± after a "
             "step time: how far one round "
             "strays from the median (median absolute deviation); faster or slower than checkpointing: the "
             f"{CONFIDENCE:.0%} interval of the median ratio of the two methods' steps in the same round "
             "(bootstrap over the rounds) on one side of 1.", ""]
    lines += ["Ratios to BP (kept for backward / step peak / step time):", "", *summary_table(result)]
    for record in result["records"]:
        lines += table(record)
    lines += [f"Plot: `{result.get('plot', 'not drawn')}`.", ""]
    return "\n".join(lines)


def rounds_text(result: dict) -> str:
    """How many rounds each model was timed over ("5", or "5 / 5 / 31" where short steps got more)."""
    counts = [str(record.get("rounds", result["rounds"])) for record in result["records"]]
    return counts[0] if len(set(counts)) == 1 else " / ".join(counts)


def plot(result: dict, path: Path) -> str | None:
    """Step peak / BP and kept / BP against step time / BP, one panel per model; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    records = result["records"]
    figure, axes = plt.subplots(2, len(records), figsize=(5 * len(records), 8), squeeze=False)
    for column, record in enumerate(records):
        rows = [row for row in record["rows"] if row["ok"]]
        for line, key, label in ((0, "peak_ratio", "step peak / BP"), (1, "kept_ratio", "kept for backward / BP")):
            ax = axes[line][column]
            plans = sorted((row for row in rows if row["method"].startswith("plan @")),
                           key=lambda row: row["time_ratio"])
            ax.plot([r["time_ratio"] for r in plans], [r[key] for r in plans], "k--", lw=1, label="planner")
            for row in rows:
                marker = "s" if row["method"].startswith("plan @") else "o"
                ax.scatter(row["time_ratio"], row[key], marker=marker)
                ax.annotate(row["method"].replace("plan @ ", "plan: "), (row["time_ratio"], row[key]),
                            fontsize=6, xytext=(3, 3), textcoords="offset points")
            ax.set_xlabel("step time / BP")
            ax.set_ylabel(label)
            ax.set_title(record["model"], fontsize=9)
            ax.grid(alpha=0.3)
    figure.suptitle(f"memory vs step time, CPU, torch {result['torch']} ({result['date'][:10]})")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


# --------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(WORKLOADS), help=f"comma-separated, of {list(WORKLOADS)}")
    parser.add_argument("--rounds", type=int, default=5, help="least timed steps per method (median; default 5)")
    parser.add_argument("--seconds", type=float, default=30.0,
                        help="more rounds where steps are short: each method runs about this long (default 30)")
    parser.add_argument("--quick", action="store_true", help="tiny inputs and 2 rounds: a smoke run")
    parser.add_argument("--no-compile", action="store_true", help="leave torch.compile out (it compiles for minutes)")
    parser.add_argument("--out", type=Path, help="write OUT.json, OUT.md, OUT.png (default "
                        "benchmarks/results/peers_cpu, or /tmp/peers_quick with --quick)")
    parser.add_argument("--threads", type=int, default=1, help="CPU intra-op threads (default 1)")
    parser.add_argument("--no-venv", action="store_true", help="run in this interpreter, not .zoo-venv")
    parser.add_argument("--system-malloc", action="store_true",
                        help="leave glibc's malloc as it is (default: keep freed memory, benchmarks/cpu_malloc.py)")
    parser.add_argument("--render", type=Path, metavar="JSON",
                        help="only write the .md and .png of an earlier run's JSON next to it")
    args = parser.parse_args(argv)
    import zoo

    zoo.reexec_in_zoo_venv(__file__, argv)
    if args.render:
        return render(args.render)
    names = args.models.split(",")
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown or args.rounds < 1:
        parser.error(f"unknown models {unknown} (known: {list(WORKLOADS)}) or --rounds < 1")
    rounds = 2 if args.quick else args.rounds
    out = args.out or (Path("/tmp/peers_quick") if args.quick else RESULTS / "peers_cpu")
    torch.set_num_threads(args.threads)
    malloc = malloc_for_timing(args.system_malloc)
    methods = [BP, CHECKPOINT, CHECKPOINT4, SELECTIVE, *([] if args.no_compile else [COMPILE]), SAVE_ON_CPU, *RULE_SETS]
    started = time.perf_counter()
    records = []
    for name in names:
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            workload = WORKLOADS[name](args.quick)
        print(f"{workload.name} ({workload.sizes})", file=sys.stderr, flush=True)
        record = measure_workload(workload, methods, rounds, lambda m: print(
            f"[{time.perf_counter() - started:5.0f} s] {m}", file=sys.stderr, flush=True),
            seconds=0.0 if args.quick else args.seconds)
        records.append(record)
        print("\n".join(table(record)), flush=True)
        del workload
        gc.collect()
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__,
              "machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "threads": args.threads,
              "command": "python benchmarks/peers.py" + (" " + " ".join(argv) if argv else ""),
              "rounds": rounds, "malloc": malloc, "seconds": time.perf_counter() - started, "records": records}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    return render(out.with_suffix(".json"))


def render(path: Path) -> dict:
    """The .md and .png of a run from its JSON (written next to it): the report can be redrawn without rerunning."""
    result = json.loads(path.read_text())
    for record in result["records"]:  # the verdict as this code reads the rows
        record["target"] = target_verdict(record["rows"])
    result["plot"] = plot(result, path.with_suffix(".png")) or "not drawn: matplotlib is not installed"
    path.write_text(json.dumps(result, indent=2))
    path.with_suffix(".md").write_text(markdown(result))
    print(f"wrote {path.with_suffix('.md')} and {result['plot']}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()

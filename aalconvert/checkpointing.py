"""Activation checkpointing of whole blocks, as one of the budget planner's options.

A checkpointed block runs its own class's forward under
``torch.utils.checkpoint(..., use_reentrant=False)``: it keeps only its inputs,
and backward runs its forward once more (same RNG state, so the same
gradients). It is a per-instance ``forward`` attribute, not a new class or a
wrapper module, so parameter names, ``state_dict`` keys and the module tree stay
the user's; ``revert`` removes it.

``checkpoint4`` (``CopiedBoundaryRule``) checkpoints the same way but keeps
4-bit copies of a block's inputs, and backward runs the block on the decoded
copies: less kept for the same second forward, at approx's gradient error,
offered only for blocks without batch norm or ReLU-like activations
(``why_not_copied``; ``python benchmarks/boundary.py``).

Blocks are the non-leaf members of an ``nn.Sequential`` or ``nn.ModuleList``
that own parameters (ResNet's ``layer1.0``, a transformer's ``blocks.3``). The
planner never converts modules inside a checkpointed block: checkpointing
drops what they keep anyway, and a recomputed ARA layer would lose its anchor.

What it keeps and what it costs, for the estimate: saved-tensor hooks (which
inspect and ``measure_saved`` count with) do not see what a checkpoint region
holds, so :func:`checkpoint_inputs` records each checkpointed block's input
storages during a forward; while a block recomputes in backward, its own
activations are alive again, which the simulated step
(``aalconvert.step_memory``) sees as it runs backward.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten
from torch.utils.checkpoint import checkpoint

from aalconvert.facts import ModelFacts
from aalconvert.memory import SavedByModule, tensors_in
from aalconvert.nn.approx_common import ApproxOptions, compress, restore, should_quantize
from aalconvert.rules.base import Rule, Site, Skip

NAME = "checkpoint"
BOUNDARY_NAME = "checkpoint4"
CHECKPOINT_RULES = (NAME, BOUNDARY_NAME)


class CheckpointedForward:
    """A module's instance-level ``forward``: its class's forward under non-reentrant checkpointing.

    With ``boundary`` options, the block's inputs are kept as k-bit copies
    (:func:`checkpoint_from_copies`) instead of in full. Without grad mode
    (eval, ``no_grad``) there is nothing to keep, so the plain forward runs.
    """

    def __init__(self, module: nn.Module, boundary: ApproxOptions | None = None) -> None:
        self.module = module
        self.boundary = boundary

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        forward = type(self.module).forward
        if not torch.is_grad_enabled():
            return forward(self.module, *args, **kwargs)
        if self.boundary is not None:
            return checkpoint_from_copies(functools.partial(forward, self.module), args, kwargs, self.boundary)
        return checkpoint(forward, self.module, *args, use_reentrant=False, **kwargs)

    def kept_in_full(self, args: tuple, kwargs: dict) -> list[torch.Tensor]:
        """The tensors among a call's arguments that the checkpoint keeps as they are."""
        return [t for t in tensors_in((args, kwargs)) if not copied_at_boundary(t, self.boundary)]


def copied_at_boundary(value: Any, options: ApproxOptions | None) -> bool:
    """Whether a checkpoint with ``options`` keeps ``value`` as a k-bit copy: a large activation
    on the differentiable path (not a Parameter, mask or index)."""
    return (options is not None and isinstance(value, torch.Tensor) and value.requires_grad
            and not isinstance(value, nn.Parameter) and should_quantize(value, options))


def checkpoint_from_copies(function: Callable[..., Any], args: tuple, kwargs: dict,
                           options: ApproxOptions) -> Any:
    """``function(*args, **kwargs)`` under non-reentrant checkpointing that keeps k-bit copies of
    the large inputs (``copied_at_boundary``) instead of the inputs.

    The forward runs on the real inputs, so its output is exact and autograd's
    graph reaches them. Backward runs the function again on the decoded copies:
    every tensor it recomputes is then approximate, and so are the block's
    gradients, like those of the approx rules. The budget planner offers it
    only for blocks where the gradient stays close (``why_not_copied``).
    Other inputs are kept as torch's checkpoint keeps them.
    """
    values, spec = tree_flatten((args, kwargs))
    at = [i for i, value in enumerate(values) if copied_at_boundary(value, options)]
    if not at:
        return checkpoint(function, *args, use_reentrant=False, **kwargs)
    copies = [compress(values[i], options) for i in at]
    parts = [part for tensors, _ in copies for part in tensors]
    layouts = [layout for _, layout in copies]
    rest = [None if i in at else value for i, value in enumerate(values)]
    first_call = [values]  # the forward's own inputs, for its one call; backward decodes the copies
    del values

    def run(*kept: torch.Tensor) -> Any:
        if first_call:
            inputs = first_call.pop()
        else:
            inputs, offset = list(rest), 0
            for i, layout in zip(at, layouts):
                inputs[i] = restore(kept[offset:offset + layout.count], layout).requires_grad_()
                offset += layout.count
        call_args, call_kwargs = tree_unflatten(inputs, spec)
        return function(*call_args, **call_kwargs)

    return checkpoint(run, *parts, use_reentrant=False)


def is_checkpointed(module: nn.Module) -> bool:
    """Whether ``module`` runs under a checkpoint the planner set (full or k-bit inputs)."""
    return isinstance(module.__dict__.get("forward"), CheckpointedForward)


def remove_checkpoints(model: nn.Module) -> None:
    """Every checkpointed block in ``model`` runs its plain forward again."""
    for module in model.modules():
        if is_checkpointed(module):
            del module.__dict__["forward"]


def block_names(facts: ModelFacts) -> list[str]:
    """Members of an nn.Sequential / nn.ModuleList that have children and own parameters, in module order."""
    names = []
    for parent_name, parent in facts.modules.items():
        if not isinstance(parent, (nn.Sequential, nn.ModuleList)):
            continue
        for child_name, child in parent.named_children():
            has_parameters = next(child.parameters(), None) is not None
            if next(child.children(), None) is not None and has_parameters:
                names.append(f"{parent_name}.{child_name}" if parent_name else child_name)
    return names


def inside(name: str, block: str) -> bool:
    """True when module ``name`` is ``block`` or below it."""
    return name == block or name.startswith(block + ".")


class CheckpointRule(Rule):
    """Checkpoint whole blocks (not in the rule registry: only the budget planner chooses it)."""

    name: ClassVar[str] = NAME
    description: ClassVar[str] = ("whole blocks under torch.utils.checkpoint (non-reentrant): keep their "
                                  "inputs only, run their forward again in backward")
    forward_exact: ClassVar[bool] = True
    gradient_exact: ClassVar[bool] = True
    options = None
    boundary: ClassVar[ApproxOptions | None] = None
    """How the blocks' inputs are kept: None in full, else as k-bit copies (``checkpoint_from_copies``)."""

    def __init__(self, first_block: bool = True) -> None:
        self.first_block = first_block

    def find(self, facts: ModelFacts) -> tuple[list[Site], list[Skip]]:
        """Every block; without ``first_block``, all but the first, which is left to compression.

        With every block checkpointed, the step peaks when the first block
        recomputes: its activations are alive again beside nearly every
        gradient. Compressed instead, it keeps a fraction of them from the
        forward on, and the peak moves to the second block with one block's
        gradients fewer.
        """
        names = block_names(facts)
        skips = [] if self.first_block or not names else [Skip(
            self.name, names[0], "the first block is compressed rather than checkpointed: recomputing it "
                                 "would make the step's peak, beside nearly every gradient")]
        sites = []
        for name in names if self.first_block else names[1:]:
            stateful = facts.trace.stateful_arguments.get(name)
            if stateful:
                skips.append(Skip(self.name, name, stateful_reason(stateful)))
            else:
                sites.append(Site(self.name, name, "keeps only its inputs; its forward runs again in backward "
                                                   "(one more forward of the block)"))
        return sites, skips

    def apply(self, model: nn.Module, site: Site, facts: ModelFacts) -> nn.Module:
        module = model.get_submodule(site.module_name)
        module.forward = CheckpointedForward(module, self.boundary)
        return model


STATEFUL_CALL = "its call passes "
"""How the reason a block is not checkpointed because of its call's objects begins."""


def stateful_reason(arguments: tuple[str, ...]) -> str:
    """Why a block whose call passes objects (``TraceResult.stateful_arguments``) is not checkpointed."""
    return (f"{STATEFUL_CALL}{', '.join(arguments)}: an object the block may update, and running it again "
            "in backward would update it twice (a Hugging Face cache: set model.config.use_cache = False, as "
            "transformers' own gradient checkpointing does, to let the planner checkpoint it)")


PIECEWISE_LINEAR = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Hardtanh, nn.PReLU, nn.RReLU)
"""Activations whose backward depends only on which piece the input falls in: recomputed from a k-bit
input, inputs near a kink change piece and their gradients flip."""


class CopiedBoundaryRule(CheckpointRule):
    """Checkpoint whole blocks that keep 4-bit copies of their inputs (planner only, like checkpointing).

    A block recomputed from a decoded input is approximate throughout, so only
    blocks where that stays close to BP qualify: those without batch norm and
    without ReLU-like activation modules. Gradient cosine to BP with every
    block taken (``python benchmarks/boundary.py``): at 4 bits 0.9996 or more
    on the BERT, ViT, Mixer and GPT examples, 0.996-0.9997 on timm
    ViT-S, ConvNeXt-atto, Swin-T and Hugging Face Llama, GPT-2 and BERT. Left
    out: the ResNets (0.82 and 0.44 on the examples, 0.45 on torchvision
    ResNet-50; 0.95 even at 8 bits: batch statistics of a perturbed input move
    every output, and ReLU masks flip) and Hugging Face OPT's ReLU MLP (0.970).
    A ReLU called as a function inside a block is not seen.
    """

    name: ClassVar[str] = BOUNDARY_NAME
    description: ClassVar[str] = ("whole blocks under non-reentrant checkpointing that keep 4-bit copies of "
                                  "their inputs: backward runs their forward again on the decoded copies")
    gradient_exact: ClassVar[bool] = False
    boundary: ClassVar[ApproxOptions | None] = ApproxOptions(bits=4)

    def find(self, facts: ModelFacts) -> tuple[list[Site], list[Skip]]:
        """The blocks checkpointing takes, less those whose gradient strays (``why_not``)."""
        sites, skips = super().find(facts)
        kept = []
        for site in sites:
            reason = why_not_copied(facts.modules[site.module_name])
            if reason is not None:
                skips.append(Skip(self.name, site.module_name, reason))
            else:
                kept.append(replace(site, rule=self.name, reason="keeps a 4-bit copy of its inputs; its "
                                    "forward runs again in backward on the decoded copy"))
        return kept, skips


def why_not_copied(block: nn.Module) -> str | None:
    """Why ``block`` must keep its inputs in full when checkpointed, or None when 4-bit copies do."""
    for module in block.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            return ("has batch norm: recomputed from a k-bit input, its batch statistics and masks move "
                    "every gradient (cosine to BP 0.95 at 8 bits on ResNet-50)")
        if isinstance(module, PIECEWISE_LINEAR):
            return (f"has {type(module).__name__}: recomputed from a k-bit input, its masks flip "
                    "(cosine to BP 0.970 at 4 bits on OPT)")
    return None


@contextmanager
def checkpoint_inputs(model: nn.Module, key: Callable[[torch.UntypedStorage], int]
                      ) -> Iterator[dict[str, dict[int, int]]]:
    """Record, per checkpointed block of ``model``, the storages of the inputs it keeps in full:
    name -> {key: bytes}. (The k-bit copies a block keeps instead are saved tensors, which
    saved-tensor hooks outside see.)

    A storage two blocks take is recorded once, at the first. Parameters and
    buffers are not inputs. ``key`` tells storages apart (``memory.storage_key``
    for real tensors; the storage identity for fake ones).
    """
    names = {id(module): name for name, module in model.named_modules() if is_checkpointed(module)}
    own = {key(t.untyped_storage()) for t in (*model.parameters(), *model.buffers())}
    seen: set[int] = set()
    recorded: dict[str, dict[int, int]] = {}
    alive: list[torch.UntypedStorage] = []

    def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
        if id(module) not in names or not torch.is_grad_enabled():
            return
        storages = recorded.setdefault(names[id(module)], {})
        for tensor in module.forward.kept_in_full(args, kwargs):
            storage = tensor.untyped_storage()
            storage_id = key(storage)
            if storage_id in own or storage_id in seen or storage.nbytes() == 0:
                continue
            seen.add(storage_id)
            alive.append(storage)
            storages[storage_id] = storage.nbytes()

    handles = [model.get_submodule(name).register_forward_pre_hook(record, with_kwargs=True)
               for name in names.values()]
    try:
        yield recorded
    finally:
        for handle in handles:
            handle.remove()


def held_by_checkpoints(model: nn.Module, forward: Callable[[], Any],
                        key: Callable[[torch.UntypedStorage], int]) -> dict[str, int]:
    """Run ``forward()`` (a call of ``model``); per checkpointed block, its input bytes nothing else saves.

    Saved-tensor hooks outside the checkpoint regions see every other save, so
    an input that a module outside also keeps (the ReLU before a ResNet block)
    is counted there, not twice.
    """
    saved: set[int] = set()
    alive: list[torch.UntypedStorage] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        saved.add(key(storage))
        alive.append(storage)
        return tensor.detach()  # as memory.measure_saved

    pack.aalconvert_observer = True  # unpack is the identity: it takes any number of unpacks
    try:
        with checkpoint_inputs(model, key) as inputs:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
                forward()
    finally:
        alive.clear()  # as memory.measure_saved
    return {name: sum(b for k, b in storages.items() if k not in saved) for name, storages in inputs.items()}


def with_checkpoint_inputs(saved: SavedByModule, held: dict[str, int]) -> SavedByModule:
    """``saved`` with the bytes each checkpointed block holds (its inputs) counted at the block."""
    counted = dict(saved.bytes_by_module)
    for name, nbytes in held.items():
        counted[name] = counted.get(name, 0) + nbytes
    return replace(saved, bytes_by_module=counted)


def recompute_bytes(plan_blocks: list[str], bp: SavedByModule) -> int:
    """Bytes alive again while the largest checkpointed block recomputes: what BP keeps inside it."""
    return max((sum(b for name, b in bp.bytes_by_module.items() if inside(name, block))
                for block in plan_blocks), default=0)

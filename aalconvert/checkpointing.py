"""Activation checkpointing of whole blocks, as one of the budget planner's options.

A checkpointed block runs its own class's forward under
``torch.utils.checkpoint(..., use_reentrant=False)``: it keeps only its inputs,
and backward runs its forward once more (same RNG state, so the same
gradients). It is a per-instance ``forward`` attribute, not a new class or a
wrapper module, so parameter names, ``state_dict`` keys and the module tree stay
the user's; ``revert`` removes it.

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

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from aalconvert.facts import ModelFacts
from aalconvert.memory import SavedByModule, tensors_in
from aalconvert.rules.base import Rule, Site, Skip

NAME = "checkpoint"


class CheckpointedForward:
    """A module's instance-level ``forward``: its class's forward under non-reentrant checkpointing.

    Without grad mode (eval, ``no_grad``) there is nothing to keep, so the plain forward runs.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        forward = type(self.module).forward
        if not torch.is_grad_enabled():
            return forward(self.module, *args, **kwargs)
        return checkpoint(forward, self.module, *args, use_reentrant=False, **kwargs)


def is_checkpointed(module: nn.Module) -> bool:
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
        sites = [Site(self.name, name, "keeps only its inputs; its forward runs again in backward "
                                       "(one more forward of the block)")
                 for name in (names if self.first_block else names[1:])]
        return sites, skips

    def apply(self, model: nn.Module, site: Site, facts: ModelFacts) -> nn.Module:
        module = model.get_submodule(site.module_name)
        module.forward = CheckpointedForward(module)
        return model


@contextmanager
def checkpoint_inputs(model: nn.Module, key: Callable[[torch.UntypedStorage], int]
                      ) -> Iterator[dict[str, dict[int, int]]]:
    """Record, per checkpointed block of ``model``, the storages of its inputs: name -> {key: bytes}.

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
        for tensor in tensors_in((args, kwargs)):
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

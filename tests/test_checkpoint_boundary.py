"""Checkpointed blocks that keep 4-bit copies of their inputs (the budget planner's ``checkpoint4``)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from aalconvert.checkpointing import (
    CheckpointedForward, CopiedBoundaryRule, checkpoint_inputs, checkpoint_from_copies)
from aalconvert.facts import gather_facts
from aalconvert.memory import measure_saved, storage_key
from aalconvert.nn.approx_common import compress
from examples import EXAMPLES

BOUNDARY = CopiedBoundaryRule.boundary


def vit(batch: int = 16, **sizes) -> tuple[nn.Module, tuple]:
    torch.manual_seed(0)
    example = EXAMPLES["vit"]
    return example.build_model(**sizes).train(), example.example_inputs(batch_size=batch)


def checkpointed(model: nn.Module, boundary) -> nn.Module:
    model = copy.deepcopy(model)
    for block in model.blocks:
        block.forward = CheckpointedForward(block, boundary)
    return model


def output_and_gradients(model: nn.Module, inputs: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # the same dropout draws
    output = model(*inputs)
    output.logsumexp(-1).mean().backward()
    return output.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])


def kept_bytes(model: nn.Module, inputs: tuple) -> int:
    """What a forward keeps: saved tensors, and the block inputs checkpoints keep in full."""
    torch.manual_seed(1)
    with checkpoint_inputs(model, storage_key) as held:
        saved = measure_saved(lambda: model(*inputs), model.parameters())
    return saved.nbytes + sum(b for storages in held.values() for k, b in storages.items()
                              if k not in saved.storages)


def test_the_forward_is_exact_and_the_gradient_stays_close_to_bp():
    model, inputs = vit()
    bp_output, bp_grads = output_and_gradients(model, inputs)
    output, grads = output_and_gradients(checkpointed(model, BOUNDARY), inputs)
    assert torch.equal(output, bp_output)
    assert not torch.equal(grads, bp_grads)  # backward really ran on the decoded copies
    assert F.cosine_similarity(grads, bp_grads, dim=0) >= 0.999


def test_each_block_keeps_a_4_bit_copy_instead_of_its_input():
    model, inputs = vit()
    shapes = []
    model.blocks[0].register_forward_hook(lambda module, args, output: shapes.append(args[0].shape))
    with torch.no_grad():
        model(*inputs)
    tokens = torch.zeros(shapes[0])
    parts, _ = compress(tokens, BOUNDARY)
    packed = sum(part.untyped_storage().nbytes() for part in parts)
    full = kept_bytes(checkpointed(model, None), inputs)
    copied = kept_bytes(checkpointed(model, BOUNDARY), inputs)
    assert full - copied == len(model.blocks) * (tokens.numel() * tokens.element_size() - packed)


def test_inputs_too_small_or_without_grad_are_kept_as_they_are():
    torch.manual_seed(0)
    block = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8), nn.GELU())
    x = torch.randn(4, 8, requires_grad=True)  # 32 elements: under min_numel
    scale = torch.randn(1, 8)  # no grad
    plain = block(x * scale).sum()
    expected = torch.autograd.grad(plain, [x, *block.parameters()])
    copied = checkpoint_from_copies(lambda a, s: block(a * s), (x,), {"s": scale}, BOUNDARY).sum()
    got = torch.autograd.grad(copied, [x, *block.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(expected, got))


def test_double_precision_inputs_are_kept_exact():
    torch.manual_seed(0)
    block = nn.Sequential(nn.LayerNorm(64), nn.Linear(64, 64)).double()
    x = torch.randn(128, 64, dtype=torch.float64, requires_grad=True)  # large, but not quantizable
    expected = torch.autograd.grad(block(x).square().sum(), x)[0]
    got = torch.autograd.grad(checkpoint_from_copies(block, (x,), {}, BOUNDARY).square().sum(), x)[0]
    assert torch.equal(expected, got)


def test_two_forwards_before_one_backward_accumulate_as_two_steps():
    model, inputs = vit(dropout=0.0)  # no draws: the two orders see the same model function
    model = checkpointed(model, BOUNDARY)
    second = (inputs[0].flip(0),)
    torch.manual_seed(1)
    (model(*inputs).logsumexp(-1).mean() + model(*second).logsumexp(-1).mean()).backward()
    together = torch.cat([p.grad.flatten() for p in model.parameters()])
    separate = output_and_gradients(model, inputs)[1] + output_and_gradients(model, second)[1]
    torch.testing.assert_close(together, separate)


def test_forward_hooks_see_one_call_per_forward_and_eval_runs_the_plain_forward():
    model, inputs = vit(batch=4)
    model = checkpointed(model, BOUNDARY)
    calls = []
    model.blocks[1].register_forward_hook(lambda module, args, output: calls.append(output.shape))
    model(*inputs).sum().backward()
    assert len(calls) == 1  # backward's second run calls the class's forward, not the module
    with torch.no_grad():
        model(*inputs)
    assert len(calls) == 2


def test_the_rule_takes_blocks_without_batch_norm_or_relu_and_says_why_it_leaves_the_others():
    vit_model, vit_inputs = vit(batch=2)
    sites, skips = CopiedBoundaryRule().find(gather_facts(vit_model, vit_inputs))
    assert [site.module_name for site in sites] == [f"blocks.{i}" for i in range(len(vit_model.blocks))]
    assert all(site.rule == "checkpoint4" for site in sites) and not skips
    example = EXAMPLES["resnet_basic"]
    resnet = example.build_model(width=4, image_size=16)
    sites, skips = CopiedBoundaryRule().find(gather_facts(resnet, example.example_inputs(
        batch_size=2, width=4, image_size=16)))
    assert not sites and skips and all("batch norm" in skip.reason for skip in skips)
    transformer = EXAMPLES["transformer"]  # its blocks have a ReLU feed-forward network
    model = transformer.build_model()
    sites, skips = CopiedBoundaryRule().find(gather_facts(model, transformer.example_inputs(batch_size=2)))
    assert not sites and skips and all("has ReLU" in skip.reason for skip in skips)


@pytest.mark.parametrize("reentrant_outside", [False, True])
def test_a_users_checkpoint_around_the_model_still_gives_close_gradients(reentrant_outside):
    model, inputs = vit(batch=8)
    bp_grads = output_and_gradients(model, inputs)[1]
    copied = checkpointed(model, BOUNDARY)
    images = inputs[0].clone().requires_grad_(reentrant_outside)  # reentrant needs an input with grad
    copied.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    checkpoint(copied, images, use_reentrant=reentrant_outside).logsumexp(-1).mean().backward()
    grads = torch.cat([p.grad.flatten() for p in copied.parameters()])
    assert F.cosine_similarity(grads, bp_grads, dim=0) >= 0.999

"""Converted models under DistributedDataParallel and FSDP2: 2 CPU processes, gloo (issue 7).

One spawn of two ranks runs everything (process start-up dominates the time):
the README's DDP and FSDP2 blocks, then DDP training of ``exact`` and ``ara``
ResNets and an ``asa`` ViT, then FSDP2 (``fully_shard``) training of the ``ara``
ResNet and the ``asa`` ViT. Each rank saves its final parameters; the test process compares the ranks
with each other and with a single-process run on the same global batch
(gradients of the two shards accumulated, each loss divided by the world size,
which is the average DDP and FSDP take; shard by shard, because without
SyncBatchNorm each rank's batch norm uses its own shard's statistics).
"""

import os
import re
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import aalconvert
from examples import EXAMPLES
from spawn import run_ranks

WORLD = 2
STEPS = 3
GLOBAL_BATCH = 4
MODELS = {
    "resnet_basic": dict(width=4, layers=(2, 1, 1, 1), image_size=16),
    "vit": dict(dropout=0.0, depth=2, dim=16, num_heads=2, image_size=16),
}
DDP_CASES = [("resnet_basic", "exact"), ("resnet_basic", "ara"), ("vit", "asa")]
FSDP_CASES = [("resnet_basic", "ara"), ("vit", "asa")]
README = Path(__file__).resolve().parents[1] / "README.md"


def _readme_blocks() -> list[str]:
    section = README.read_text().split("\n## Multi-GPU (DDP/FSDP)\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def _model_and_batch(name: str, rules: str) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    example = EXAMPLES[name]
    overrides = MODELS[name]
    model = example.build_model(**overrides)
    (images,) = example.example_inputs(batch_size=GLOBAL_BATCH, **overrides)
    converted = aalconvert.convert(model, rules, example_inputs=(images,))
    kinds = {type(m).__name__ for m in converted.modules()}
    assert {"exact": "MaskReLU", "ara": "ARAConv2d", "asa": "ASALinear"}[rules] in kinds
    labels = torch.arange(GLOBAL_BATCH) % 10
    return converted, images, labels


def _train(model, images, labels, shards: list[slice], loss_scale: float) -> None:
    """STEPS SGD steps; each step accumulates ``loss_scale * loss`` of every shard."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(STEPS):
        for shard in shards:
            (F.cross_entropy(model(images[shard]), labels[shard]) * loss_scale).backward()
        optimizer.step()
        optimizer.zero_grad()


def _shard(rank: int) -> slice:
    return slice(rank, None, WORLD)


def _replica(rank: int, port: int, out_dir: str) -> None:
    """One rank: README blocks, DDP cases, FSDP2 cases; final parameters saved to out_dir."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    ddp_block, fsdp_block = _readme_blocks()
    namespace: dict = {}
    exec(ddp_block, namespace)  # initialises the process group (gloo)
    results = {"readme ddp": [p.detach().clone() for p in namespace["model"].module.parameters()]}
    exec(fsdp_block, namespace)
    results["readme fsdp loss"] = namespace["loss"].detach()
    for name, rules in DDP_CASES:
        model, images, labels = _model_and_batch(name, rules)
        _train(DistributedDataParallel(model), images, labels, [_shard(rank)], loss_scale=1.0)
        results[f"ddp {name} {rules}"] = [p.detach().clone() for p in model.parameters()]
    from torch.distributed.fsdp import fully_shard

    for name, rules in FSDP_CASES:
        model, images, labels = _model_and_batch(name, rules)
        stages = model.blocks if name == "vit" else [model.layer1, model.layer2, model.layer3, model.layer4]
        for stage in stages:
            fully_shard(stage)
        fully_shard(model)
        _train(model, images, labels, [_shard(rank)], loss_scale=1.0)
        results[f"fsdp2 {name} {rules}"] = [p.full_tensor().detach().clone() for p in model.parameters()]
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """Run ``_replica`` on WORLD spawned processes; their saved results, by rank."""
    out_dir = tmp_path_factory.mktemp("ranks")
    run_ranks(_replica, str(out_dir), WORLD, timeout_s=240)
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in range(WORLD)]


def _single_process(name: str, rules: str) -> list[torch.Tensor]:
    model, images, labels = _model_and_batch(name, rules)
    _train(model, images, labels, [_shard(rank) for rank in range(WORLD)], loss_scale=1 / WORLD)
    return [p.detach() for p in model.parameters()]


def _assert_replicas_equal_single_process(ranks: list[dict], key: str, name: str, rules: str) -> None:
    first, second = (r[key] for r in ranks)
    assert [torch.equal(a, b) for a, b in zip(first, second)] == [True] * len(first)
    reference = _single_process(name, rules)
    initial = [p.detach() for p in _model_and_batch(name, rules)[0].parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(first, initial))  # it did train
    for trained, expected in zip(first, reference):
        torch.testing.assert_close(trained, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name, rules", DDP_CASES)
def test_ddp_replicas_stay_identical_and_equal_a_single_process_run(ranks, name, rules):
    _assert_replicas_equal_single_process(ranks, f"ddp {name} {rules}", name, rules)


@pytest.mark.parametrize("name, rules", FSDP_CASES)
def test_fsdp2_fully_shard_trains_like_a_single_process_run(ranks, name, rules):
    _assert_replicas_equal_single_process(ranks, f"fsdp2 {name} {rules}", name, rules)


def test_readme_ddp_and_fsdp_blocks_run_and_replicas_agree(ranks):
    first, second = (r["readme ddp"] for r in ranks)
    assert [torch.equal(a, b) for a, b in zip(first, second)] == [True] * len(first)
    assert all(torch.isfinite(r["readme fsdp loss"]) for r in ranks)

"""Checkpoints of converted models, and activation checkpointing around converted blocks (issue 7).

- state_dicts move both ways between a converted model and its original architecture;
- training resumed from model + optimizer + RNG state repeats the uninterrupted run exactly;
- ``torch.save(model)`` / ``torch.load`` of a whole converted module keeps its wiring;
- ``torch.utils.checkpoint(use_reentrant=False)`` around converted blocks gives the
  unchecked converted model's gradients and keeps no more than around plain blocks;
  a checkpoint region that splits an ARA group raises instead of giving BP's gradients.
"""

import copy
import io

import pytest
import torch
from torch import nn

import aalconvert
from aalconvert.errors import WiringError
from aalconvert.memory import measure_saved
from aalconvert.rules.wiring import TensorSlot, wiring_of
from examples import EXAMPLES
from checkpointed import Checkpointed

MODELS = {
    "resnet_basic": dict(width=4, image_size=16),
    "vit": dict(dropout=0.1, depth=2, dim=16, num_heads=2, image_size=16),
}
# Each rule on the model it rewrites; the ViT keeps dropout on, so the RNG state matters.
CASES = [
    ("resnet_basic", "exact"),
    ("resnet_basic", "ara"),
    ("resnet_basic", "approx4"),
    ("vit", "exact"),
    ("vit", "recompute"),
    ("vit", "asa"),
    ("vit", "auto"),
]
RESUME_CASES = [("vit", "exact"), ("resnet_basic", "ara"), ("vit", "asa")]

def _build(name: str, seed: int = 0) -> tuple[nn.Module, tuple]:
    torch.manual_seed(seed)
    example = EXAMPLES[name]
    model = example.build_model(**MODELS[name])
    return model, example.example_inputs(batch_size=2, **MODELS[name])


def _converted(name: str, rules: str, seed: int = 0) -> tuple[nn.Module, tuple]:
    model, inputs = _build(name, seed)
    return aalconvert.convert(model, rules, example_inputs=inputs), inputs


def _gradients(model: nn.Module, inputs: tuple, seed: int = 1) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    model(*inputs).square().mean().backward()
    return [p.grad.clone() for p in model.parameters()]


def _all_equal(first: list[torch.Tensor], second: list[torch.Tensor]) -> bool:
    return len(first) == len(second) and all(torch.equal(a, b) for a, b in zip(first, second))


# ------------------------------------------------------------------ state_dict


@pytest.mark.parametrize("name, rules", CASES)
def test_state_dicts_move_between_converted_and_original_architectures(name, rules):
    converted, _ = _converted(name, rules, seed=0)
    plain, _ = _build(name, seed=1)
    plain.load_state_dict(converted.state_dict())  # strict: same keys, same shapes
    assert _all_equal(list(plain.state_dict().values()), list(converted.state_dict().values()))
    other, _ = _build(name, seed=2)
    converted.load_state_dict(other.state_dict())
    assert _all_equal(list(converted.state_dict().values()), list(other.state_dict().values()))


# ------------------------------------------------------------------ resuming


def _steps(model: nn.Module, optimizer: torch.optim.Optimizer, inputs: tuple, count: int) -> list[float]:
    losses = []
    for _ in range(count):
        loss = model(*inputs).logsumexp(-1).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("name, rules", RESUME_CASES)
def test_training_resumed_from_a_checkpoint_repeats_the_uninterrupted_run_exactly(name, rules):
    model, inputs = _converted(name, rules)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _steps(model, optimizer, inputs, 2)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "rng": torch.get_rng_state()}, buffer)
    uninterrupted = _steps(model, optimizer, inputs, 2)

    buffer.seek(0)
    state = torch.load(buffer)
    resumed, _ = _converted(name, rules, seed=5)  # other initial weights, overwritten by the load
    resumed.load_state_dict(state["model"])
    resumed_optimizer = torch.optim.AdamW(resumed.parameters(), lr=1e-2)
    resumed_optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    assert _steps(resumed, resumed_optimizer, inputs, 2) == uninterrupted
    assert _all_equal(list(resumed.state_dict().values()), list(model.state_dict().values()))


# ------------------------------------------------------------- whole modules


def _pickled(model: nn.Module) -> nn.Module:
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def _wiring_count(model: nn.Module) -> int:
    return sum(len(wiring_of(m)) for m in model.modules())


def _assert_pickled_copy_trains_like_the_original(model: nn.Module, inputs: tuple) -> None:
    copy = _pickled(model)
    assert _wiring_count(copy) == _wiring_count(model)
    # ARA and ASA gradients differ from BP's, so equal gradients prove the wiring was carried.
    assert _all_equal(_gradients(copy, inputs), _gradients(model, inputs))
    optimizer = torch.optim.SGD(copy.parameters(), lr=0.1)
    before = [p.detach().clone() for p in copy.parameters()]
    _steps(copy, optimizer, inputs, 1)
    assert not _all_equal(before, [p.detach() for p in copy.parameters()])


@pytest.mark.parametrize(
    "name, rules",
    CASES,
)
def test_whole_converted_module_survives_torch_save_and_load_with_its_wiring(name, rules):
    model, inputs = _converted(name, rules)
    _assert_pickled_copy_trains_like_the_original(model, inputs)


def test_asa_module_survives_torch_save_after_a_forward():
    model, inputs = _converted("vit", "asa")
    model(*inputs).sum().backward()
    _assert_pickled_copy_trains_like_the_original(model, inputs)


def test_ara_anchor_wiring_survives_torch_save_after_a_forward():
    model, inputs = _converted("resnet_basic", "ara")
    assert any(isinstance(s, TensorSlot) for m in model.modules() for s in wiring_of(m))
    model(*inputs).sum().backward()
    _assert_pickled_copy_trains_like_the_original(model, inputs)


# ------------------------------------------------- activation checkpointing


def _checkpoint_blocks(model: nn.Module, name: str, per_block: bool) -> None:
    """Wrap the ViT's blocks, or the ResNet's first stage (whole or block by block)."""
    if name == "vit":
        for index, block in enumerate(model.blocks):
            model.blocks[index] = Checkpointed(block)
    elif per_block:
        for index, block in enumerate(model.layer1):
            model.layer1[index] = Checkpointed(block)
    else:
        model.layer1 = Checkpointed(model.layer1)


def _saved_bytes(model: nn.Module, inputs: tuple) -> int:
    torch.manual_seed(1)
    return measure_saved(lambda: model(*inputs), exclude=list(model.parameters())).nbytes


@pytest.mark.parametrize("name, rules", CASES)
def test_checkpointed_converted_blocks_give_unchecked_gradients_and_keep_no_more_than_plain(name, rules):
    # The whole first ResNet stage is one region: its ARA group (2 blocks) stays inside it.
    model, inputs = _converted(name, rules)
    unchecked = _gradients(model, inputs)
    _checkpoint_blocks(model, name, per_block=False)
    assert _all_equal(_gradients(model, inputs), unchecked)
    plain, _ = _build(name)
    _checkpoint_blocks(plain, name, per_block=False)
    assert _saved_bytes(model, inputs) <= _saved_bytes(plain, inputs)
    slots = [s for m in model.modules() for s in wiring_of(m) if isinstance(s, TensorSlot)]
    assert [s.tensor for s in slots] == [None] * len(slots)


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpointed_approx_blocks_recompute_from_exact_inputs(reentrant):
    # Block inputs large enough for the k-bit packer (at MODELS' sizes they are under min_numel):
    # checkpoint keeps them to run the block again, and a k-bit copy there would make the whole
    # recomputed block approximate (the gradient's cosine to BP fell to 0.80 on the ResNet example).
    torch.manual_seed(0)
    sizes = dict(width=16, image_size=32)
    example = EXAMPLES["resnet_basic"]
    inputs = example.example_inputs(batch_size=16, **sizes)
    model = aalconvert.convert(example.build_model(**sizes), "approx4", example_inputs=inputs)
    assert model.layer1[0](model.maxpool(model.relu(model.bn1(model.conv1(*inputs))))).numel() >= 4096
    unchecked = _gradients(model, inputs)
    for index, block in enumerate(model.layer1):
        model.layer1[index] = Checkpointed(block, reentrant=reentrant)
    assert _all_equal(_gradients(model, inputs), unchecked)


def test_checkpoint_splitting_an_ara_group_fails_loudly_instead_of_giving_bp_gradients():
    # Recomputing one block of a group in backward has no anchor (the group's first block is
    # in another region): a silent fallback would give BP's weight gradient. It must raise.
    model, inputs = _converted("resnet_basic", "ara")
    _checkpoint_blocks(model, "resnet_basic", per_block=True)
    with pytest.raises(WiringError, match="checkpoint whole groups"):
        _gradients(model, inputs)


class _PostNormBlock(nn.Module):
    """A post-norm block (BERT's order): the norm that ends it feeds the next block's first layer."""

    def __init__(self, width: int, bias: bool) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width, bias=bias)
        self.act = nn.GELU()
        self.out = nn.Linear(width, width, bias=bias)
        self.norm = nn.LayerNorm(width)

    def forward(self, x):
        return self.norm(x + self.out(self.act(self.fc(x))))


class _PostNormNet(nn.Module):
    """Recompute chains that cross block boundaries: block i's norm -> block i+1's ``fc``."""

    def __init__(self, bias: bool, width: int = 32) -> None:
        super().__init__()
        self.stem = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)
        self.blocks = nn.Sequential(*(_PostNormBlock(width, bias) for _ in range(3)))
        self.head = nn.Linear(width, 4)

    def forward(self, x):
        return self.head(self.blocks(self.norm(self.stem(x))))


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("rules", ["recompute", "auto"])
def test_checkpoint_regions_cutting_recompute_chains_give_bps_gradients(bias, when, rules):
    # A chain start outside a checkpointed block feeds a layer inside it: backward runs the layer
    # again without the chain start, and torch's checkpoint matches what the two runs saved by
    # count and shape only. The layer must keep its input in both runs (it used to keep the chain
    # input in the forward and its input in the recomputation: a CheckpointError, or with equal
    # counts and shapes, a weight gradient rebuilt from the wrong tensor).
    torch.manual_seed(0)
    model, inputs = _PostNormNet(bias), (torch.randn(8, 32),)
    reference = copy.deepcopy(model)
    for blocks in (reference.blocks, model.blocks) if when == "before" else (reference.blocks,):
        for index, block in enumerate(blocks):
            blocks[index] = Checkpointed(block)
    converted = aalconvert.convert(model, rules, example_inputs=inputs)
    if when == "after":
        for index, block in enumerate(converted.blocks):
            converted.blocks[index] = Checkpointed(block)
    expected, got = _gradients(reference, inputs), _gradients(converted, inputs)
    if rules == "recompute":
        assert _all_equal(got, expected)
    else:  # auto's lossy rules: close to BP, and the run must not raise
        assert all(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), 0) > 0.99
                   for a, b in zip(got, expected))


@pytest.mark.parametrize("rules", ["recompute", "exact"])
def test_hugging_face_gradient_checkpointing_and_conversion_give_its_gradients(rules):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=2, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0, num_labels=3)
    model = transformers.BertForSequenceClassification(config).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids, labels = torch.randint(0, 64, (2, 8)), torch.tensor([0, 2])
    reference = copy.deepcopy(model)
    converted = aalconvert.convert(model, rules, example_inputs=(ids,))
    grads = []
    for net in (reference, converted):
        net(input_ids=ids, labels=labels).loss.backward()
        grads.append([p.grad for p in net.parameters()])
    assert _all_equal(*grads)

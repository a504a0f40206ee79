"""Every rule on every example model: runs, keeps no more than BP, exactness flags hold, ARA/ASA wiring."""

import dataclasses
import math

import pytest
import torch
from torch import nn

import aalconvert
from aalconvert.analysis import group_blocks
from aalconvert.api import plan_conversion
from aalconvert.facts import gather_facts
from aalconvert.memory import measure_saved
from aalconvert.nn.ara import ARAConv2d
from aalconvert.nn.asa import ASALinear
from aalconvert.checkpointing import CheckpointRule, is_checkpointed
from aalconvert.rules.registry import NAMES, resolve
from aalconvert.rules.wiring import SharedPack, TensorSlot, wiring_of
from examples import EXAMPLES
from threads import run_in_threads

BATCH = 4
RULE_CHOICES = [*NAMES, ["auto", "approx4"], ["ara", "approx4"]]
FORWARD_EXACT = ["exact", "recompute", "ara", "approx8", "approx4", "approx2"]


def rule_id(rules) -> str:
    return "+".join(rules) if isinstance(rules, list) else rules


def build(name: str, **overrides) -> nn.Module:
    torch.manual_seed(0)
    return EXAMPLES[name].build_model(**overrides).train()


def no_dropout(name: str) -> dict:
    fields = {f.name for f in dataclasses.fields(EXAMPLES[name].config)}
    return {"dropout": 0.0} if "dropout" in fields else {}


def inputs_of(name: str, **overrides) -> tuple:
    return EXAMPLES[name].example_inputs(batch_size=BATCH, **overrides)


def kept_bytes(model: nn.Module, inputs: tuple, seed: int = 1):
    """Bytes the forward keeps for backward (parameters excluded), and the output."""
    torch.manual_seed(seed)
    saved = measure_saved(lambda: model(*inputs), exclude=list(model.parameters()))
    return saved.nbytes, saved.output


def loss_of(output: torch.Tensor) -> torch.Tensor:
    return output.float().square().mean()


@pytest.mark.parametrize("rules", RULE_CHOICES, ids=rule_id)
@pytest.mark.parametrize("example", list(EXAMPLES))
def test_every_rule_on_every_example_trains_and_keeps_at_most_bp(example, rules):
    model = build(example)
    inputs = inputs_of(example)
    bp_bytes, _ = kept_bytes(model, inputs)
    plan, _ = plan_conversion(model, rules)
    converted = aalconvert.convert(model, rules)
    nbytes, output = kept_bytes(converted, inputs)
    loss_of(output).backward()
    grads = [p.grad for p in converted.parameters() if p.requires_grad]
    assert any(g is not None for g in grads)
    assert all(torch.isfinite(g).all() for g in grads if g is not None)
    assert nbytes <= bp_bytes
    if plan.sites:  # default configs keep dropout active, so every accepted site saves bytes
        assert nbytes < bp_bytes, f"{len(plan.sites)} sites accepted but nothing saved"


@pytest.mark.parametrize("rules", FORWARD_EXACT)
@pytest.mark.parametrize("example", list(EXAMPLES))
def test_forward_exact_rules_give_bit_identical_outputs(example, rules):
    overrides = no_dropout(example)
    model = build(example, **overrides)
    inputs = inputs_of(example)
    converted = aalconvert.convert(model, rules)
    torch.manual_seed(3)
    expected = model(*inputs)
    torch.manual_seed(3)
    actual = converted(*inputs)
    assert torch.equal(actual, expected)
    if rules in ("exact", "recompute"):
        expected_grads = torch.autograd.grad(loss_of(expected), list(model.parameters()), allow_unused=True)
        actual_grads = torch.autograd.grad(loss_of(actual), list(converted.parameters()), allow_unused=True)
        for name, e, a in zip([n for n, _ in model.named_parameters()], expected_grads, actual_grads):
            assert (e is None) == (a is None), name
            assert e is None or torch.equal(a, e), f"{rules}: gradient of {name} differs"


@pytest.mark.parametrize("example", ["vit", "bert", "mixer"])
def test_asa_changes_the_forward(example):
    model = build(example, **no_dropout(example))
    inputs = inputs_of(example)
    converted = aalconvert.convert(model, "asa")
    assert any(isinstance(m, ASALinear) for m in converted.modules())
    assert not torch.equal(converted(*inputs), model(*inputs))


@pytest.mark.parametrize("example", list(EXAMPLES))
def test_exact_never_keeps_more_and_keeps_less_where_a_mask_pays(example):
    # Dropout active: every example has a ReLU, dropout or max-pool that keeps something.
    model = build(example)
    inputs = inputs_of(example)
    bp_bytes, _ = kept_bytes(model, inputs)
    assert kept_bytes(aalconvert.convert(model, "exact"), inputs)[0] < bp_bytes
    # Dropout off: nothing may get worse; ResNets still gain from the max-pool argmax.
    quiet = build(example, **no_dropout(example))
    bp_quiet, _ = kept_bytes(quiet, inputs)
    exact_quiet, _ = kept_bytes(aalconvert.convert(quiet, "exact"), inputs)
    assert exact_quiet <= bp_quiet
    if any(isinstance(m, nn.MaxPool2d) for m in quiet.modules()):
        assert exact_quiet < bp_quiet


def slots_of(model: nn.Module) -> set:
    return {owner for module in model.modules() for owner in wiring_of(module)}


def test_ara_releases_anchor_feeds_layers_and_drops_the_block_inputs():
    model = build("resnet_basic")
    inputs = inputs_of("resnet_basic")
    facts = gather_facts(model, inputs)
    groups = group_blocks(facts.blocks, 2)
    assert groups and all(len(g.blocks) >= 2 for g in groups)
    converted = aalconvert.convert(model, "ara", example_inputs=inputs)

    # Expected drop against the exact tier every rule set includes (its masks already cover
    # these ResNets' shared ReLU modules): each non-first block input is no longer kept,
    # because its conv takes dW from the anchor.
    dropped = sum(math.prod(b.input_shape) * 4 for g in groups for b in g.blocks[1:])
    exact_bytes, _ = kept_bytes(aalconvert.convert(model, "exact", example_inputs=inputs), inputs)
    ara_bytes, ara_out = kept_bytes(converted, inputs)
    assert exact_bytes - ara_bytes == dropped

    slots = [s for s in slots_of(converted) if isinstance(s, TensorSlot)]
    assert len(slots) == len(groups)
    assert all(s.tensor is None for s in slots), "anchor outlived the forward"

    loss_of(ara_out).backward()  # the converted model shares model's Parameters: one backward only
    params = dict(model.named_parameters())
    ara_layers = {name for g in groups for name in g.ara_layers}
    anchor_layers = {name for g in groups for name in g.anchor_consumers}
    for name in ara_layers:
        assert isinstance(converted.get_submodule(name), ARAConv2d)
    # BP reference from an identical, separate model.
    reference = build("resnet_basic")
    torch.manual_seed(1)
    loss_of(reference(*inputs)).backward()
    ref = dict(reference.named_parameters())
    for name in ara_layers:
        assert not torch.equal(params[f"{name}.weight"].grad, ref[f"{name}.weight"].grad), name
    for name in anchor_layers:
        assert torch.equal(params[f"{name}.weight"].grad, ref[f"{name}.weight"].grad), name


def test_asa_query_key_value_share_one_packed_mask_counted_once():
    model = build("bert", **no_dropout("bert"))
    inputs = inputs_of("bert")
    converted = aalconvert.convert(model, "asa")
    prefix = "encoder.layer.0.attention.self"
    names = [f"{prefix}.{p}" for p in ("query", "key", "value")]
    assert all(isinstance(converted.get_submodule(n), ASALinear) for n in names)
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        converted.get_submodule(n).register_forward_pre_hook(
            lambda m, args, kwargs, n=n: seen.__setitem__(n, kwargs["packed_sign"]), with_kwargs=True)
        for n in names
    ]
    shared_bytes, _ = kept_bytes(converted, inputs)
    for hook in hooks:
        hook.remove()
    pointers = {seen[n].untyped_storage().data_ptr() for n in names}
    assert len(pointers) == 1
    # Without the shared pack every layer packs its own sign: two more masks per attention.
    for pack in [s for s in slots_of(converted) if isinstance(s, SharedPack)]:
        pack.remove()
    own_bytes, _ = kept_bytes(converted, inputs)
    attentions = sum(1 for n, _ in converted.named_modules() if n.endswith("attention.self"))
    assert own_bytes - shared_bytes == 2 * attentions * seen[names[0]].untyped_storage().nbytes()


class SharedLayerEncoder(nn.Module):
    """ALBERT's encoder: one post-norm layer whose Parameters every step reuses (``repeats`` calls);
    with ``outside``, the MLP's first layer is called once more outside any residual branch."""

    def __init__(self, dim: int = 16, repeats: int = 2, outside: bool = False):
        super().__init__()
        self.repeats, self.outside = repeats, outside
        self.up, self.down = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        for _ in range(self.repeats):
            x = self.norm(x + self.down(torch.tanh(self.up(x))))
        return self.up(x) if self.outside else x


def test_asa_takes_a_shared_layer_whose_every_call_is_in_a_residual_branch_summing_the_calls_formula():
    torch.manual_seed(0)
    x = torch.randn(4, 8, 16)
    model = aalconvert.convert(SharedLayerEncoder(), "asa", example_inputs=(x,))
    up = model.up
    assert isinstance(up, ASALinear) and isinstance(model.down, ASALinear)
    inputs, grads = [], []

    def record(module, args, output):
        inputs.append(args[0].detach())
        output.register_hook(grads.append)

    up.register_forward_hook(record)
    model(x).square().sum().backward()
    assert len(inputs) == len(grads) == 2
    grads.reverse()  # backward reaches the calls last to first
    signs = [torch.where(a > 0, 1.0, -1.0) for a in inputs]  # methods.md: x <= 0 maps to -1
    expected = sum(g.reshape(-1, g.shape[-1]).T @ s.reshape(-1, s.shape[-1]) for g, s in zip(grads, signs))
    torch.testing.assert_close(up.weight.grad, up.lr_expansion * up.eps * expected)


def test_asa_leaves_a_shared_layer_called_outside_a_residual_branch_and_says_why():
    plan, _ = plan_conversion(SharedLayerEncoder(outside=True), "asa", example_inputs=(torch.randn(4, 8, 16),))
    assert "up" not in plan.sites and "down" in plan.sites
    assert any(skip.module_name == "up" and "called 3 times, 1 of them outside a residual branch" in skip.reason
               for skip in plan.skips)


def test_threads_sharing_an_asa_model_get_their_own_shared_sign_packs():
    # The pack shared by query/key/value is cached per thread: a cache shared across threads
    # could hand one thread's sign mask to another's layers.
    model = aalconvert.convert(build("bert", **no_dropout("bert")), "asa")
    batches = [EXAMPLES["bert"].example_inputs(batch_size=BATCH + i) for i in range(4)]

    def grads(inputs):
        return torch.autograd.grad(loss_of(model(*inputs)), list(model.parameters()), allow_unused=True)

    expected = [grads(batch) for batch in batches]
    results = run_in_threads(grads, batches, repeats=5)
    for actual, reference in zip(results, expected, strict=True):
        assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(actual, reference))


@pytest.mark.parametrize("rules", ["exact", "recompute", "approx4", "asa", "auto", ["auto", "approx4"]],
                         ids=rule_id)
def test_layer_outputs_can_be_modified_in_place_as_the_plain_layers_can(rules):
    # F.linear on a 3-D input returns a view of its 2-D product; returned from a variant's
    # Function, autograd refused a following in-place op (torchvision Swin V2's cpb_mlp:
    # Linear -> ReLU(inplace=True)), where the plain layer's output allows it.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 16), nn.ReLU(inplace=True),
                          nn.Linear(16, 16))
    x = torch.randn(2, 5, 8)
    converted = aalconvert.convert(model, rules, example_inputs=(x,))

    def run(m):
        y = m(x)
        y += 1.0  # a residual-style in-place add on the last layer's output
        return torch.autograd.grad(loss_of(y), list(m.parameters()))

    expected, actual = run(model), run(converted)
    if rules in ("exact", "recompute"):
        assert all(torch.equal(a, e) for a, e in zip(actual, expected))
    assert all(torch.isfinite(a).all() for a in actual)


class PoolFormerBlock(nn.Module):
    """timm's PoolFormer block (MetaFormer): pooling token mixer, then an MLP of 1x1 convolutions."""

    def __init__(self, channels: int = 32):
        super().__init__()
        self.norm1 = nn.GroupNorm(1, channels)
        self.pool = nn.AvgPool2d(3, 1, 1, count_include_pad=False)
        self.norm2 = nn.GroupNorm(1, channels)
        self.fc1 = nn.Conv2d(channels, 4 * channels, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(4 * channels, channels, 1)

    def forward(self, x):
        y = self.norm1(x)
        x = x + self.pool(y) - y
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


def test_asa_takes_1x1_convolutions_of_mlp_branches_and_leaves_chained_ones_to_approx():
    from aalconvert.nn.asa import ASAConv2d

    torch.manual_seed(0)
    model = nn.Sequential(PoolFormerBlock(), PoolFormerBlock())
    x = torch.randn(2, 32, 8, 8)
    alone = aalconvert.convert(model, "asa", example_inputs=(x,))
    assert type(alone[0].fc1) is ASAConv2d and type(alone[0].fc2) is ASAConv2d
    out = alone(x)
    assert not torch.equal(out, model(x))  # ASA's forward: W(x + eps*s)
    out.square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in alone.parameters())
    auto = aalconvert.convert(model, ["auto", "approx4"], example_inputs=(x,))
    for layer in (auto[0].fc1, auto[0].fc2):  # after norm2 and GELU: the chain start's copy is shared
        assert type(layer).__name__ == "RecomputedInputConv2d"
    bp = measure_saved(lambda: model(x), model.parameters()).nbytes
    assert measure_saved(lambda: auto(x), auto.parameters()).nbytes < 0.2 * bp


def test_a_rule_object_outside_the_built_in_families_goes_after_them_and_trains_as_bp():
    """convert() takes Rule objects; one the precedence table does not name (here the budget
    planner's CheckpointRule) used to fail the sort with 'tuple.index(x): x not in tuple'."""
    chosen = resolve([CheckpointRule(), "exact"], {})
    assert [rule.name for rule in chosen] == ["exact", "checkpoint"]
    model = EXAMPLES["gpt"].build_model(dropout=0.0).train()
    inputs = EXAMPLES["gpt"].example_inputs(batch_size=2)
    converted = aalconvert.convert(model, [CheckpointRule(), "exact"], example_inputs=inputs)
    assert any(is_checkpointed(module) for module in converted.modules())
    parameters = list(model.parameters())
    expected = torch.autograd.grad(model(*inputs).square().mean(), parameters)
    actual = torch.autograd.grad(converted(*inputs).square().mean(), list(converted.parameters()))
    for e, a in zip(expected, actual, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-7)

"""The approx rules on functional attention cores (rules/attention.py via rules/approx.py)."""

import math

import pytest
import torch
from torch import nn

import aalconvert
from aalconvert.api import plan_conversion
from aalconvert.errors import ConversionError
from aalconvert.kernels import quantized_nbytes
from aalconvert.memory import measure_saved
from aalconvert.nn.approx import ApproxLinear
from aalconvert.nn.approx_attention import ApproxAttention
from aalconvert.nn.asa import ASALinear
from aalconvert.nn.recompute import RecomputedInputLinear
from aalconvert.nn.recompute_attention import RecomputedAttention
from aalconvert.rules.wiring import swap_module, wiring_of
from examples import EXAMPLES
from root_packer import without_root_packer
from examples.vit import Block

ATTENTION_EXAMPLES = {  # example -> the module names ending its attention modules
    "vit": ("attn",),
    "bert": ("attention.self",),
    "gpt": ("attn",),
    "transformer": ("self_attn", "cross_attn"),
}
DROPOUT_OFF = {"vit": {"dropout": 0.0}, "bert": {"dropout": 0.0}, "gpt": {"dropout": 0.0},
               "transformer": {"dropout": 0.0}}


def build(name: str, **overrides) -> nn.Module:
    torch.manual_seed(0)
    return EXAMPLES[name].build_model(**overrides).train()


def inputs_of(name: str) -> tuple:
    return EXAMPLES[name].example_inputs(batch_size=4)


def attention_names(model: nn.Module, example: str) -> list[str]:
    suffixes = ATTENTION_EXAMPLES[example]
    return [n for n, _ in model.named_modules() if any(n.endswith("." + s) for s in suffixes)]


def types_of(model: nn.Module) -> dict[str, type]:
    return {name: type(m) for name, m in model.named_modules()}


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


@pytest.mark.parametrize("example", list(ATTENTION_EXAMPLES))
def test_approx_converts_every_attention_core_forward_exact_and_trains(example):
    model = build(example, **DROPOUT_OFF[example])
    inputs = inputs_of(example)
    plan, _ = plan_conversion(model, "approx4")
    names = attention_names(model, example)
    assert names and all(name in plan.sites for name in names)
    converted = aalconvert.convert(model, "approx4")
    for name in names:
        core = converted.get_submodule(name)
        assert isinstance(core, ApproxAttention) and isinstance(core, type(model.get_submodule(name)))
        assert any(isinstance(child, (ApproxLinear, RecomputedInputLinear)) for child in core.children()), \
            "leaf swaps lost"
    torch.manual_seed(3)
    expected = model(*inputs)
    torch.manual_seed(3)
    actual = converted(*inputs)
    assert torch.equal(actual, expected)
    actual.float().square().mean().backward()
    grads = [p.grad for p in converted.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_vit_attention_operands_drop_by_the_quantization_formula():
    config = dict(dropout=0.0)
    model = build("vit", **config)
    (images,) = inputs_of("vit")
    converted = without_root_packer(aalconvert.convert(model, "approx4"))
    measure = lambda m: measure_saved(lambda: m(images), m.parameters()).nbytes
    with_core = measure(converted)
    for name in attention_names(converted, "vit"):  # put the attention cores back, children stay k-bit
        swap_module(converted, name, converted.get_submodule(name).to_module())
    without_core = measure(converted)

    vit = EXAMPLES["vit"].config
    batch, tokens = images.shape[0], (vit.image_size // vit.patch_size) ** 2 + 1
    heads, dim = vit.num_heads, vit.dim
    per_head = batch * tokens * dim  # q, k or v over all heads
    scores = batch * heads * tokens * tokens
    q4 = lambda n: quantized_nbytes(n, 4, 64)
    # BP core, fp32: q*scale; contiguous copies of k^T and v (the head split leaves views that
    # torch's batched product must copy); the softmax output (dropout p=0 hands the same
    # tensor to the second product).
    full = 4 * (3 * per_head + scores)
    # Converted core: k-bit q*scale, k, v; k-bit softmax output (the probabilities after
    # dropout are rebuilt from it).
    kbit = 3 * q4(per_head) + q4(scores)
    assert without_core - with_core == vit.depth * (full - kbit)


@pytest.mark.parametrize("example", list(ATTENTION_EXAMPLES))
def test_converting_twice_is_a_no_op_and_revert_restores_original_classes(example):
    model = build(example, **DROPOUT_OFF[example])
    inputs = inputs_of(example)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    once = aalconvert.convert(model, "approx4")
    assert list(once.state_dict()) == list(model.state_dict())
    assert [id(p) for p in once.parameters()] == [id(p) for p in model.parameters()]
    plan, _ = plan_conversion(once, "approx4")
    assert not any(isinstance(once.get_submodule(n), ApproxAttention) for n in plan.sites)
    twice = aalconvert.convert(once, "approx4")
    assert types_of(twice) == types_of(once) and hook_count(twice) == hook_count(once)
    torch.manual_seed(2)
    expected = once(*inputs)
    torch.manual_seed(2)
    assert torch.equal(twice(*inputs), expected)

    reverted = aalconvert.revert(once)
    assert types_of(reverted) == types_of(model)
    assert [id(p) for p in reverted.parameters()] == [id(p) for p in model.parameters()]
    torch.manual_seed(2)
    assert torch.equal(reverted(*inputs), expected)
    expected.float().square().mean().backward()  # an optimizer built before conversion still works
    before = model.get_submodule(attention_names(model, example)[0])
    weight = next(before.parameters())
    snapshot = weight.detach().clone()
    optimizer.step()
    assert not torch.equal(weight, snapshot)


def test_auto_with_approx_keeps_asa_layers_and_their_shared_mask_inside_the_core():
    # dropout 0.1: a zero-probability dropout before query/key/value would let them rebuild
    # their input from the LayerNorm's k-bit copy instead (less than ASA's sign)
    model = build("bert", dropout=0.1)
    converted = aalconvert.convert(model, ["auto", "approx4"])
    core = converted.get_submodule("encoder.layer.0.attention.self")
    assert isinstance(core, ApproxAttention)
    layers = [core.query, core.key, core.value]
    assert all(isinstance(layer, ASALinear) for layer in layers)
    packs = [wiring_of(layer) for layer in layers]
    assert packs[0] and packs[0] == packs[1] == packs[2]
    converted(*inputs_of("bert")).float().square().mean().backward()
    assert core.query.weight.grad is not None


def test_skip_leaves_the_attention_core_and_a_refused_core_is_reported():
    model = build("vit")
    converted = aalconvert.convert(model, "approx4", skip=["blocks.1.attn"])
    assert type(converted.blocks[1].attn) is type(model.blocks[1].attn)
    assert isinstance(converted.blocks[0].attn, ApproxAttention)

    class MaskedAttention(type(model.blocks[0].attn)):
        def forward(self, x, mask=None):
            return super().forward(x)

    model.blocks[0].attn.__class__ = MaskedAttention
    plan, _ = plan_conversion(model, "approx4")
    reasons = [s.reason for s in plan.skips if s.module_name == "blocks.0.attn"]
    assert "blocks.0.attn" not in plan.sites
    assert any("optional argument 'mask'" in reason for reason in reasons)


class _Untraceable(nn.Module):
    """A root plain fx cannot trace (data-dependent branch) around traceable ViT blocks."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(Block(32, 4, 2.0, 0.0, True), Block(32, 4, 2.0, 0.0, False))

    def forward(self, x):
        if x.sum() > 0:
            x = x * 1.0
        return self.body(x)


def test_attention_cores_are_found_inside_regions_below_an_untraced_root():
    torch.manual_seed(0)
    model = _Untraceable().train()
    x = torch.randn(2, 9, 32)
    plan, facts = plan_conversion(model, "approx4")  # no example values: plain fx, root fails
    assert [r.name for r in facts.trace.regions] == ["body"]
    assert {"body.0.attn", "body.1.attn"} <= set(plan.sites)
    converted = aalconvert.convert(model, "approx4")
    assert torch.equal(converted(x), model(x))
    assert math.isfinite(converted(x).sum().item())


@pytest.mark.parametrize("example", list(ATTENTION_EXAMPLES))
def test_recompute_rebuilds_dropped_probabilities_with_bit_identical_gradients(example):
    model = build(example)  # dropout on: the masks must be the very same draws
    inputs = inputs_of(example)
    converted = aalconvert.convert(model, "recompute")
    names = attention_names(model, example)
    assert all(isinstance(converted.get_submodule(n), RecomputedAttention) for n in names)
    torch.manual_seed(5)
    expected = model(*inputs)
    torch.manual_seed(5)
    actual = converted(*inputs)
    assert torch.equal(actual, expected)
    params = list(model.parameters())
    loss = lambda out: out.float().square().mean()
    for e, a in zip(torch.autograd.grad(loss(expected), params), torch.autograd.grad(loss(actual), params)):
        assert torch.equal(a, e)
    with_approx = aalconvert.convert(model, ["auto", "approx4"])
    assert all(isinstance(with_approx.get_submodule(n), ApproxAttention) for n in names), "approx precedes"


def test_auto_on_vit_drops_one_probability_tensor_per_attention():
    model = build("vit")
    (images,) = inputs_of("vit")
    converted = without_root_packer(aalconvert.convert(model, "auto"))

    def measure(m):
        torch.manual_seed(0)
        return measure_saved(lambda: m(images), m.parameters()).nbytes

    with_core = measure(converted)
    for name in attention_names(converted, "vit"):
        swap_module(converted, name, converted.get_submodule(name).to_module())
    without_core = measure(converted)
    vit = EXAMPLES["vit"].config
    tokens = (vit.image_size // vit.patch_size) ** 2 + 1
    scores = images.shape[0] * vit.num_heads * tokens * tokens
    # Both keep the softmax output, the 1-bit mask and v; only the dropped probabilities (fp32) go.
    assert without_core - with_core == vit.depth * 4 * scores


class ScaledAttention(nn.Module):
    """Attention whose scale and head count are plain attributes read in forward."""

    def __init__(self, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.heads = heads
        self.scale = (dim // heads) ** -0.5

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = torch.softmax(q @ k.transpose(-2, -1) * self.scale, dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, t, d))


@pytest.mark.parametrize(("example", "rules"), [("own", "approx4"), ("vit", "approx4"), ("vit", "recompute")])
def test_traced_attention_refuses_to_run_with_an_attribute_changed_since_conversion(example, rules):
    # Before: the traced forward kept computing with the scale read at conversion, silently.
    if example == "own":
        torch.manual_seed(0)
        model, name, x = nn.Sequential(ScaledAttention()), "0", torch.randn(2, 5, 16)
    else:
        model, name, (x,) = build(example, dropout=0.0), "blocks.0.attn", inputs_of(example)
    converted = aalconvert.convert(model, rules, example_inputs=(x,))
    attention = converted.get_submodule(name)
    assert isinstance(attention, (ApproxAttention, RecomputedAttention))
    torch.manual_seed(1)
    before = converted(x)
    attention.scale = float(attention.scale)  # the same value: runs as before
    torch.manual_seed(1)
    assert torch.equal(converted(x), before)
    attention.scale = 0.5
    with pytest.raises(ConversionError, match=r"attribute 'scale' is 0.5 now but was 0.* convert the "
                                              r"model again"):
        converted(x)
    # Converted again, it computes with the new value, as the plain model does.
    again = aalconvert.convert(aalconvert.revert(converted), rules, example_inputs=(x,))
    model.get_submodule(name).scale = 0.5
    torch.manual_seed(1)
    expected = model(x)
    torch.manual_seed(1)
    assert torch.allclose(again(x), expected, atol=1e-5) and not torch.allclose(expected, before)
    assert not hasattr(aalconvert.revert(again).get_submodule(name), "core_attributes")

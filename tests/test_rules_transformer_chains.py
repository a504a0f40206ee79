"""Recompute chains in real transformer blocks: through zero-probability dropouts, and under
``auto`` in place of ASA where the chain start keeps its input anyway.

The blocks copy torchvision's ``vision_transformer.EncoderBlock`` / ``MLPBlock`` layout
(torchvision does not import in CI): ``MLPBlock`` is ``nn.Sequential(Linear, GELU,
Dropout(p), Linear, Dropout(p))`` with p = 0 in every torchvision ViT.
"""

import pytest
import torch
from torch import nn

import aalconvert
from aalconvert.api import plan_conversion
from aalconvert.memory import measure_saved
from aalconvert.nn.asa import ASAConv2d, ASALinear
from aalconvert.nn.recompute import RecomputedInputLinear


class MLPBlock(nn.Sequential):
    """torchvision.models.vision_transformer.MLPBlock (a torchvision.ops.MLP)."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout),
                         nn.Linear(hidden, dim), nn.Dropout(dropout))


class EncoderBlock(nn.Module):
    """torchvision.models.vision_transformer.EncoderBlock, its forward copied."""

    def __init__(self, dim: int = 32, heads: int = 4, hidden: int = 128, dropout: float = 0.0) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim, eps=1e-6)
        self.self_attention = nn.MultiheadAttention(dim, heads, dropout=0.0, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.ln_2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLPBlock(dim, hidden, dropout)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        x = self.ln_1(input)
        x, _ = self.self_attention(x, x, x, need_weights=False)
        x = self.dropout(x)
        x = x + input
        y = self.ln_2(x)
        y = self.mlp(y)
        return x + y


def _grads(model: nn.Module, x: torch.Tensor, seed: int = 5) -> list[torch.Tensor]:
    x = x.detach().requires_grad_()
    torch.manual_seed(seed)  # the same dropout draws for BP and converted
    out = model(x)
    grads = torch.autograd.grad(out.square().mean(), [x, *model.parameters()])
    return list(grads)


def _kept(model: nn.Module, x: torch.Tensor) -> int:
    x = x.detach().requires_grad_()
    return measure_saved(lambda: model(x), model.parameters()).nbytes


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(EncoderBlock(), EncoderBlock())


def test_recompute_chain_runs_through_zero_dropout_in_torchvision_mlp_block_bit_identical():
    model = _model()
    x = torch.randn(2, 17, 32)
    converted = aalconvert.convert(model, "recompute", example_inputs=(x,))
    for block in converted:
        assert type(block.mlp[3]) is RecomputedInputLinear  # GELU -> Dropout(0) -> Linear
        assert type(block.mlp[0]) is RecomputedInputLinear  # LayerNorm -> Linear
    assert torch.equal(converted(x), model(x))
    assert all(torch.equal(a, b) for a, b in zip(_grads(converted, x), _grads(model, x), strict=True))
    # the GELU's input is kept once, by the GELU: the second Linear keeps nothing of its own
    assert _kept(converted, x) <= _kept(model, x) - 2 * 2 * 17 * 128 * 4


def test_a_dropout_given_a_probability_after_conversion_leaves_the_layer_exact():
    model = _model()
    x = torch.randn(2, 17, 32)
    converted = aalconvert.convert(model, "recompute", example_inputs=(x,))
    for net in (model, converted):
        for block in net:
            block.mlp[2].p = 0.3
    assert all(torch.equal(a, b) for a, b in zip(_grads(converted, x), _grads(model, x), strict=True))


def test_auto_leaves_layers_after_layer_norm_and_gelu_to_recompute_not_asa():
    model = _model()
    x = torch.randn(2, 17, 32)
    plan, _ = plan_conversion(model, "auto", example_inputs=(x,))
    for name in ("0.mlp.0", "0.mlp.3", "1.mlp.0", "1.mlp.3"):
        assert plan.sites[name].rule == "recompute", name
        assert any(s.rule == "asa" and s.module_name == name and "left to recompute" in s.reason
                   for s in plan.skips), name
    converted = aalconvert.convert(model, "auto", example_inputs=(x,))
    assert not any(isinstance(m, ASALinear) for m in converted.modules())
    assert _kept(converted, x) < _kept(aalconvert.convert(model, ["asa", "exact"], example_inputs=(x,)), x)


class Bottleneck(nn.Module):
    """A ResNet bottleneck (torchvision's layout): BN -> ReLU -> 1x1 conv inside the branch."""

    def __init__(self, channels: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 4, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)
        self.conv3 = nn.Conv2d(4, channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(x + self.bn3(self.conv3(out)))


@pytest.mark.filterwarnings("ignore")
def test_auto_keeps_asa_on_one_by_one_convolutions_after_batch_norm():
    torch.manual_seed(0)
    model = nn.Sequential(Bottleneck(), Bottleneck())
    x = torch.randn(2, 16, 8, 8)
    converted = aalconvert.convert(model, "auto", example_inputs=(x,))
    assert isinstance(converted[1].conv3, ASAConv2d)


# ------------------------------------------- nn.MultiheadAttention: the in-projection's input

from aalconvert.nn.recompute_mha import RecomputedInputMultiheadAttention  # noqa: E402


def test_multihead_attention_in_projection_rebuilds_its_input_from_ln_1_bit_identical():
    model = _model()
    x = torch.randn(2, 17, 32)
    converted = aalconvert.convert(model, "recompute", example_inputs=(x,))
    assert all(type(block.self_attention) is RecomputedInputMultiheadAttention for block in converted)
    assert torch.equal(converted(x), model(x))
    assert all(torch.equal(a, b) for a, b in zip(_grads(converted, x), _grads(model, x), strict=True))
    plain_mha = aalconvert.convert(model, "recompute", example_inputs=(x,),
                                   skip=["0.self_attention", "1.self_attention"])
    # batch_first: matmul keeps a contiguous copy of ln_1's output transposed; it is gone
    assert _kept(converted, x) == _kept(plain_mha, x) - 2 * (2 * 17 * 32 * 4)
    reverted = aalconvert.revert(converted)
    assert type(reverted[0].self_attention) is nn.MultiheadAttention


class SequenceFirstBlock(nn.Module):
    """A pre-norm block over (tokens, batch, features), as nn.TransformerEncoderLayer(norm_first=True)
    writes it: the in-projection keeps a view of the norm's output."""

    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(x)
        return x + self.attn(y, y, y, need_weights=False)[0]


def test_sequence_first_multihead_attention_rebuilds_the_view_it_keeps_bit_identical():
    torch.manual_seed(0)
    model = nn.Sequential(SequenceFirstBlock(), SequenceFirstBlock())
    x = torch.randn(9, 3, 32)
    converted = aalconvert.convert(model, "recompute", example_inputs=(x,))
    assert type(converted[0].attn) is RecomputedInputMultiheadAttention
    assert all(torch.equal(a, b) for a, b in zip(_grads(converted, x), _grads(model, x), strict=True))
    assert _kept(converted, x) < _kept(model, x)


class CrossAttention(nn.Module):
    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, 4, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(x)
        return x + self.attn(y, x, x, need_weights=False)[0]


def test_cross_attention_and_a_direct_call_stay_plain_and_exact():
    torch.manual_seed(0)
    model = nn.Sequential(CrossAttention(), CrossAttention())
    x = torch.randn(2, 7, 32)
    plan, _ = plan_conversion(model, "recompute", example_inputs=(x,))
    assert "0.attn" not in plan.sites
    assert any(s.module_name == "0.attn" and "query, key and value differ" in s.reason for s in plan.skips)
    # a converted module called directly (no chain wiring) is plain nn.MultiheadAttention
    block = _model()
    converted = aalconvert.convert(block, "recompute", example_inputs=(torch.randn(2, 5, 32),))
    y = torch.randn(2, 5, 32, requires_grad=True)
    got = torch.autograd.grad(converted[0].self_attention(y, y, y)[0].sum(), [y, *converted[0].self_attention.parameters()])
    want = torch.autograd.grad(block[0].self_attention(y, y, y)[0].sum(), [y, *block[0].self_attention.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


class TwiceActivation(nn.Module):
    """A zoo-style activation (a ``...Activation`` that fx traces through, as Hugging Face's are)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)  # keeps x (the product saves it)


class ActivationCalledTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.act, self.down = nn.Linear(16, 16), TwiceActivation(), nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.act(self.up(x))))


def _bert(**fields):
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, **fields)
    return transformers.BertModel(config, add_pooling_layer=False).train()


def test_layer_after_an_inlined_hf_activation_rebuilds_its_input_bit_identical():
    """Hugging Face's GELUActivation is traced through (no graph leaf): BertOutput.dense reads
    its internal op; the chain starts at the activation module all the same."""
    model = _bert(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    ids = torch.randint(0, 60, (2, 11), generator=torch.Generator().manual_seed(1))

    def step(m):
        saved = measure_saved(lambda: m(ids).last_hidden_state, m.parameters())
        return saved.nbytes, torch.autograd.grad(saved.output.square().sum(), list(m.parameters()))

    bp_bytes, expected = step(model)
    converted = aalconvert.convert(model, "recompute", example_inputs=(ids,))
    dense = converted.encoder.layer[0].output.dense
    assert type(dense) is RecomputedInputLinear
    assert dense.chain == (converted.encoder.layer[0].intermediate.intermediate_act_fn,)
    kept_bytes, actual = step(converted)
    for e, a in zip(expected, actual, strict=True):
        assert torch.equal(e, a)
    assert kept_bytes < bp_bytes
    auto = aalconvert.convert(model, "auto", example_inputs=(ids,))
    assert type(auto.encoder.layer[0].output.dense) is RecomputedInputLinear  # not ASA's 1-bit sign


def test_a_hook_changing_the_inlined_activation_output_leaves_the_layer_exact():
    model = _bert(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    ids = torch.randint(0, 60, (2, 11), generator=torch.Generator().manual_seed(1))
    converted = aalconvert.convert(model, "recompute", example_inputs=(ids,), inplace=False)
    for m in (model, converted):
        m.encoder.layer[0].intermediate.intermediate_act_fn.register_forward_hook(lambda mod, a, out: out * 3)
    results = [torch.autograd.grad(m(ids).last_hidden_state.square().sum(), list(m.parameters()))
               for m in (model, converted)]
    for e, a in zip(*results, strict=True):
        assert torch.equal(e, a)


def test_an_inlined_activation_called_twice_starts_no_chain():
    plan, _ = plan_conversion(ActivationCalledTwice(), "recompute", example_inputs=(torch.randn(3, 16),))
    assert "down" not in plan.sites
    assert any(skip.module_name == "down" and "called 2 times" in skip.reason for skip in plan.skips)

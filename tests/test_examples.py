"""The example models build, train, trace with torch.fx at the root and have the documented structure."""

import dataclasses

import pytest
import torch
from torch import nn

from examples import EXAMPLES, bert, gpt, mixer, resnet, transformer, vit

NAMES = sorted(EXAMPLES)
NAMES_WITH_DROPOUT = [name for name in NAMES if hasattr(EXAMPLES[name].config, "dropout")]

# Attention blocks per model, from its config: one softmax each.
ATTENTION_COUNT = {
    "transformer": lambda c: c.num_encoder_layers + 2 * c.num_decoder_layers,
    "bert": lambda c: c.num_hidden_layers,
    "vit": lambda c: c.depth,
    "gpt": lambda c: c.n_layer,
}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def softmax_nodes(graph_module: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in graph_module.graph.nodes if getattr(n.target, "__name__", n.target) == "softmax"]


def test_registry_lists_every_example_model():
    assert NAMES == sorted(["resnet_basic", "resnet_bottleneck", "transformer", "bert", "vit", "mixer", "gpt"])


@pytest.mark.parametrize("name", NAMES)
def test_forward_gives_documented_output_shape(name):
    example = EXAMPLES[name]
    output = example.build_model()(*example.example_inputs(batch_size=4))
    assert tuple(output.shape) == example.output_shape(batch_size=4)
    assert output.dtype == torch.float32


@pytest.mark.parametrize("name", NAMES)
def test_backward_gives_finite_nonzero_gradient_for_every_parameter(name):
    example = EXAMPLES[name]
    model = example.build_model().train()
    output = model(*example.example_inputs(batch_size=4))
    (output * torch.randn_like(output)).sum().backward()
    for param_name, param in model.named_parameters():
        assert param.grad is not None, f"{name}: {param_name} got no gradient"
        assert torch.isfinite(param.grad).all(), f"{name}: {param_name} has a non-finite gradient"
        assert param.grad.abs().sum() > 0, f"{name}: {param_name} has an all-zero gradient"


@pytest.mark.parametrize("name", NAMES)
def test_fx_trace_at_root_equals_eager_at_other_batch_sizes(name):
    # Eval mode: at 32x32 the ResNets' layer4 is 1x1, so train-mode batch norm needs batch > 1.
    example = EXAMPLES[name]
    model = example.build_model().eval()
    traced = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        for batch_size in (4, 1):
            inputs = example.example_inputs(batch_size=batch_size)
            output = traced(*inputs)
            assert tuple(output.shape) == example.output_shape(batch_size=batch_size)
            torch.testing.assert_close(output, model(*inputs), rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_fx_trace_shows_every_linear_as_a_module_call(name):
    model = EXAMPLES[name].build_model()
    traced = torch.fx.symbolic_trace(model)
    called = {n.target for n in traced.graph.nodes if n.op == "call_module"}
    linears = {module_name for module_name, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert linears and linears <= called


@pytest.mark.parametrize("name", sorted(ATTENTION_COUNT))
def test_attention_is_explicit_softmax_not_fused_kernel(name):
    example = EXAMPLES[name]
    traced = torch.fx.symbolic_trace(example.build_model())
    targets = {getattr(n.target, "__name__", str(n.target)) for n in traced.graph.nodes}
    assert "scaled_dot_product_attention" not in targets
    assert len(softmax_nodes(traced)) == ATTENTION_COUNT[name](example.config)


@pytest.mark.parametrize("name", NAMES)
def test_train_mode_without_dropout_is_deterministic(name):
    example = EXAMPLES[name]
    overrides = {"dropout": 0.0} if name in NAMES_WITH_DROPOUT else {}
    model = example.build_model(**overrides).train()
    inputs = example.example_inputs(batch_size=4)
    assert torch.equal(model(*inputs), model(*inputs))


@pytest.mark.parametrize("name", NAMES_WITH_DROPOUT)
def test_dropout_changes_train_output_but_not_eval_output(name):
    example = EXAMPLES[name]
    model = example.build_model()
    inputs = example.example_inputs(batch_size=4)
    assert not torch.equal(model.train()(*inputs), model(*inputs))
    with torch.no_grad():
        assert torch.equal(model.eval()(*inputs), model(*inputs))


@pytest.mark.parametrize("name", NAMES)
def test_example_inputs_are_reproducible_and_within_range(name):
    example = EXAMPLES[name]
    first, second = example.example_inputs(batch_size=3), example.example_inputs(batch_size=3)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b) and a.shape[0] == 3
        if a.dtype == torch.int64:
            vocab = max(getattr(example.config, f) for f in ("vocab_size", "src_vocab_size", "tgt_vocab_size")
                        if hasattr(example.config, f))
            assert 0 <= int(a.min()) and int(a.max()) < vocab


@pytest.mark.parametrize(
    ("build", "params", "state_dict_keys"),
    # torchvision's resnet18 / resnet50 at width 64 with 1000 classes.
    [(resnet.resnet_basic, 11_689_512, 122), (resnet.resnet_bottleneck, 25_557_032, 320)],
)
def test_resnet_at_full_width_has_torchvision_parameter_and_key_counts(build, params, state_dict_keys):
    model = build(width=64, num_classes=1000)
    assert sum(p.numel() for p in model.parameters()) == params
    assert len(model.state_dict()) == state_dict_keys


def test_resnet_module_names_follow_torchvision():
    basic, bottleneck = resnet.resnet_basic(), resnet.resnet_bottleneck()
    for key in ("conv1.weight", "bn1.running_mean", "layer1.1.conv2.weight", "layer2.0.downsample.0.weight",
                "layer2.0.downsample.1.weight", "layer4.1.bn2.bias", "fc.weight", "fc.bias"):
        assert key in basic.state_dict(), key
    for key in ("layer1.0.downsample.0.weight", "layer3.5.conv3.weight", "layer4.2.bn3.weight"):
        assert key in bottleneck.state_dict(), key
    assert isinstance(basic.layer1[0], resnet.BasicBlock) and basic.layer1[0].downsample is None
    assert isinstance(bottleneck.layer4[2], resnet.Bottleneck)


def test_vit_with_separate_qkv_linears_traces_and_matches_eager():
    model = vit.build_model(fused_qkv=False).eval()
    names = dict(model.named_modules())
    assert {"blocks.0.attn.q", "blocks.0.attn.k", "blocks.0.attn.v"} <= names.keys()
    assert "blocks.0.attn.qkv" not in names
    inputs = vit.example_inputs(batch_size=2)
    with torch.no_grad():
        torch.testing.assert_close(torch.fx.symbolic_trace(model)(*inputs), model(*inputs), rtol=0, atol=0)


def test_gpt_logits_do_not_depend_on_later_tokens():
    model = gpt.build_model().eval()
    (ids,) = gpt.example_inputs(batch_size=2)
    changed = ids.clone()
    changed[:, -1] = (ids[:, -1] + 1) % gpt.CONFIG.vocab_size
    with torch.no_grad():
        before, after = model(ids), model(changed)
    torch.testing.assert_close(after[:, :-1], before[:, :-1], rtol=0, atol=0)
    assert not torch.allclose(after[:, -1], before[:, -1])


def test_transformer_decoder_is_causal_and_reads_the_whole_source():
    model = transformer.build_model().eval()
    src_ids, tgt_ids = transformer.example_inputs(batch_size=2)
    changed_tgt = tgt_ids.clone()
    changed_tgt[:, -1] = (tgt_ids[:, -1] + 1) % transformer.CONFIG.tgt_vocab_size
    changed_src = src_ids.clone()
    changed_src[:, -1] = (src_ids[:, -1] + 1) % transformer.CONFIG.src_vocab_size
    with torch.no_grad():
        before = model(src_ids, tgt_ids)
        after_tgt, after_src = model(src_ids, changed_tgt), model(changed_src, tgt_ids)
    torch.testing.assert_close(after_tgt[:, :-1], before[:, :-1], rtol=0, atol=0)
    assert not torch.allclose(after_src[:, 0], before[:, 0])


def test_bert_attends_in_both_directions():
    model = bert.build_model().eval()
    (ids,) = bert.example_inputs(batch_size=2)
    changed = ids.clone()
    changed[:, -1] = (ids[:, -1] + 1) % bert.CONFIG.vocab_size
    with torch.no_grad():
        assert not torch.allclose(model(changed)[:, 0], model(ids)[:, 0])


def test_tied_lm_heads_share_the_embedding_parameter():
    bert_model = bert.build_model()
    assert bert_model.cls.decoder.weight is bert_model.embeddings.word_embeddings.weight
    tied, untied = gpt.build_model(), gpt.build_model(tie_word_embeddings=False)
    assert tied.lm_head.weight is tied.wte.weight
    assert untied.lm_head.weight is not untied.wte.weight
    extra = sum(p.numel() for p in untied.parameters()) - sum(p.numel() for p in tied.parameters())
    assert extra == gpt.CONFIG.vocab_size * gpt.CONFIG.n_embd


@pytest.mark.parametrize(
    ("module", "overrides", "message"),
    [
        (vit, {"dim": 30, "num_heads": 4}, "multiple of num_heads"),
        (vit, {"image_size": 30}, "multiple of patch_size"),
        (mixer, {"dropout": 1.0}, "dropout"),
        (bert, {"seq_len": 100}, "max_position_embeddings"),
        (gpt, {"n_layer": 0}, "n_layer"),
        (transformer, {"tgt_len": 65}, "max_len"),
        (resnet, {"block": "wide"}, "'basic', 'bottleneck'"),
        (resnet, {"layers": (2, 2, 2)}, "four block counts"),
    ],
)
def test_invalid_config_is_rejected_with_the_field_named(module, overrides, message):
    with pytest.raises(ValueError, match=message):
        module.build_model(**overrides)


def test_config_defaults_are_frozen_dataclasses():
    for example in EXAMPLES.values():
        assert dataclasses.is_dataclass(example.config)
        with pytest.raises(dataclasses.FrozenInstanceError):
            example.config.dropout = 0.5

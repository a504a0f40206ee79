"""The ``loss_head`` rule on Hugging Face language models (rules/loss_head.py, nn/loss_head.py).

The reference is the unconverted model (same Parameter objects): the loss within
fp32 rounding (relative 1e-6) and gradients within relative 1e-5 of the largest
one; the logits, wherever they are read, bit-identical.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import aalconvert
from aalconvert.errors import ConversionError
from aalconvert.memory import measure_saved
from aalconvert.nn.loss_head import DeferredLogits, DeferredLogitsError, LossHeadLinear

transformers = pytest.importorskip("transformers")

VOCAB = 1000
SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)


def llama():
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, num_key_value_heads=2, bos_token_id=0, eos_token_id=0, **SMALL))


def qwen2():
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=VOCAB, num_key_value_heads=2, bos_token_id=0, eos_token_id=0, **SMALL))


def gpt2():
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_layer=2, n_embd=32, n_head=2, n_inner=64, n_positions=64,
        bos_token_id=0, eos_token_id=0))


def gemma2():  # final_logit_softcapping: the deferred logits record c * tanh(logits / c)
    return transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
        vocab_size=VOCAB, num_key_value_heads=2, head_dim=16, final_logit_softcapping=5.0,
        bos_token_id=0, eos_token_id=0, pad_token_id=0, **SMALL))


def bert_mlm():
    return transformers.BertForMaskedLM(transformers.BertConfig(vocab_size=VOCAB, **SMALL))


def roberta_mlm():  # lm_head: dense -> a module-level gelu -> layer_norm -> decoder
    return transformers.RobertaForMaskedLM(transformers.RobertaConfig(vocab_size=VOCAB, **SMALL))


MODELS = {"llama": llama, "qwen2": qwen2, "gpt2": gpt2, "gemma2": gemma2, "bert_mlm": bert_mlm,
          "roberta_mlm": roberta_mlm}


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    return MODELS[name]().train()


def token_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (2, 16), generator=generator)
    labels = ids.clone()
    labels[0, :3] = -100  # prompt tokens: ignored
    return ids, labels


def step(model: nn.Module, ids, labels, seed: int = 1, **kwargs):
    torch.manual_seed(seed)  # dropout draws
    output = model(ids, labels=labels, **kwargs)
    return output, torch.autograd.grad(output.loss, list(model.parameters()), allow_unused=True)


def assert_close_gradients(actual, expected) -> None:
    scale = max(g.abs().max() for g in expected if g is not None)
    for a, e in zip(actual, expected, strict=True):
        assert (a is None) == (e is None)
        if a is not None:
            assert (a - e).abs().max() <= 1e-5 * scale


@pytest.mark.parametrize("name", sorted(MODELS))
def test_training_step_gives_the_plain_loss_and_gradients(name):
    model = build(name)
    converted = aalconvert.convert(model, "loss_head")
    assert isinstance(converted.get_output_embeddings(), LossHeadLinear)
    ids, labels = token_batch()
    plain, plain_grads = step(model, ids, labels)
    ours, our_grads = step(converted, ids, labels)
    torch.testing.assert_close(ours.loss, plain.loss, rtol=1e-6, atol=0)
    assert_close_gradients(our_grads, plain_grads)
    assert isinstance(ours.logits, DeferredLogits)  # not materialised by the step
    assert ours.logits._logits is None
    assert torch.equal(ours.logits.argmax(-1), plain.logits.argmax(-1))
    assert torch.equal(ours.logits + 0, plain.logits)  # computed on use, as the plain layer does


@pytest.mark.parametrize("name", sorted(MODELS))
def test_gradients_made_in_forward_give_the_plain_loss_and_gradients(name):
    model = build(name)
    converted = aalconvert.convert(model, "loss_head", loss_head_gradients="forward")
    assert converted.get_output_embeddings().gradients_in_forward
    assert "gradients in forward" in repr(converted.get_output_embeddings())
    ids, labels = token_batch()
    plain, plain_grads = step(model, ids, labels)
    ours, our_grads = step(converted, ids, labels)
    torch.testing.assert_close(ours.loss, plain.loss, rtol=1e-6, atol=0)
    assert_close_gradients(our_grads, plain_grads)
    assert torch.equal(ours.logits + 0, plain.logits)


def test_gradients_made_in_forward_keep_the_heads_gradient_not_the_logits_and_refuse_a_second_backward():
    model = build("llama")
    ids, labels = token_batch()
    converted = {gradients: aalconvert.convert(model, "loss_head", loss_head_gradients=gradients)
                 for gradients in ("backward", "forward")}
    kept = {gradients: measure_saved(lambda m=m: m(ids, labels=labels).loss, m.parameters()).nbytes
            for gradients, m in converted.items()}
    # The forward scheme keeps the head's weight gradient and its input's gradient; the backward one
    # that input (the same size) and a label and a log-sum-exp per token (at most 16 bytes).
    head_gradient = model.lm_head.weight.numel() * 4
    assert head_gradient - 16 * ids.numel() <= kept["forward"] - kept["backward"] <= head_gradient
    loss = converted["forward"](ids, labels=labels).loss
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="loss_head_gradients='backward'"):
        loss.backward()
    loss = converted["backward"](ids, labels=labels).loss
    loss.backward(retain_graph=True)
    loss.backward()


def test_a_bad_loss_head_gradients_option_raises_before_any_change():
    model = build("gpt2")
    with pytest.raises(ConversionError, match="loss_head_gradients='sideways' must be 'backward'"):
        aalconvert.convert(model, "loss_head", loss_head_gradients="sideways")
    with pytest.raises(ConversionError, match="loss_head_gradients"):
        aalconvert.convert(model, "exact", loss_head_gradients="forward")  # no chosen rule reads it
    assert type(model.lm_head) is nn.Linear
    reverted = aalconvert.revert(aalconvert.convert(model, "loss_head", loss_head_gradients="forward"))
    assert type(reverted.lm_head) is nn.Linear and not hasattr(reverted.lm_head, "gradients_in_forward")


@pytest.mark.parametrize("name", ["llama", "gpt2"])
@pytest.mark.parametrize("gradients", ["backward", "forward"])
def test_num_items_in_batch_divides_the_summed_loss_as_hugging_face_does(name, gradients):
    model = build(name)
    converted = aalconvert.convert(model, "loss_head", loss_head_gradients=gradients)
    ids, labels = token_batch()
    count = torch.tensor(37)
    plain, plain_grads = step(model, ids, labels, num_items_in_batch=count)
    ours, our_grads = step(converted, ids, labels, num_items_in_batch=count)
    torch.testing.assert_close(ours.loss, plain.loss, rtol=1e-6, atol=0)
    assert_close_gradients(our_grads, plain_grads)


def test_the_step_keeps_no_tensor_with_a_vocabulary_dimension_and_far_less_than_bp():
    model = build("llama")
    converted = aalconvert.convert(model, "loss_head")
    ids, labels = token_batch()
    shapes: list[tuple[int, ...]] = []
    parameters = {p.untyped_storage().data_ptr() for p in converted.parameters()}

    def pack(tensor):  # by storage: saved tensors may reach here as detached aliases
        if tensor.untyped_storage().data_ptr() not in parameters:
            shapes.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        converted(ids, labels=labels).loss
    assert shapes and not [s for s in shapes if VOCAB in s]
    kept = [measure_saved(lambda m=m: m(ids, labels=labels).loss, m.parameters()).nbytes
            for m in (model, converted)]
    logits_bytes = ids.numel() * VOCAB * 4
    assert kept[0] - kept[1] >= 0.99 * logits_bytes  # the fp32 log-softmax is gone (a few scalars per token stay)


def test_eval_mode_and_no_grad_give_plain_logits():
    model = build("llama")
    converted = aalconvert.convert(model, "loss_head")
    ids, labels = token_batch()
    model.eval(), converted.eval()
    ours, plain = converted(ids, labels=labels), model(ids, labels=labels)
    assert type(ours.logits) is torch.Tensor and torch.equal(ours.logits, plain.logits)
    assert torch.equal(ours.loss, plain.loss)
    converted.train(), model.train()
    with torch.no_grad():
        assert type(converted(ids).logits) is torch.Tensor


def test_logits_without_labels_are_the_plain_logits_and_a_users_own_loss_is_chunked():
    model = build("llama")
    converted = aalconvert.convert(model, "loss_head")
    ids, labels = token_batch()
    torch.manual_seed(1)
    plain_logits = model(ids).logits
    torch.manual_seed(1)
    logits = converted(ids).logits
    assert isinstance(logits, DeferredLogits)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1))
    assert logits._logits is None  # the user's loss went through the chunked path
    expected = F.cross_entropy(plain_logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)
    assert torch.equal(logits.softmax(-1), plain_logits.softmax(-1))


def test_autocast_bf16_step_is_within_bf16_rounding_of_the_plain_one():
    model = build("llama")
    converted = aalconvert.convert(model, "loss_head")
    ids, labels = token_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain, plain_grads = step(model, ids, labels)
        ours, our_grads = step(converted, ids, labels)
    torch.testing.assert_close(ours.loss, plain.loss, rtol=2e-2, atol=0)
    head = next(i for i, p in enumerate(model.parameters()) if p is model.lm_head.weight)
    cosine = F.cosine_similarity(our_grads[head].flatten(), plain_grads[head].flatten(), dim=0)
    assert cosine > 0.999


def test_in_place_ops_and_stale_weights_raise_instead_of_giving_other_numbers():
    model = build("gpt2")
    converted = aalconvert.convert(model, "loss_head")
    ids, labels = token_batch()
    output = converted(ids, labels=labels)
    with pytest.raises(DeferredLogitsError, match="in-place"):
        output.logits.mul_(2)
    with pytest.raises(DeferredLogitsError, match="in-place"):
        output.logits[0, 0, 0] = 1.0
    output.loss.backward()
    torch.optim.SGD(converted.parameters(), lr=0.1).step()
    with pytest.raises(DeferredLogitsError, match="before changing the weights"):
        output.logits.argmax(-1)


def test_inspect_counts_the_loss_head_and_agrees_with_measurement():
    model = build("llama")
    ids, labels = token_batch()
    report = aalconvert.inspect(model, (ids,), "loss_head")
    assert any("labels = the input ids" in note for note in report.notes)
    converted = aalconvert.convert(model, "loss_head")
    measured = [measure_saved(lambda m=m: m(ids, labels=ids).loss, m.parameters()).nbytes
                for m in (model, converted)]
    assert report.totals.bp_bytes == measured[0]
    assert abs(report.totals.converted_bytes - measured[1]) <= 0.03 * measured[1]
    row = next(r for r in report.to_dict()["rows"] if r["name"] == "lm_head")
    assert row["rule"] == "loss_head"
    without = aalconvert.inspect(model, (ids,), "loss_head", labels=None)
    assert without.totals.bp_bytes < report.totals.bp_bytes


def test_auto_includes_the_loss_head_and_revert_restores_the_linear():
    model = build("qwen2")
    converted = aalconvert.convert(model)
    assert isinstance(converted.lm_head, LossHeadLinear)
    reverted = aalconvert.revert(converted)
    assert type(reverted.lm_head) is nn.Linear and reverted.lm_head.weight is model.lm_head.weight


def test_models_without_a_language_model_head_are_skipped_with_the_reason():
    model = transformers.BertModel(transformers.BertConfig(vocab_size=VOCAB, **SMALL))
    report = aalconvert.inspect(model, (token_batch()[0],), "loss_head")
    assert not report.notes or all("labels" not in note for note in report.notes)
    plan_skips = aalconvert.api.plan_conversion(model, "loss_head")[0].skips
    assert any("not a language model" in skip.reason for skip in plan_skips)


def test_compiled_converted_model_gives_the_plain_loss():
    model = build("llama")
    converted = aalconvert.convert(model, "loss_head")
    ids, labels = token_batch()
    compiled = torch.compile(converted, backend="aot_eager")
    plain, plain_grads = step(model, ids, labels)
    ours, our_grads = step(compiled, ids, labels)
    torch.testing.assert_close(ours.loss, plain.loss, rtol=1e-6, atol=0)
    assert_close_gradients(our_grads, plain_grads)


@pytest.mark.parametrize("name", ["llama", "gpt2", "roberta_mlm"])
def test_approx_rules_take_the_loss_head_and_the_step_keeps_its_logits_nowhere(name):
    # RoBERTa's decoder reads a LayerNorm's output: the loss head must win over that chain.
    model = build(name)
    ids, labels = token_batch()
    converted = aalconvert.convert(model, "approx4", example_inputs=(ids,))
    assert isinstance(converted.get_output_embeddings(), LossHeadLinear)
    bp = measure_saved(lambda: model(ids, labels=labels), list(model.parameters())).nbytes
    kept = measure_saved(lambda: converted(ids, labels=labels), list(model.parameters())).nbytes
    only_masks = aalconvert.convert(model, "approx4", example_inputs=(ids,), skip=[
        n for n, m in model.named_modules() if m is model.get_output_embeddings()])
    without_head = measure_saved(lambda: only_masks(ids, labels=labels), list(model.parameters())).nbytes
    assert kept < without_head < bp
    (_, got), (_, expected) = step(converted, ids, labels), step(model, ids, labels)
    flat = lambda grads: torch.cat([g.flatten() for g in grads if g is not None])  # noqa: E731
    assert F.cosine_similarity(flat(got), flat(expected), dim=0) > 0.99


@pytest.mark.parametrize("use", ["view(-1)", "reshape(-1)", "cat", "stack"])
def test_logits_flattened_or_joined_in_a_list_are_the_plain_ones(use):
    # view(-1) once reshaped the hidden states to (H,); torch.cat/stack of deferred logits recursed.
    model = build("llama")
    converted = aalconvert.convert(model, "loss_head")
    ids, _ = token_batch()
    apply = {"view(-1)": lambda t: t.view(-1), "reshape(-1)": lambda t: t.reshape(-1),
             "cat": lambda t: torch.cat([t, t]), "stack": lambda t: torch.stack([t])}[use]
    torch.manual_seed(1)
    expected = apply(model(ids).logits)
    torch.manual_seed(1)
    assert torch.equal(apply(converted(ids).logits), expected)

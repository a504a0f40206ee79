"""Hugging Face architectures, built from tiny random-init configs, convert without edits.

For each: ``exact`` gives BP's gradients bit for bit (eval mode, so no dropout
draws), ``auto`` and ``auto`` + ``approx4`` keep less than BP and train one
step, and ``revert`` gives back the original module classes.
"""

import pytest
import torch
import transformers

import aalconvert
from aalconvert.memory import measure_saved

SIZES = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128}
DECODER = {"vocab_size": 100, "num_key_value_heads": 2, "bos_token_id": 0, "eos_token_id": 0, **SIZES}
IMAGE = "image"

ARCHITECTURES = {
    "roberta": (transformers.RobertaForMaskedLM, transformers.RobertaConfig, {"vocab_size": 100, **SIZES}),
    "distilbert": (transformers.DistilBertForMaskedLM, transformers.DistilBertConfig,
                   {"vocab_size": 100, "dim": 64, "n_layers": 2, "n_heads": 4, "hidden_dim": 128}),
    "albert": (transformers.AlbertForMaskedLM, transformers.AlbertConfig,
               {"vocab_size": 100, "embedding_size": 32, **SIZES}),
    "electra": (transformers.ElectraForMaskedLM, transformers.ElectraConfig,
                {"vocab_size": 100, "embedding_size": 32, **SIZES}),
    "mobilebert": (transformers.MobileBertForMaskedLM, transformers.MobileBertConfig,
                   {"vocab_size": 100, "embedding_size": 32, "intra_bottleneck_size": 32, **SIZES}),
    "mistral": (transformers.MistralForCausalLM, transformers.MistralConfig, DECODER),
    "qwen2": (transformers.Qwen2ForCausalLM, transformers.Qwen2Config, DECODER),
    "gemma": (transformers.GemmaForCausalLM, transformers.GemmaConfig, {"head_dim": 16, **DECODER}),
    "phi": (transformers.PhiForCausalLM, transformers.PhiConfig,
            {"vocab_size": 100, "bos_token_id": 0, "eos_token_id": 0, **SIZES}),
    "gpt_neox": (transformers.GPTNeoXForCausalLM, transformers.GPTNeoXConfig,
                 {"vocab_size": 100, "bos_token_id": 0, "eos_token_id": 0, **SIZES}),
    "opt": (transformers.OPTForCausalLM, transformers.OPTConfig,
            {"vocab_size": 100, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
             "ffn_dim": 128, "word_embed_proj_dim": 64, "bos_token_id": 0, "eos_token_id": 0}),
    "t5": (transformers.T5ForConditionalGeneration, transformers.T5Config,
           {"vocab_size": 100, "d_model": 64, "d_ff": 128, "num_layers": 2, "num_heads": 4, "d_kv": 16}),
    "bart": (transformers.BartForConditionalGeneration, transformers.BartConfig,
             {"vocab_size": 100, "d_model": 64, "encoder_layers": 2, "decoder_layers": 2,
              "encoder_attention_heads": 4, "decoder_attention_heads": 4, "encoder_ffn_dim": 128,
              "decoder_ffn_dim": 128}),
    "deit": (transformers.DeiTForImageClassification, transformers.DeiTConfig,
             {"image_size": 32, "patch_size": 8, "num_labels": 10, **SIZES}),
    "swin": (transformers.SwinForImageClassification, transformers.SwinConfig,
             {"image_size": 32, "patch_size": 4, "embed_dim": 16, "depths": [1, 1], "num_heads": [2, 2],
              "window_size": 4, "num_labels": 10}),
    "convnext": (transformers.ConvNextForImageClassification, transformers.ConvNextConfig,
                 {"hidden_sizes": [16, 32], "depths": [1, 1], "num_stages": 2, "num_labels": 10}),
    "resnet": (transformers.ResNetForImageClassification, transformers.ResNetConfig,
               {"embedding_size": 16, "hidden_sizes": [16, 32], "depths": [1, 1], "num_labels": 10}),
}
IMAGE_MODELS = {"deit", "swin", "convnext", "resnet"}
ENCODER_DECODER = {"t5", "bart"}


def build(name):
    model_class, config_class, fields = ARCHITECTURES[name]
    torch.manual_seed(0)
    return model_class(config_class(**fields))


def inputs_of(name):
    generator = torch.Generator().manual_seed(1)
    if name in IMAGE_MODELS:
        return (torch.randn(2, 3, 32, 32, generator=generator),)
    ids = torch.randint(0, 100, (2, 16), generator=generator)
    return (ids, None, ids) if name in ENCODER_DECODER else (ids,)  # input_ids, attention_mask, decoder ids


def logits(model, inputs):
    return model(*inputs).logits


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_architecture_converts_and_exact_keeps_bp_gradients(name):
    inputs = inputs_of(name)
    bp = build(name).eval()
    exact = aalconvert.convert(build(name), "exact", example_inputs=inputs).eval()
    expected = torch.autograd.grad(logits(bp, inputs).square().sum(), list(bp.parameters()), allow_unused=True)
    actual = torch.autograd.grad(logits(exact, inputs).square().sum(), list(exact.parameters()), allow_unused=True)
    for e, a in zip(expected, actual, strict=True):
        assert (e is None and a is None) or torch.equal(e, a)

    bp.train()
    torch.manual_seed(2)
    bp_bytes = measure_saved(lambda: logits(bp, inputs), bp.parameters()).nbytes
    for rules in ("auto", ["auto", "approx4"]):
        model = aalconvert.convert(build(name), rules, example_inputs=inputs).train()
        torch.manual_seed(2)
        saved = measure_saved(lambda: logits(model, inputs), model.parameters())
        assert saved.nbytes < bp_bytes, rules
        saved.output.square().mean().backward()
        torch.optim.SGD(model.parameters(), lr=0.1).step()
        assert all(torch.isfinite(p).all() for p in model.parameters())
        reverted = aalconvert.revert(model)
        assert [type(m) for m in reverted.modules()] == [type(m) for m in bp.modules()]

"""convert(model) without example inputs on Hugging Face models (aalconvert/example_inputs.py).

Issue 11 part 5: the conversion must be the one made with real example inputs
(here: the very same variant in every module, so the same bytes kept).
"""

import pytest
import torch
from torch import nn

import aalconvert
from aalconvert.errors import ConversionError
from aalconvert.example_inputs import self_described_inputs
from aalconvert.memory import measure_saved

transformers = pytest.importorskip("transformers")
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


def models():
    tokens = (torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(0)),)
    images = (torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)),)
    torch.manual_seed(0)
    return {
        "bert": (transformers.BertForMaskedLM(transformers.BertConfig(vocab_size=100, **SMALL)), tokens),
        "vit": (transformers.ViTForImageClassification(
            transformers.ViTConfig(image_size=32, patch_size=8, **SMALL)), images),
        "gpt2": (transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=100, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)), tokens),
        "llama": (transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=100, bos_token_id=0, eos_token_id=0, **SMALL)), tokens),
    }


@pytest.mark.parametrize("rules", ["auto", ["auto", "approx4"], "recompute"])
@pytest.mark.parametrize("name", ["bert", "vit", "gpt2", "llama"])
def test_without_example_inputs_hugging_face_models_convert_as_with_them(name, rules):
    model, inputs = models()[name]
    model.train()
    with_inputs = aalconvert.convert(model, rules, example_inputs=inputs)
    without = aalconvert.convert(model, rules)
    kinds = {n: type(m).__name__ for n, m in with_inputs.named_modules()}
    assert {n: type(m).__name__ for n, m in without.named_modules()} == kinds
    assert any(type(m).__module__.startswith("aalconvert.") for m in without.modules())
    kept = [measure_saved(lambda m=m: m(*inputs), model.parameters()).nbytes for m in (with_inputs, without)]
    assert kept[0] == kept[1]


def test_models_that_describe_no_input_get_none():
    assert self_described_inputs(nn.Sequential(nn.Linear(3, 4))) is None
    vit, _ = models()["vit"]
    (pixels,) = self_described_inputs(vit)
    assert pixels.shape == (2, 3, 32, 32) and pixels.dtype == torch.float32


def test_an_encoder_decoder_gets_its_decoder_inputs_at_their_positions():
    # T5's dummy_inputs name decoder_input_ids too: input_ids alone fails in its forward.
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=2, decoder_start_token_id=0,
        pad_token_id=0))
    inputs = self_described_inputs(model)
    assert inputs[0] is not None and inputs[1] is None and inputs[2].shape == inputs[0].shape
    converted = aalconvert.convert(model, "recompute")
    assert any(type(m).__module__.startswith("aalconvert.") for m in converted.modules())


class _Describes(nn.Module):
    """A token model whose own dummy batch does not run."""

    main_input_name = "input_ids"
    dummy_inputs = {"input_ids": torch.zeros(2, 4, dtype=torch.long)}

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(8, 4)

    def forward(self, input_ids, needed):
        return self.embed(input_ids) * needed


def test_a_model_failing_on_its_own_dummy_inputs_says_they_were_its_own():
    with pytest.raises(ConversionError, match=r"no example_inputs were given, so the model was run on "
                       r"its own dummy_inputs \(\(2, 4\), positional\), and it failed \(TypeError: .*needed.*\); "
                       r"pass example_inputs="):
        aalconvert.convert(_Describes(), "exact")

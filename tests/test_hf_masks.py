"""hf_masks: a step simulated on fake tensors takes the attention path of the real Hugging Face forward.

Without it, a decoder's position ids are fake, transformers cannot rule out packed
sequences, and every attention layer gets an explicit mask the real forward never
builds: the predicted peak comes out higher than the measured one. The same for
an all-ones attention mask (a tokenizer's, for unpadded rows), which a real
forward drops after reading it; a mask with one zero must stay (no
under-prediction).
"""

import sys

import pytest
import torch
from torch._subclasses import FakeTensorMode

import aalconvert
from aalconvert import hf_masks
from aalconvert.hf_masks import causal_masks_as_in_eager, passes_positions
from aalconvert.known_ones import OnesStorages
from aalconvert.memory import measure_saved
from aalconvert.step_memory import measure_training_step

transformers = pytest.importorskip("transformers")
masking_utils = pytest.importorskip("transformers.masking_utils")


def decoder(layers: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=500, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2)
    return transformers.LlamaForCausalLM(config).train()


def predicted_and_measured(model, ids, rules):
    totals = aalconvert.inspect(model, (ids,), rules).totals
    converted = aalconvert.convert(model, rules, example_inputs=(ids,))
    measured = measure_training_step(converted, lambda: converted(ids, labels=ids).loss).peak_bytes
    return totals.peak_converted_bytes - totals.parameter_bytes - totals.optimizer_state_bytes, measured


@pytest.mark.parametrize("rules", ["exact", "loss_head"])
def test_a_decoder_without_position_ids_is_predicted_to_the_byte(rules):
    # (Where torch's fakes of a small arange keep their values, as torch 2.13's do, transformers can
    # check them even without hf_masks; torch 2.14's do not: there this failed by 3.6 % on Llama.)
    model, ids = decoder(), torch.randint(0, 500, (4, 96), generator=torch.Generator().manual_seed(1))
    predicted, measured = predicted_and_measured(model, ids, rules)
    assert predicted == measured


def test_fake_positions_count_as_packed_for_transformers_and_not_inside_the_block():
    with FakeTensorMode() as mode:
        positions = mode.from_tensor(torch.arange(6)[None])  # no values: what a traced model sees
        assert masking_utils.find_packed_sequence_indices(positions) is not None  # a mask gets built
        with causal_masks_as_in_eager(positions_given=False):
            assert masking_utils.find_packed_sequence_indices(positions) is None
        with causal_masks_as_in_eager(positions_given=True):
            assert masking_utils.find_packed_sequence_indices(positions) is not None


def test_the_check_is_restored_after_the_block_and_real_positions_still_reach_it():
    original = masking_utils.find_packed_sequence_indices
    packed = torch.tensor([[0, 1, 2, 0, 1, 2]])  # two documents in one row
    with causal_masks_as_in_eager(positions_given=False):
        assert masking_utils.find_packed_sequence_indices is not original
        assert masking_utils.find_packed_sequence_indices(packed) is not None
        assert masking_utils.find_packed_sequence_indices(torch.arange(6)[None]) is None
    assert masking_utils.find_packed_sequence_indices is original
    with pytest.raises(RuntimeError, match="inside"), causal_masks_as_in_eager(positions_given=False):
        raise RuntimeError("inside")
    assert masking_utils.find_packed_sequence_indices is original
    with causal_masks_as_in_eager(positions_given=True):  # the caller's own positions: checked as transformers does
        assert masking_utils.find_packed_sequence_indices is original


def test_position_ids_are_found_by_keyword_by_position_and_through_a_wrapper():
    model = decoder(layers=1)
    ids = torch.zeros(1, 4, dtype=torch.long)
    positions = torch.arange(4)[None]
    assert not passes_positions(model, (ids,), {})
    assert not passes_positions(model, (ids,), {"position_ids": None})
    assert passes_positions(model, (ids,), {"position_ids": positions})
    assert passes_positions(model, (ids, None, positions), {})

    class Wrapper(torch.nn.Module):
        def forward(self, *args, **kwargs):
            return model(*args, **kwargs)

    assert passes_positions(Wrapper(), (ids, None, positions), {})  # cannot be told apart: as given
    assert not passes_positions(Wrapper(), (), {})
    assert hf_masks.POSITIONS == "position_ids"


def masked_models() -> dict:
    """Small random-init decoder, encoder and encoder-decoder, each taking (ids, attention_mask)."""
    torch.manual_seed(0)
    return {
        "llama": transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)),
        "opt": transformers.OPTForCausalLM(transformers.OPTConfig(
            vocab_size=50, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
            word_embed_proj_dim=32)),
        "bert": transformers.BertForMaskedLM(transformers.BertConfig(
            vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48)),
        "bart": transformers.BartForConditionalGeneration(transformers.BartConfig(
            vocab_size=50, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=48, decoder_ffn_dim=48)),
    }


def one_zero(mask: torch.Tensor) -> torch.Tensor:
    padded = mask.clone()
    padded[1, 0] = 0  # one padded token: the mask must be built
    return padded


@pytest.mark.parametrize("rules", ["exact", "auto"])
@pytest.mark.parametrize("mask_of", [torch.ones_like, lambda ids: one_zero(torch.ones_like(ids))],
                         ids=["all ones", "one zero"])
@pytest.mark.parametrize("name", ["llama", "opt", "bert", "bart"])
def test_an_attention_mask_is_predicted_to_the_byte_whether_it_is_dropped_or_kept(name, mask_of, rules):
    # Before known_ones an all-ones mask was kept per layer on fakes: Llama +10 %, BART +8 % of BP kept.
    model = masked_models()[name].train()
    ids = torch.randint(3, 50, (4, 32), generator=torch.Generator().manual_seed(0))
    mask = mask_of(ids)
    report = aalconvert.inspect(model, (ids, mask), rules, labels=ids)
    converted = aalconvert.convert(model, rules, example_inputs=(ids, mask))
    for predicted, measured_model in ((report.totals.bp_bytes, model),
                                      (report.totals.converted_bytes, converted)):
        torch.manual_seed(0)
        measured = measure_saved(lambda: measured_model(ids, attention_mask=mask, labels=ids).loss,
                                 measured_model.parameters())
        assert predicted == measured.nbytes


def test_an_all_ones_mask_gives_the_step_peak_of_no_mask():
    model = decoder(layers=2)
    ids = torch.randint(0, 500, (4, 64), generator=torch.Generator().manual_seed(1))
    with_mask = aalconvert.inspect(model, (ids, torch.ones_like(ids)), "exact").totals
    without = aalconvert.inspect(model, (ids,), "exact").totals
    assert with_mask.peak_converted_bytes == without.peak_converted_bytes
    measured = measure_training_step(model, lambda: model(ids, attention_mask=torch.ones_like(ids), labels=ids).loss)
    assert with_mask.peak_converted_bytes - with_mask.parameter_bytes - with_mask.optimizer_state_bytes == (
        measured.peak_bytes)


def test_the_mask_checks_are_restored_after_the_block():
    originals = [masking_utils._ignore_causal_mask_sdpa, masking_utils._ignore_bidirectional_mask_sdpa]
    with causal_masks_as_in_eager(positions_given=True):
        assert masking_utils._ignore_causal_mask_sdpa is not originals[0]
        assert bool(masking_utils._ignore_causal_mask_sdpa(torch.ones(2, 4, dtype=torch.bool), 4, 4, 0, 0))
        assert not masking_utils._ignore_causal_mask_sdpa(one_zero(torch.ones(2, 4, dtype=torch.bool)), 4, 4, 0, 0)
    assert [masking_utils._ignore_causal_mask_sdpa, masking_utils._ignore_bidirectional_mask_sdpa] == originals


def test_ones_are_followed_only_where_transformers_mask_checks_can_ask(monkeypatch):
    assert isinstance(hf_masks.masks_of_ones_followed([]), OnesStorages)
    monkeypatch.delitem(sys.modules, "transformers.masking_utils")
    assert not isinstance(hf_masks.masks_of_ones_followed([]), OnesStorages)

"""Hugging Face ``transformers`` models under a standard training loop after conversion (issue 7).

Built with the ``AutoModel...`` classes from small random-init configs (nothing
is downloaded), converted, put in ``train()`` mode and trained with AdamW on
one fixed batch: the loss must stay finite and go down. The README's
"Hugging Face and timm models" blocks are run as written.
"""

import re
from pathlib import Path

import pytest
import torch

import aalconvert

transformers = pytest.importorskip("transformers")

STEPS = 10
README = Path(__file__).resolve().parents[1] / "README.md"
COMMON = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64)


def _ids() -> torch.Tensor:
    return torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(0))


def _bert():
    config = transformers.BertConfig(vocab_size=100, **COMMON)
    return transformers.AutoModelForMaskedLM.from_config(config), dict(input_ids=_ids(), labels=_ids())


def _vit():
    config = transformers.ViTConfig(image_size=32, patch_size=8, num_labels=3, **COMMON)
    pixels = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    batch = dict(pixel_values=pixels, labels=torch.tensor([0, 1, 2, 0]))
    return transformers.AutoModelForImageClassification.from_config(config), batch


def _gpt2():
    config = transformers.GPT2Config(vocab_size=100, n_layer=2, n_embd=32, n_head=2, n_inner=64,
                                     n_positions=64, bos_token_id=0, eos_token_id=0)
    return transformers.AutoModelForCausalLM.from_config(config), dict(input_ids=_ids(), labels=_ids())


def _llama():
    config = transformers.LlamaConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
        bos_token_id=0, eos_token_id=0)
    return transformers.AutoModelForCausalLM.from_config(config), dict(input_ids=_ids(), labels=_ids())


MODELS = {"bert": _bert, "vit": _vit, "gpt2": _gpt2, "llama": _llama}


@pytest.mark.parametrize("rules", ["auto", "exact", "approx4"])
@pytest.mark.parametrize("name", list(MODELS))
def test_converted_hugging_face_model_trains_with_adamw_and_its_loss_goes_down(name, rules):
    torch.manual_seed(0)
    model, batch = MODELS[name]()
    model = aalconvert.convert(model, rules)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(STEPS):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.8 * losses[0]


def test_approx4_rewrites_layers_of_every_hugging_face_model():
    # The loop above proves little for a model conversion left untouched.
    for name, build in MODELS.items():
        model = aalconvert.convert(build()[0], "approx4")
        assert any(type(m).__module__.startswith("aalconvert") for m in model.modules()), name


def _readme_blocks() -> list[str]:
    section = README.read_text().split("\n## Hugging Face and timm models\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_readme_hugging_face_block_trains_and_its_loss_goes_down(capsys):
    torch.manual_seed(0)
    namespace: dict = {}
    exec(_readme_blocks()[0], namespace)
    assert any(type(m).__module__.startswith("aalconvert") for m in namespace["model"].modules())
    losses = [float(line.split()[1]) for line in capsys.readouterr().out.splitlines()]
    assert len(losses) == 10 and losses[-1] < 0.8 * losses[0]


def test_readme_timm_style_block_runs():
    namespace: dict = {}
    exec(_readme_blocks()[1], namespace)
    model = namespace["model"]
    assert any(type(m).__module__.startswith("aalconvert") for m in model.modules())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())

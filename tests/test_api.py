"""convert() / revert(): shared Parameters, idempotence, inplace, revert, bad input, Hugging Face models."""


import pytest
import torch
from torch import nn

import aalconvert
from aalconvert.api import plan_conversion
from aalconvert.errors import ConversionError
from aalconvert.memory import measure_saved
from aalconvert.rules.registry import NAMES
from aalconvert.rules.wiring import is_wired
from examples import EXAMPLES


def build(name: str = "resnet_basic", **overrides) -> nn.Module:
    torch.manual_seed(0)
    return EXAMPLES[name].build_model(**overrides).train()


def inputs_of(name: str = "resnet_basic") -> tuple:
    return EXAMPLES[name].example_inputs(batch_size=4)


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def types_of(model: nn.Module) -> dict[str, type]:
    return {name: type(m) for name, m in model.named_modules()}


def test_converted_model_shares_parameter_objects_and_state_dict():
    model = build()
    converted = aalconvert.convert(model, "auto")
    assert [id(p) for p in converted.parameters()] == [id(p) for p in model.parameters()]
    original, new = model.state_dict(), converted.state_dict()
    assert list(new) == list(original)
    assert all(new[k] is original[k] or torch.equal(new[k], original[k]) for k in original)


def test_optimizer_built_before_conversion_updates_converted_weights():
    model = build()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    converted = aalconvert.convert(model, "auto")
    before = converted.fc.weight.detach().clone()
    converted(*inputs_of()).square().mean().backward()
    optimizer.step()
    assert not torch.equal(converted.fc.weight, before)


@pytest.mark.parametrize("when", ["before", "after"])
def test_pretrained_weights_load_before_or_after_conversion(when):
    pretrained = build()
    with torch.no_grad():
        for p in pretrained.parameters():
            p.add_(1.0)
    model = build()
    if when == "before":
        model.load_state_dict(pretrained.state_dict())
    converted = aalconvert.convert(model, "auto")
    if when == "after":
        converted.load_state_dict(pretrained.state_dict())
    for key, value in pretrained.state_dict().items():
        assert torch.equal(converted.state_dict()[key], value), key


@pytest.mark.parametrize("rules", ["auto", "ara", "asa", "recompute"])
def test_converting_twice_adds_no_sites_no_hooks(rules):
    name = "vit" if rules == "asa" else "resnet_basic"
    model = build(name, dropout=0.0) if name == "vit" else build(name)
    once = aalconvert.convert(model, rules)
    plan, _ = plan_conversion(once, rules)
    changed = [n for n, s in plan.sites.items()]
    twice = aalconvert.convert(once, rules)
    assert types_of(twice) == types_of(once)
    assert hook_count(twice) == hook_count(once)
    assert not [n for n in changed if type(twice.get_submodule(n)) is not type(once.get_submodule(n))]
    x = inputs_of(name)
    torch.manual_seed(2)
    expected = once(*x)
    torch.manual_seed(2)
    assert torch.equal(twice(*x), expected)


def test_inplace_false_leaves_original_tree_and_inplace_true_changes_it():
    model = build()
    before = types_of(model)
    converted = aalconvert.convert(model, "auto")
    assert types_of(model) == before and hook_count(model) == 0
    assert types_of(converted) != before
    same = aalconvert.convert(model, "auto", inplace=True)
    assert same is model and types_of(model) == types_of(converted)


@pytest.mark.parametrize("rules", ["exact", "recompute", "ara", "approx4", "auto"])
@pytest.mark.parametrize("name", ["resnet_bottleneck", "vit"])
def test_revert_gives_plain_torch_modules_without_hooks_and_the_same_forward(name, rules):
    model = build(name, dropout=0.0) if name == "vit" else build(name)
    converted = aalconvert.convert(model, rules)
    reverted = aalconvert.revert(converted)
    assert all(type(m).__module__.startswith(("torch.", "examples.")) for m in reverted.modules())
    assert not any(is_wired(m) for m in reverted.modules())
    assert hook_count(reverted) == 0
    assert types_of(reverted) == types_of(model)
    x = inputs_of(name)
    torch.manual_seed(2)
    expected = model(*x)
    torch.manual_seed(2)
    assert torch.equal(reverted(*x), expected)


class _Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.fc(x))


@pytest.mark.parametrize(
    ("model", "rules", "options", "message"),
    [
        ({"fc.weight": torch.zeros(1)}, "auto", {}, "nn.Module"),
        (None, "fast", {}, "unknown rule 'fast'"),
        (None, "auto", {"colour": 1}, "unknown option colour="),
        (None, "exact", {"ara_group": 2}, "ara_group= only applies"),
        (None, "ara", {"ara_group": 0}, "ara_group"),
        (None, "ara", {"ara_group": "x"}, "ara_group"),
        (None, "ara", {"ara_group": [0]}, "ara_group"),
        (None, "asa", {"asa_eps": -1}, "eps"),
        (None, "approx4", {"bits": 2}, "contradicts rule 'approx4'"),
        (None, "auto", {"skip": ["nowhere"]}, "nowhere"),
        (None, None, {}, "rules must be a rule name or a list of rule names .* got NoneType None; "
                         "available rules: auto, exact"),
        (None, 3, {}, "rules must be a rule name or a list of rule names .* got int 3; available rules"),
        (None, ["exact", 3], {}, "rules must be a rule name .* a list holding int 3"),
        (None, [], {}, "rules is an empty list: name at least one rule .* available rules: auto"),
        (None, "approx4", {"bits": 3}, "bits=3 is not an allowed bit width; allowed: 8 (rule 'approx8'), "
                                       "4 (rule 'approx4'), 2 (rule 'approx2')"),
        (None, "auto", {"bits": 3}, "bits=3 is not an allowed bit width"),
        (None, "ara", {"ara_group": [1, 2, 3]}, "ara_group=[1, 2, 3] gives 3 group sizes but ARA found 0 "
                                                "runs (stages)"),
    ],
    ids=["not-module", "rule", "option", "option-for-other-rule", "group-0", "group-x", "group-list-0",
         "asa-eps", "bits", "skip-missing", "rules-none", "rules-int", "rules-list-int", "rules-empty",
         "bits-3", "bits-3-auto", "group-list-length"],
)
def test_bad_input_raises_conversion_error_before_any_change(model, rules, options, message):
    target = _Plain() if model is None else model
    before = types_of(target) if isinstance(target, nn.Module) else None
    escaped = message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]")
    with pytest.raises(ConversionError, match=escaped):
        aalconvert.convert(target, rules, inplace=True, **options)
    if before is not None:
        assert types_of(target) == before and hook_count(target) == 0


def test_revert_of_a_non_module_names_revert():
    with pytest.raises(ConversionError, match=r"^revert\(\) takes a torch.nn.Module, got NoneType"):
        aalconvert.revert(None)


def test_meta_device_model_is_refused_with_advice():
    with torch.device("meta"):
        model = _Plain()
    with pytest.raises(ConversionError, match="meta device"):
        aalconvert.convert(model)


def test_skip_by_name_and_by_predicate_keeps_those_modules():
    model = build()
    by_name = aalconvert.convert(model, "exact", skip=["layer1"])
    assert type(by_name.relu) is not nn.ReLU or type(by_name.maxpool) is not nn.MaxPool2d
    assert all(type(m).__module__.startswith(("torch.", "examples."))
               for n, m in by_name.named_modules() if n.startswith("layer1"))
    by_predicate = aalconvert.convert(model, "exact", skip=lambda module, name: isinstance(module, nn.MaxPool2d))
    assert type(by_predicate.maxpool) is nn.MaxPool2d
    assert type(aalconvert.convert(model, "exact").maxpool) is not nn.MaxPool2d


transformers = pytest.importorskip("transformers")


def _hf_models():
    common = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                  hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    bert = transformers.BertForMaskedLM(transformers.BertConfig(vocab_size=100, **common))
    vit = transformers.ViTModel(transformers.ViTConfig(image_size=32, patch_size=8, **common))
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=100, n_layer=2, n_embd=32, n_head=2, n_inner=64, n_positions=64,
        resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1))
    ids = torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(0))
    pixels = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return {"bert": (bert, {"input_ids": ids}), "vit": (vit, {"pixel_values": pixels}),
            "gpt2": (gpt2, {"input_ids": ids})}


@pytest.fixture(scope="module")
def hf_models():
    torch.manual_seed(0)
    return _hf_models()


def _first_tensor(output) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output.last_hidden_state


@pytest.mark.parametrize("rules", NAMES)
@pytest.mark.parametrize("name", ["bert", "vit", "gpt2"])
def test_hugging_face_models_convert_train_and_keep_at_most_bp(hf_models, name, rules):
    model, kwargs = hf_models[name]
    model.train()

    def kept(m):
        torch.manual_seed(1)
        return measure_saved(lambda: _first_tensor(m(**kwargs)), exclude=list(m.parameters()))

    bp = kept(model)
    converted = aalconvert.convert(model, rules)
    saved = kept(converted)
    saved.output.square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in converted.parameters() if p.grad is not None)
    assert saved.nbytes <= bp.nbytes
    if rules == "exact":  # dropout is active: its 1-bit masks keep less than bool masks
        assert saved.nbytes < bp.nbytes
    model.zero_grad(set_to_none=True)

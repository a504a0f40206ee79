"""aalconvert.inspect() and the fake-tensor estimate behind it (aalconvert.memory.saved_by_module).

The estimate is held to the measurement: on every example and on Hugging Face
models, the report's BP and converted totals agree with what a real forward
keeps (aalconvert.memory.measure_saved).
"""

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor

import aalconvert
import aalconvert.trace
from aalconvert.api import plan_conversion
from aalconvert.errors import ConversionError
from aalconvert.memory import measure_saved, saved_by_module
from examples import EXAMPLES

RULE_SETS = ("exact", "auto", "approx4")


def real_kept(model: nn.Module, inputs: tuple) -> int:
    model.train()
    return measure_saved(lambda: model(*inputs), model.parameters()).nbytes


def assert_close(estimated: int, measured: int) -> None:
    assert abs(estimated - measured) <= 0.03 * measured, (estimated, measured)


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_estimate_agrees_with_real_measurement_on_every_example(name):
    torch.manual_seed(0)
    model = EXAMPLES[name].build_model().train()
    inputs = EXAMPLES[name].example_inputs(batch_size=4)
    bp_measured = real_kept(model, inputs)
    for rules in RULE_SETS:
        report = aalconvert.inspect(model, inputs, rules)
        converted = aalconvert.convert(model, rules, example_inputs=inputs)
        assert_close(report.totals.bp_bytes, bp_measured)
        assert_close(report.totals.converted_bytes, real_kept(converted, inputs))
        assert report.totals.converted_bytes < report.totals.bp_bytes


def hugging_face_models():
    transformers = pytest.importorskip("transformers")
    small = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64)
    tokens = (torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(0)),)
    images = (torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)),)
    return [
        (transformers.BertModel(transformers.BertConfig(vocab_size=100, **small)), tokens),
        (transformers.ViTModel(transformers.ViTConfig(image_size=32, patch_size=8, **small)), images),
        (transformers.GPT2Model(transformers.GPT2Config(
            vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_inner=64)), tokens),
    ]


def test_estimate_agrees_with_real_measurement_on_hugging_face_models():
    torch.manual_seed(0)
    for model, inputs in hugging_face_models():
        model.train()
        report = aalconvert.inspect(model, inputs, "exact")
        converted = aalconvert.convert(model, "exact", example_inputs=inputs)
        assert_close(report.totals.bp_bytes, real_kept(model, inputs))
        assert_close(report.totals.converted_bytes, real_kept(converted, inputs))


def small_resnet() -> tuple[nn.Module, tuple]:
    torch.manual_seed(0)
    return EXAMPLES["resnet_basic"].build_model().train(), EXAMPLES["resnet_basic"].example_inputs(2)


def test_inspect_leaves_the_model_untouched():
    model, inputs = small_resnet()
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    parameters = [id(p) for p in model.parameters()]
    types = {name: type(m) for name, m in model.named_modules()}
    aalconvert.inspect(model, inputs, "auto")
    assert [id(p) for p in model.parameters()] == parameters
    assert {name: type(m) for name, m in model.named_modules()} == types
    assert all(not m.training for m in model.modules())
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(not isinstance(p, FakeTensor) and p.grad is None for p in model.parameters())


def test_meta_device_model_gives_the_same_report_as_the_real_model():
    model, inputs = small_resnet()
    with torch.device("meta"):
        meta_model = EXAMPLES["resnet_basic"].build_model()
    meta_inputs = (torch.empty(inputs[0].shape, device="meta"),)
    real, meta = aalconvert.inspect(model, inputs), aalconvert.inspect(meta_model, meta_inputs)
    assert meta.estimated_on == "fake tensors"
    assert meta.totals.to_dict() == real.totals.to_dict()
    assert [(r.name, r.bytes_bp, r.bytes_converted) for r in meta.rows] == \
        [(r.name, r.bytes_bp, r.bytes_converted) for r in real.rows]


class RefusesFakeTensorsInTraining(nn.Module):
    """Stands for an op without a fake implementation (it runs on meta and real tensors)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and isinstance(x, FakeTensor):
            raise RuntimeError("no fake kernel for this op")
        return self.linear(x).sigmoid()


def test_falls_back_to_the_meta_device_and_says_so():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), RefusesFakeTensorsInTraining(), nn.Linear(8, 3))
    inputs = (torch.randn(5, 8),)
    report = aalconvert.inspect(model, inputs, "exact")
    assert report.estimated_on == "the meta device"
    assert any("no fake kernel for this op" in note for note in report.notes)
    assert report.totals.bp_bytes == real_kept(model, inputs)
    assert report.totals.converted_bytes == real_kept(aalconvert.convert(model, "exact"), inputs)


def test_rows_add_up_to_the_totals_and_carry_the_plan_rule():
    model, inputs = small_resnet()
    report = aalconvert.inspect(model, inputs, "auto")
    plan, _ = plan_conversion(model, "auto", example_inputs=inputs)
    assert sum(r.bytes_bp for r in report.rows) == report.totals.bp_bytes
    assert sum(r.bytes_converted for r in report.rows) == report.totals.converted_bytes
    for row in report.rows:
        site = plan.sites.get(row.name)
        assert row.rule == (site.rule if site else "")
        if site:
            assert row.explanation.startswith(site.reason)
    by_name = {row.name: row for row in report.rows}
    # torchvision-style stem: the ReLU after bn1 keeps a 1-bit mask instead of 4x16x16x16 fp32.
    stem = by_name["relu"]
    assert (stem.op, stem.output_shape, stem.dtype, stem.rule) == ("ReLU", (2, 16, 16, 16), "fp32", "exact")
    assert stem.bytes_bp == 2 * 16 * 16 * 16 * 4
    assert stem.bytes_converted == 2 * 16 * 16 * 16 // 8
    assert "kept as is" in by_name["bn1"].explanation
    # An ARA anchor is the ReLU output BP counted at the ReLU; the report says the conv's bytes are that tensor.
    grown = [row for row in report.rows if row.bytes_converted > row.bytes_bp]
    assert grown and all("(shared)" in row.explanation for row in grown)


def test_functional_ops_are_attributed_to_the_enclosing_module():
    torch.manual_seed(0)
    model = EXAMPLES["vit"].build_model().train()
    report = aalconvert.inspect(model, EXAMPLES["vit"].example_inputs(2), "exact")
    leaves = {name for name, m in model.named_modules() if next(m.children(), None) is None}
    enclosing = [row for row in report.rows if row.name not in leaves]
    assert enclosing, "the attention core (matmul, softmax) is functional and must show up"
    assert all(row.explanation.startswith("functional ops in") for row in enclosing)


class BranchesOnRank(nn.Module):
    """fx cannot trace a branch on a traced value (here the input's rank); fake tensors run it."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) if x.dim() == 2 else x


def test_untraced_modules_are_listed_with_their_reason(monkeypatch):
    def refuse(*args, **kwargs):
        raise RuntimeError("value tracing disabled for this test")

    monkeypatch.setattr(aalconvert.trace, "_trace_on_values", refuse)
    model = nn.Sequential(nn.Linear(6, 6), nn.GELU(), BranchesOnRank())
    report = aalconvert.inspect(model, (torch.randn(3, 6),), "exact")
    untraced = {u.name: u.reason for u in report.untraced}
    assert "value tracing disabled for this test" in untraced["2"]
    rows = {row.name: row for row in report.rows}
    assert rows["2.linear"].explanation.startswith("not traced")
    assert report.totals.bp_bytes == real_kept(model, (torch.randn(3, 6),))


@pytest.mark.parametrize("optimizer, factor", [(None, 0), ("sgd", 0), ("sgd_momentum", 1),
                                               ("adam", 2), ("adamw", 2)])
def test_optimizer_state_and_peak_follow_the_stated_formula(optimizer, factor):
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5))
    model[2].bias.requires_grad_(False)
    report = aalconvert.inspect(model, (torch.randn(4, 10),), "exact", optimizer=optimizer)
    t = report.totals
    assert t.parameter_bytes == (10 * 20 + 20 + 20 * 5 + 5) * 4
    assert t.gradient_bytes == t.parameter_bytes - 5 * 4
    assert t.optimizer_state_bytes == factor * t.gradient_bytes
    assert t.largest_transient_bytes == 2 * 4 * 20 * 4  # twice the largest module output
    assert t.optimizer_step_bytes == (2 * 20 * 10 * 4 if optimizer in ("adam", "adamw") else 0)
    assert t.converted_step_bytes is not None  # simulated (tests/test_step_memory.py holds it to measurement)
    assert t.peak_converted_bytes == (t.parameter_bytes + t.optimizer_state_bytes + max(
        t.converted_step_bytes, t.gradient_bytes + t.optimizer_step_bytes))


@pytest.mark.parametrize("call, message", [
    (lambda m, x: aalconvert.inspect(m.state_dict(), x), "torch.nn.Module"),
    (lambda m, x: aalconvert.inspect(m, x[0]), "tuple"),
    (lambda m, x: aalconvert.inspect(m, x, "fastest"), "unknown rule"),
    (lambda m, x: aalconvert.inspect(m, x, optimizer="lion"), "unknown optimizer"),
    (lambda m, x: aalconvert.inspect(m, x, "exact", bits=4), "bits="),
])
def test_bad_arguments_raise_conversion_error_naming_the_problem(call, message):
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with pytest.raises(ConversionError, match=message):
        call(model, (torch.randn(2, 4),))


def test_saved_by_module_attributes_each_storage_to_the_innermost_module_once():
    model = nn.Sequential(nn.Linear(8, 16), nn.Sequential(nn.ReLU(), nn.Linear(16, 4)))
    x = torch.randn(3, 8)
    global_hooks = (len(nn.modules.module._global_forward_pre_hooks),
                    len(nn.modules.module._global_forward_hooks))
    saved = saved_by_module(model, lambda: model(x), model.parameters())
    # Linear keeps its input x; ReLU keeps its output, which the second Linear then keeps again (once).
    assert saved.bytes_by_module == {"0": 3 * 8 * 4, "1.0": 3 * 16 * 4}
    assert saved.counted_at == {"1.1": "1.0"}
    assert saved.nbytes == measure_saved(lambda: model(x), model.parameters()).nbytes
    assert saved.outputs["1"] == ((3, 4), torch.float32)
    assert (len(nn.modules.module._global_forward_pre_hooks),
            len(nn.modules.module._global_forward_hooks)) == global_hooks


@pytest.mark.parametrize("name", ["resnet_basic", "vit"])
def test_inspect_and_fake_measurement_read_no_fake_data_pointer(name):
    # torch warns (and will fail) on reading a FakeTensor's data pointer; storages are told
    # apart by identity on fake tensors, with the byte counts of the real measurement.
    import warnings

    from torch._subclasses import FakeTensorMode

    from aalconvert.memory import fake_copy, fake_inputs

    torch.manual_seed(0)
    model = EXAMPLES[name].build_model().train()
    inputs = EXAMPLES[name].example_inputs(batch_size=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        aalconvert.inspect(model, inputs, "auto")
        mode = FakeTensorMode(allow_non_fake_inputs=True)
        fake_model = fake_copy(model, mode, torch.device("cpu")).train()
        fake = fake_inputs(inputs, mode, torch.device("cpu"))
        with mode:
            estimated = measure_saved(lambda: fake_model(*fake), fake_model.parameters()).nbytes
    assert estimated == real_kept(model, inputs)


def hugging_face_language_models_with_dropout():
    """GPT-2 and BERT as the zoo builds them (random init, default dropout 0.1, default SDPA
    attention), at 128 tokens: long enough that attention's L x L dropout mask dominates."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=100, n_layer=2, n_embd=64, n_head=4, n_inner=128, n_positions=128,
        bos_token_id=0, eos_token_id=0))
    bert = transformers.BertForMaskedLM(transformers.BertConfig(
        vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128))
    tokens = torch.randint(0, 100, (4, 128), generator=torch.Generator().manual_seed(1))
    return [("gpt2", gpt2, tokens), ("bert", bert, tokens)]


@pytest.mark.parametrize("rules", ["exact", "auto"])
def test_estimate_of_hugging_face_training_with_attention_dropout_matches_a_real_step(rules):
    # CPU runs SDPA's math path when dropout_p > 0 (real and fake alike); it saves its dropout
    # mask as a float 0-or-1/(1-p) tensor, which the lossless packer keeps in 1 bit after reading
    # its values. Fake tensors have none: inspect used to count that L x L mask in full,
    # predicting 0.695 of BP for GPT-2 under auto where a real step keeps 0.528.
    for name, model, tokens in hugging_face_language_models_with_dropout():
        model.train()
        report = aalconvert.inspect(model, (tokens,), rules)
        torch.manual_seed(1)
        bp = measure_saved(lambda: model(tokens, labels=tokens), model.parameters()).nbytes
        converted = aalconvert.convert(model, rules, example_inputs=(tokens,)).train()
        torch.manual_seed(1)
        kept = measure_saved(lambda: converted(tokens, labels=tokens), model.parameters()).nbytes
        assert abs(report.totals.bp_bytes - bp) <= 0.005 * bp, (name, report.totals.bp_bytes, bp)
        assert abs(report.totals.converted_bytes - kept) <= 0.005 * kept, (name, report.totals.converted_bytes, kept)


class DropoutThenInPlace(nn.Module):
    """Functional dropout whose kept mask is two-valued, or, after an in-place add to it, not."""

    def __init__(self, spoil: bool) -> None:
        super().__init__()
        self.linear, self.spoil = nn.Linear(64, 64), spoil

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = torch.empty_like(x).bernoulli_(0.9).div_(0.9)
        if self.spoil:
            mask.add_(0.5)  # now 0.5 and 1.61: no 1-bit form
        return self.linear(x) * mask


@pytest.mark.parametrize("spoil", [False, True])
def test_estimate_packs_a_float_mask_in_one_bit_only_while_it_holds_two_values(spoil):
    torch.manual_seed(0)
    model, inputs = DropoutThenInPlace(spoil).train(), (torch.randn(128, 64),)  # over min_numel
    report = aalconvert.inspect(model, inputs, "exact")
    converted = aalconvert.convert(model, "exact", example_inputs=inputs)
    assert report.totals.converted_bytes == real_kept(converted, inputs)
    assert (report.totals.converted_bytes < report.totals.bp_bytes) is not spoil


def test_a_hook_that_reads_a_value_fails_the_estimate_naming_the_hook_and_convert_still_runs():
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    statistics = []
    model[2].register_forward_hook(lambda module, args, output: statistics.append(output.abs().mean().item()))
    inputs = (torch.randn(8, 16),)
    for estimate in (lambda: aalconvert.inspect(model, inputs),
                     lambda: aalconvert.plan(model, budget="1GiB", example_inputs=inputs)):
        with pytest.raises(ConversionError, match=r"reads a tensor's value .*\.item\(\).*forward hooks.*: 2\. "):
            estimate()
    converted = aalconvert.convert(model, example_inputs=inputs)  # traced on real values where fakes fail
    expected = model(*inputs).abs().mean().item()
    statistics.clear()
    converted(*inputs)
    assert statistics == [expected]

"""The lossless rules' promise, tried as users break it: bit-identical gradients or a raised error.

Every lossless rule set (``exact``, ``recompute``) on every example model, under
the patterns that once gave silent wrong gradients (issue 13): user hooks before
and after conversion on every module kind, second-order gradients, direct
submodule calls on other tensors, gradient accumulation, frozen parameters,
threads sharing one model, ``torch.func`` transforms and an exception in the
middle of a forward. The reference is always the unconverted model, which shares
the converted model's Parameter objects; gradients are taken with
``torch.autograd.grad`` so the two never mix in ``.grad``.
"""

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import aalconvert
from aalconvert.nn.recompute import RecomputedInputConv2d, RecomputedInputLinear
from aalconvert.rules.wiring import wiring_of
from examples import EXAMPLES
from threads import run_in_threads

LOSSLESS = ("exact", "recompute")
NAMES = sorted(EXAMPLES)
IMAGE_MODELS = ("mixer", "resnet_basic", "resnet_bottleneck", "vit")  # float inputs: penalties on x
BATCH = 2


def build(name: str, dropout: bool = True) -> tuple[nn.Module, tuple]:
    torch.manual_seed(0)
    fields = {f.name for f in dataclasses.fields(EXAMPLES[name].config)}
    overrides = {} if dropout or "dropout" not in fields else {"dropout": 0.0}
    model = EXAMPLES[name].build_model(**overrides).train()
    return model, EXAMPLES[name].example_inputs(batch_size=BATCH, **overrides)


def convert(model: nn.Module, rules: str, inputs: tuple) -> nn.Module:
    return aalconvert.convert(model, rules, example_inputs=inputs)


def loss_of(output: torch.Tensor) -> torch.Tensor:
    weights = torch.randn(output.shape, generator=torch.Generator().manual_seed(7), dtype=output.dtype)
    return (output * weights).sum()


def gradients(model: nn.Module, inputs: tuple, seed: int = 1) -> tuple[torch.Tensor | None, ...]:
    torch.manual_seed(seed)  # dropout draws: the mask variants repeat torch's
    loss = loss_of(model(*inputs))
    parameters = [p for p in model.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, parameters, allow_unused=True)


def assert_bit_identical(actual, expected) -> None:
    """Equal bit for bit (NaN where BP has NaN), and None exactly where BP's is None."""
    assert len(actual) == len(expected)
    for index, (a, e) in enumerate(zip(actual, expected)):
        assert (a is None) == (e is None), f"gradient {index}: {a is None=} but {e is None=}"
        if a is not None:
            torch.testing.assert_close(a, e, rtol=0, atol=0, equal_nan=True, msg=f"gradient {index}")


def leaves_by_kind(model: nn.Module) -> dict[type, str]:
    """The first leaf module of each class (by name), as found in ``model``."""
    found: dict[type, str] = {}
    for name, module in model.named_modules():
        if name and next(module.children(), None) is None:
            found.setdefault(type(module), name)
    return found


def scale_output(module, args, output):
    return output * 1.5 if isinstance(output, torch.Tensor) and output.is_floating_point() else None


def scale_input(module, args):
    if args and isinstance(args[0], torch.Tensor) and args[0].is_floating_point():
        return (args[0] * 1.5, *args[1:])
    return None


HOOKS = {"forward": ("register_forward_hook", scale_output), "pre": ("register_forward_pre_hook", scale_input)}


@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("kind", sorted(HOOKS))
@pytest.mark.parametrize("rules", LOSSLESS)
@pytest.mark.parametrize("name", NAMES)
def test_value_changing_hooks_on_every_module_kind_keep_gradients_bit_identical(name, rules, kind, when):
    model, inputs = build(name)
    register, hook = HOOKS[kind]
    names = list(leaves_by_kind(model).values())
    if when == "before":
        for module_name in names:
            getattr(model.get_submodule(module_name), register)(hook)
        converted = convert(model, rules, inputs)
    else:
        converted = convert(model, rules, inputs)
        for module_name in names:
            targets = {id(m): m for m in (model.get_submodule(module_name), converted.get_submodule(module_name))}
            for module in targets.values():
                getattr(module, register)(hook)
    assert_bit_identical(gradients(converted, inputs), gradients(model, inputs))


def _penalty_gradients(model: nn.Module, inputs: tuple, on_input: bool):
    torch.manual_seed(1)
    parameters = [p for p in model.parameters() if p.requires_grad]
    if on_input:
        inputs = tuple(x.clone().requires_grad_() for x in inputs)
        targets = list(inputs)
    else:
        targets = parameters
    first = torch.autograd.grad(loss_of(model(*inputs)), targets, create_graph=True, allow_unused=True)
    penalty = sum(g.square().sum() for g in first if g is not None)
    second = torch.autograd.grad(penalty, parameters, allow_unused=True)
    return [g.detach() if g is not None else None for g in first], second


@pytest.mark.parametrize("rules", LOSSLESS)
@pytest.mark.parametrize("name", NAMES)
def test_second_order_gradients_match_bp(name, rules):
    # First-order gradients stay bit-identical under create_graph=True; the second order is
    # BP's up to the order of floating-point sums (the rebuilt input is differentiated anew).
    model, inputs = build(name)
    converted = convert(model, rules, inputs)
    for on_input in ((False, True) if name in IMAGE_MODELS else (False,)):
        first, second = _penalty_gradients(converted, inputs, on_input)
        first_bp, second_bp = _penalty_gradients(model, inputs, on_input)
        assert_bit_identical(first, first_bp)
        # Measured against the largest second-order gradient: some are zero in exact arithmetic
        # (a key bias shifts every score of a row alike) and both sides hold rounding noise there.
        scale = max(g.abs().max() for g in second_bp if g is not None)
        for actual, expected in zip(second, second_bp, strict=True):
            assert (actual is None) == (expected is None)  # zeros where BP has zeros, not None
            if actual is not None:
                assert (actual - expected).abs().max() <= 1e-5 * scale


def _recompute_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    kinds = (RecomputedInputLinear, RecomputedInputConv2d)
    return [(n, m) for n, m in model.named_modules() if isinstance(m, kinds) and m.chain]


@pytest.mark.parametrize("name", NAMES)
def test_direct_calls_of_chain_and_layer_on_other_tensors_give_bp_gradients(name):
    # Manifold mixup and friends: the chain runs on one tensor, the layer gets another.
    model, inputs = build(name, dropout=False)
    converted = convert(model, "recompute", inputs)
    layers = _recompute_layers(converted)
    assert layers, "the recompute rule converted no layer with a chain"
    converted(*inputs)  # a normal forward first: nothing of it may leak into the direct calls
    generator = torch.Generator().manual_seed(3)
    for layer_name, layer in layers:
        plain = model.get_submodule(layer_name)
        start = layer.chain[0]
        shape = _input_shape(start, layer)
        if shape is None:
            continue
        z = torch.randn(shape, generator=generator)

        def call(target, chain, mixed):
            x = z
            for module in chain:
                x = module(x)
            if mixed:
                x = 0.7 * x + 0.3 * x.flip(0)
            return torch.autograd.grad(loss_of(target(x)), [target.weight])[0]

        plain_chain = [model.get_submodule(_name_of(converted, m)) for m in layer.chain]
        for mixed in (False, True):
            assert torch.equal(call(layer, layer.chain, mixed), call(plain, plain_chain, mixed)), layer_name


def _name_of(model: nn.Module, module: nn.Module) -> str:
    return next(n for n, m in model.named_modules() if m is module)


def _input_shape(start: nn.Module, layer: nn.Module) -> tuple[int, ...] | None:
    if isinstance(layer, nn.Linear):
        return (BATCH, 3, layer.in_features)
    if isinstance(layer, nn.Conv2d):
        return (BATCH, layer.in_channels, 6, 6)
    return None


def test_manifold_mixup_on_a_normed_feature_gives_bp_gradients():
    # The reproduction in issue 13: head's input is no longer norm's output.
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.norm, self.head = nn.Linear(16, 32), nn.LayerNorm(32), nn.Linear(32, 4)

        def forward(self, x):
            return self.head(self.norm(self.body(x)))

    torch.manual_seed(0)
    model, x, permutation = Net(), torch.randn(8, 16), torch.randperm(8)
    converted = aalconvert.convert(model, "recompute")
    assert isinstance(converted.head, RecomputedInputLinear)

    def mixup(m):
        f = m.norm(m.body(x))
        f = 0.7 * f + 0.3 * f[permutation]
        return torch.autograd.grad(loss_of(m.head(f)), list(m.parameters()))

    assert_bit_identical(mixup(converted), mixup(model))


@pytest.mark.parametrize("rules", LOSSLESS)
@pytest.mark.parametrize("name", NAMES)
def test_two_forwards_before_one_backward_and_accumulated_steps_give_bp_gradients(name, rules):
    model, inputs = build(name)
    other = EXAMPLES[name].example_inputs(batch_size=BATCH + 1)
    converted = convert(model, rules, inputs)

    def interleaved(m):
        torch.manual_seed(1)
        loss = loss_of(m(*inputs))
        loss = loss + loss_of(m(*other))  # two graphs alive at once, then one backward
        return torch.autograd.grad(loss, list(m.parameters()), allow_unused=True)

    assert_bit_identical(interleaved(converted), interleaved(model))

    def accumulated(m):
        m.zero_grad(set_to_none=True)
        for seed, batch in ((1, inputs), (2, other)):
            torch.manual_seed(seed)
            loss_of(m(*batch)).backward()
        return tuple(None if p.grad is None else p.grad.clone() for p in m.parameters())

    assert_bit_identical(accumulated(converted), accumulated(model))
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("rules", LOSSLESS)
@pytest.mark.parametrize("name", NAMES)
def test_frozen_parameters_keep_the_others_gradients_bit_identical(name, rules):
    model, inputs = build(name)
    converted = convert(model, rules, inputs)
    for index, module in enumerate(m for m in model.modules() if next(m.parameters(False), None) is not None):
        if index % 2 == 0:
            for parameter in module.parameters(recurse=False):
                parameter.requires_grad_(False)  # shared Parameter objects: frozen in both
    assert_bit_identical(gradients(converted, inputs), gradients(model, inputs))


@pytest.mark.parametrize("rules", LOSSLESS)
@pytest.mark.parametrize("name", NAMES)
def test_threads_sharing_one_converted_model_get_their_own_gradients(name, rules):
    model, inputs = build(name, dropout=False)
    converted = convert(model, rules, inputs)
    batches = [EXAMPLES[name].example_inputs(batch_size=BATCH + i) for i in range(4)]
    expected = [gradients(model, batch) for batch in batches]
    results = run_in_threads(lambda batch: gradients(converted, batch), batches, repeats=3)
    for actual, grads in zip(results, expected, strict=True):
        assert_bit_identical(actual, grads)


@pytest.mark.parametrize("rules", LOSSLESS)
@pytest.mark.parametrize("name", NAMES)
def test_torch_func_grad_equals_the_plain_models(name, rules):
    model, inputs = build(name, dropout=False)
    converted = convert(model, rules, inputs)

    def grad_of(m):
        parameters = {n: p.detach() for n, p in m.named_parameters()}
        buffers = {n: b.clone() for n, b in m.named_buffers()}  # batch norms update them in place

        def loss(params, buffers):
            return loss_of(torch.func.functional_call(m, {**params, **buffers}, inputs))

        return tuple(torch.func.grad(loss)(parameters, buffers).values())

    assert_bit_identical(grad_of(converted), grad_of(model))


@pytest.mark.parametrize("rules", LOSSLESS)
@pytest.mark.parametrize("name", NAMES)
def test_an_exception_mid_forward_leaves_nothing_held_and_the_next_step_exact(name, rules):
    model, inputs = build(name)
    converted = convert(model, rules, inputs)
    last_leaf = list(leaves_by_kind(converted).values())[-1]
    victim = converted.get_submodule(last_leaf)

    def boom(module, args):
        raise RuntimeError("user error in the middle of the forward")

    handle = victim.register_forward_pre_hook(boom)
    with pytest.raises(RuntimeError, match="user error"):
        converted(*inputs)
    handle.remove()
    slots = {slot for m in converted.modules() for slot in wiring_of(m) if hasattr(slot, "tensor")}
    assert [slot.tensor for slot in slots] == [None] * len(slots)
    assert_bit_identical(gradients(converted, inputs), gradients(model, inputs))


# ------------------------------------------------------------- property-based


def _small_model(kind: str, features: int, channels: int) -> nn.Module:
    if kind == "mlp_norm":
        return nn.Sequential(nn.Linear(features, 2 * features), nn.LayerNorm(2 * features),
                             nn.Linear(2 * features, features), nn.GELU(), nn.Linear(features, 3))
    if kind == "mlp_relu":
        return nn.Sequential(nn.Linear(features, features), nn.ReLU(), nn.Dropout(0.3),
                             nn.Linear(features, 3))
    return nn.Sequential(nn.Conv2d(3, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(),
                         nn.Conv2d(channels, channels, 3), nn.MaxPool2d(2, ceil_mode=True), nn.ReLU(),
                         nn.Flatten(), nn.LazyLinear(3))


@settings(max_examples=25, deadline=None)
@given(
    kind=st.sampled_from(["mlp_norm", "mlp_relu", "conv"]),
    rules=st.sampled_from(LOSSLESS),
    batch=st.integers(1, 5),
    features=st.integers(1, 33),
    channels=st.integers(1, 6),
    side=st.integers(3, 11),
    scale=st.sampled_from([1e-6, 1.0, 1e4, 1e30]),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_any_shape_scale_and_dtype_gives_bit_identical_gradients(
    kind, rules, batch, features, channels, side, scale, dtype, seed
):
    torch.manual_seed(seed)
    model = _small_model(kind, features, channels)
    shape = (batch, features) if kind.startswith("mlp") else (batch, 3, side, side)
    x = (torch.randn(shape) * scale).to(dtype)
    model(x.float())  # materializes the lazy layer
    model = model.to(dtype).train()
    converted = aalconvert.convert(model, rules, example_inputs=(x,))
    assert_bit_identical(gradients(converted, (x,), seed), gradients(model, (x,), seed))


class _NormThenLayer(nn.Module):
    """LayerNorm -> Linear, optionally scaling the norm's output in place in between (after
    conversion too: a flag the trace did not see)."""

    def __init__(self, in_place_when_traced: bool):
        super().__init__()
        self.norm, self.layer = nn.LayerNorm(8), nn.Linear(8, 8)
        self.scale_in_place = in_place_when_traced

    def forward(self, x):
        h = self.norm(x)
        if self.scale_in_place:
            h.mul_(2.0)
        return x + self.layer(h)


def _in_place_model(in_place_when_traced: bool) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(_NormThenLayer(in_place_when_traced), _NormThenLayer(in_place_when_traced),
                         nn.Linear(8, 3)).train()


def test_an_in_place_op_on_a_chain_output_the_trace_sees_leaves_the_layer_plain():
    rules = "recompute"
    model, x = _in_place_model(True), torch.randn(4, 8)
    converted = convert(model, rules, (x,))
    assert not isinstance(converted[0].layer, RecomputedInputLinear)
    report = aalconvert.inspect(_in_place_model(True), (x,), rules=rules)
    reason = next(row.explanation for row in report.rows if row.name == "0.layer")
    assert "changed in place by mul_" in reason
    assert_bit_identical(torch.autograd.grad(loss_of(converted(x)), list(converted.parameters())),
                         torch.autograd.grad(loss_of(model(x)), list(model.parameters())))


@pytest.mark.parametrize("mutation", ["flag set after conversion", "hook after conversion", "hook before"])
def test_an_in_place_change_of_a_chain_output_at_run_time_keeps_bp_gradients(mutation):
    rules = "recompute"
    # The trace sees no in-place op here: the chain wiring must notice the version counter move.
    model, x = _in_place_model(False), torch.randn(4, 8)
    reference = _in_place_model(False)

    def double_in_place(module, args, output):
        output.mul_(2.0)

    if mutation == "hook before":
        for m in (model, reference):
            m[0].norm.register_forward_hook(double_in_place)
    converted = convert(model, rules, (x,))
    assert isinstance(converted[0].layer, RecomputedInputLinear)
    if mutation == "hook after conversion":
        for m in (converted, reference):
            m[0].norm.register_forward_hook(double_in_place)
    elif mutation == "flag set after conversion":
        for m in (converted, reference):
            m[0].scale_in_place = True
    assert_bit_identical(torch.autograd.grad(loss_of(converted(x)), list(converted.parameters())),
                         torch.autograd.grad(loss_of(reference(x)), list(reference.parameters())))

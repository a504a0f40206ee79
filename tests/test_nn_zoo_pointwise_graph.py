"""Zoo norms on a residual stream keeping only their input, with BP's graph (aalconvert.nn.zoo_pointwise_graph).

The reference is the Hugging Face pre-norm structure under torch autograd:
``x + proj(LlamaRMSNorm(x))`` as in ``LlamaDecoderLayer`` (and Gemma's
``GemmaRMSNorm``). The residual and the norm both read ``x``, so the order in
which autograd adds their gradients there matters in the last bit: the
one-node ``PointwiseVariant`` fails these comparisons in fp32 (checked below),
this variant must pass them bit for bit.
"""

import copy
import gc
import io
import weakref

import pytest
import torch
from torch import nn
from transformers import LlamaConfig
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.llama.modeling_llama import LlamaModel, LlamaRMSNorm

import aalconvert
from aalconvert.errors import ConversionError, SavedTensorModifiedError
from aalconvert.memory import measure_saved
from aalconvert.nn.zoo_pointwise import PointwiseVariant
from aalconvert.nn.zoo_pointwise_graph import GraphPointwiseVariant

NORMS = {"llama": LlamaRMSNorm, "gemma": GemmaRMSNorm}
WIDTH = 37  # odd on purpose


class PreNormBlock(nn.Module):
    """``x + proj(norm(x))``: the residual stream of LlamaDecoderLayer, reduced to one branch."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.norm, self.proj = norm, nn.Linear(WIDTH, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.proj(self.norm(x))


def block(name: str, dtype: torch.dtype, seed: int = 0) -> PreNormBlock:
    torch.manual_seed(seed)
    norm = NORMS[name](WIDTH)
    with torch.no_grad():
        norm.weight.add_(0.5 * torch.randn(WIDTH))
    return PreNormBlock(norm).to(dtype)


def converted(model: PreNormBlock, variant: type = GraphPointwiseVariant) -> PreNormBlock:
    model = copy.deepcopy(model)
    model.norm = variant.from_module(model.norm)
    return model


def grads(model: nn.Module, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, ...]:
    y = model(x * 1)  # x * 1: the residual stream is a non-leaf, as in a model
    return torch.autograd.grad(y, [x, *model.parameters()], g)


def assert_bit_identical(expected, actual) -> None:
    """Each gradient of ``actual`` equals ``expected``'s bit for bit, and there are as many."""
    for e, a in zip(expected, actual, strict=True):
        assert torch.equal(e, a)


def inputs(dtype: torch.dtype, seed: int = 0, shape: tuple[int, ...] = (3, 5, WIDTH)):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator).to(dtype).requires_grad_()
    return x, torch.randn(shape, generator=generator).to(dtype)


@pytest.mark.parametrize("shape", [(3, 5, WIDTH), (1, 1, WIDTH), (2, 1023, WIDTH)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", NORMS)
def test_gradients_on_a_residual_stream_are_bit_identical_to_bp(name, dtype, shape):
    model = block(name, dtype)
    x, g = inputs(dtype, shape=shape)
    for expected, actual in zip(grads(model, x, g), grads(converted(model), x, g), strict=True):
        assert torch.equal(expected, actual)
    assert torch.equal(model(x), converted(model)(x))


@pytest.mark.parametrize("name", NORMS)
def test_the_one_node_variant_differs_there_so_the_comparison_can_fail(name):
    """Why this variant exists: the same comparison catches PointwiseVariant's summation order."""
    model = block(name, torch.float32)
    x, g = inputs(torch.float32)
    pairs = zip(grads(model, x, g), grads(converted(model, PointwiseVariant), x, g), strict=True)
    assert not all(torch.equal(expected, actual) for expected, actual in pairs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", NORMS)
def test_keeps_only_its_input(name, dtype):
    norm = converted(block(name, dtype)).norm
    x, _ = inputs(dtype)
    x = x * 1
    kept = measure_saved(lambda: norm(x), norm.parameters())
    bp = measure_saved(lambda: NORMS[name].forward(norm, x), norm.parameters())
    assert kept.nbytes == x.numel() * x.element_size() < bp.nbytes


def test_hf_llama_converted_by_recompute_is_bit_identical_and_keeps_less():
    """A random-init two-layer LlamaModel: every decoder norm reads the residual stream."""
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                         num_hidden_layers=2, vocab_size=50)
    model = LlamaModel(config).train()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.add_(0.5 * torch.randn_like(parameter))
    ids = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(1))

    def step(m):
        saved = measure_saved(lambda: m(ids).last_hidden_state, m.parameters())
        return saved.nbytes, torch.autograd.grad(saved.output.square().sum(), list(m.parameters()))

    bp_bytes, expected = step(model)
    converted_model = aalconvert.convert(model, "recompute", example_inputs=(ids,), inplace=False)
    for layer in converted_model.layers:
        assert isinstance(layer.input_layernorm, GraphPointwiseVariant)
        assert isinstance(layer.post_attention_layernorm, GraphPointwiseVariant)
    kept_bytes, actual = step(converted_model)
    assert_bit_identical(expected, actual)
    assert kept_bytes < bp_bytes


def test_user_hooks_fire_once_and_a_changed_output_is_differentiated_as_returned():
    model = block("llama", torch.float32)
    calls = []

    def double(module, args, output):
        calls.append(1)
        return output * 2

    model.norm.register_forward_hook(double)
    x, g = inputs(torch.float32)
    expected = grads(model, x, g)
    conv = converted(model)  # hooks stay the module's own
    calls.clear()
    actual = grads(conv, x, g)
    assert calls == [1]  # not run again in backward
    assert_bit_identical(expected, actual)


def test_retain_graph_backward_twice_accumulates_as_bp():
    model, x_g = block("llama", torch.float32), inputs(torch.float32)
    x, g = x_g
    results = []
    for m in (model, converted(model)):
        m.zero_grad(set_to_none=True)
        y = m(x * 1)
        y.backward(g, retain_graph=True)
        y.backward(g)  # the rerun's saves are handed out again
        results.append([p.grad.clone() for p in m.parameters()])
    assert_bit_identical(*results)


def test_backward_frees_the_rerun_and_the_kept_input_without_garbage_collection():
    """The rerun's saves hold its graph, whose saves held the capture list: a C++ cycle, once."""
    model = converted(block("llama", torch.float32))
    x, g = inputs(torch.float32)
    gc.disable()
    try:
        before = len([o for o in gc.get_objects() if torch.is_tensor(o)])
        h = x * 1
        kept_input = weakref.ref(h)
        model(h).backward(g)
        del h
        assert kept_input() is None
        assert len([o for o in gc.get_objects() if torch.is_tensor(o)]) == before
    finally:
        gc.enable()


def test_double_backward_matches_bp():
    model = block("llama", torch.float64)
    x, g = inputs(torch.float64)

    def second_order(m):
        h = x * 1
        (grad_x,) = torch.autograd.grad(m(h), x, g, create_graph=True)
        return torch.autograd.grad(grad_x.square().sum(), [x, *m.parameters()], allow_unused=True)

    expected, actual = second_order(model), second_order(converted(model))
    assert [e is None for e in expected] == [a is None for a in actual]
    for e, a in zip(expected, actual, strict=True):
        if e is not None:
            torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


def test_input_modified_in_place_after_forward_raises_clearly():
    norm = converted(block("llama", torch.bfloat16)).norm  # bf16: no save of the input itself
    x, g = inputs(torch.bfloat16)
    h = x * 1
    y = norm(h)
    h.add_(1)
    with pytest.raises(ConversionError, match="modified in place"):
        y.backward(g)


def test_autocast_forward_gives_bp_gradients():
    model = block("llama", torch.float32)
    x, g = inputs(torch.float32)
    results = []
    for m in (model, converted(model)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = m(x * 1)
        results.append(torch.autograd.grad(y, [x, *m.parameters()], g.to(y.dtype)))
    assert_bit_identical(*results)


def test_checkpointed_block_is_bit_identical():
    model = block("llama", torch.float32)
    x, g = inputs(torch.float32)

    def checkpointed(m):
        y = torch.utils.checkpoint.checkpoint(m, x * 1, use_reentrant=False)
        return torch.autograd.grad(y, [x, *m.parameters()], g)

    assert_bit_identical(checkpointed(model), checkpointed(converted(model)))


def test_round_trips_through_pickle_and_to_module():
    norm = converted(block("llama", torch.float32)).norm
    buffer = io.BytesIO()
    torch.save(norm, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert type(loaded) is type(norm) and isinstance(loaded, LlamaRMSNorm)
    assert type(norm.to_module()) is LlamaRMSNorm
    assert norm.to_module().weight is norm.weight
    with pytest.raises(ConversionError, match="takes no options"):
        GraphPointwiseVariant.from_module(LlamaRMSNorm(4), bits=4)


def test_under_torch_compile_runs_the_plain_forward_with_bp_gradients():
    model = block("llama", torch.float32)
    x, g = inputs(torch.float32)
    results = []
    for m in (model, converted(model)):
        y = torch.compile(m)(x * 1)
        results.append(torch.autograd.grad(y, [x, *m.parameters()], g))
    assert_bit_identical(*results)


def test_a_norm_weight_stepped_between_forward_and_backward_raises_instead_of_rebuilding_with_it():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.proj = GemmaRMSNorm(16), nn.Linear(16, 16)  # saves 1 + weight: torch checks nothing

        def forward(self, x):
            return x + self.proj(self.norm(x))

    torch.manual_seed(0)
    model, x = nn.Sequential(Block(), Block()), torch.randn(2, 5, 16)
    converted = aalconvert.convert(model, "recompute", example_inputs=(x,))
    loss = converted(x).square().sum()
    with torch.no_grad():
        converted[0].norm.weight.add_(0.5)
    with pytest.raises(SavedTensorModifiedError, match="modified in place between forward and backward"):
        loss.backward()

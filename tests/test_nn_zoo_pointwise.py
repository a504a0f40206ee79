"""Zoo activations and norms keeping only their input (aalconvert.nn.zoo_pointwise).

References are the zoo modules themselves under torch autograd: the exact
variant must give BP's outputs and gradients bit for bit; the k-bit variant
must give BP's output and the gradients autograd computes at the decoded input.
"""

import copy
import io
import threading
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers.activations import GELUActivation, NewGELUActivation
from transformers.models.llama.modeling_llama import LlamaRMSNorm

import aalconvert
from aalconvert.errors import ConversionError
from aalconvert.kernels import dequantize, quantize, quantized_nbytes
from aalconvert.memory import measure_saved
from aalconvert.nn.approx import ApproxLayerNorm
from aalconvert.nn.zoo_pointwise import PointwiseVariant, bp_keeps_more_than_input
from aalconvert.nn.zoo_pointwise_graph import GraphPointwiseVariant


class ScaledTanhActivation(nn.Module):
    """A user's own activation: recognised by its name like a zoo one."""

    def forward(self, x):
        return 1.7 * torch.tanh(0.6 * x) + 0.01 * x


def rms_norm():
    norm = LlamaRMSNorm(33)
    with torch.no_grad():
        norm.weight.add_(0.5 * torch.randn(33))
    return norm


MAKERS = {"new_gelu": NewGELUActivation, "gelu": GELUActivation, "rms_norm": rms_norm,
          "user": ScaledTanhActivation}


def grads(module, x, g):
    inputs = [x, *module.parameters()]
    return torch.autograd.grad(module(x), inputs, g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", MAKERS)
def test_exact_variant_is_bit_identical_to_the_zoo_module_and_keeps_only_the_input(name, dtype):
    torch.manual_seed(0)
    module = MAKERS[name]().to(dtype)
    variant = PointwiseVariant.from_module(copy.deepcopy(module))
    assert isinstance(variant, type(module))
    x = torch.randn(4, 7, 33, dtype=dtype, requires_grad=True)
    g = torch.randn(4, 7, 33, dtype=dtype)
    assert torch.equal(variant(x), module(x))
    for expected, actual in zip(grads(module, x, g), grads(variant, x, g), strict=True):
        assert torch.equal(expected, actual)
    saved = measure_saved(lambda: variant(x), variant.parameters())
    assert saved.nbytes == x.numel() * x.element_size()


def test_exact_variant_recomputes_under_the_forwards_autocast_state():
    torch.manual_seed(0)
    module = rms_norm()
    variant = PointwiseVariant.from_module(copy.deepcopy(module))
    x = torch.randn(4, 33, requires_grad=True)
    g = torch.randn(4, 33)
    results = []
    for m in (module, variant):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = m(x)
        results.append((y, *torch.autograd.grad(y, [x, m.weight], g.to(y.dtype))))
    for expected, actual in zip(*results, strict=True):
        assert torch.equal(expected, actual)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("name", MAKERS)
def test_k_bit_variant_is_forward_exact_with_gradients_at_the_decoded_input(name, bits):
    torch.manual_seed(1)
    module = MAKERS[name]()
    variant = PointwiseVariant.from_module(copy.deepcopy(module), bits=bits, min_numel=0)
    x = torch.randn(4, 7, 33, requires_grad=True)
    g = torch.randn(4, 7, 33)
    assert torch.equal(variant(x), module(x))
    group_size = 256 if bits == 8 else 64
    x_tilde = dequantize(quantize(x.detach(), bits, group_size=group_size, companding="sqrt"))
    x_tilde.requires_grad_(True)
    expected = torch.autograd.grad(module(x_tilde), [x_tilde, *module.parameters()], g)
    for e, a in zip(expected, grads(variant, x, g), strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)
    saved = measure_saved(lambda: variant(x), variant.parameters())
    assert saved.nbytes == quantized_nbytes(x.numel(), bits, group_size)


def test_in_place_changes_after_forward_raise_instead_of_a_wrong_gradient():
    variant = PointwiseVariant.from_module(rms_norm())
    x = torch.randn(3, 33, requires_grad=True)
    y = variant(x * 1.0)
    with torch.no_grad():
        variant.weight.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


class PausingRMSNorm(LlamaRMSNorm):
    """A zoo norm whose next call in ``pause.thread`` waits until ``pause.resume`` is set."""

    def __init__(self, size):
        super().__init__(size)
        self.pause = SimpleNamespace(thread=None, paused=threading.Event(), resume=threading.Event())

    def forward(self, hidden_states):
        if self.pause.thread is threading.current_thread():
            self.pause.thread = None
            self.pause.paused.set()
            assert self.pause.resume.wait(30)
        return super().forward(hidden_states)


def test_another_threads_forward_during_the_backward_rerun_sees_the_modules_own_parameters():
    # Once, the rerun swapped the shared module's Parameters (torch.func.functional_call): a
    # forward in another thread meanwhile used the rerun's tensors and lost the weight's gradient.
    torch.manual_seed(0)
    module = PausingRMSNorm(33)
    with torch.no_grad():
        module.weight.add_(0.5 * torch.randn(33))
    variant = PointwiseVariant.from_module(module)
    inputs = [(torch.randn(4, 33, requires_grad=True), torch.randn(4, 33)) for _ in range(2)]
    expected = [grads(module, x, g) for x, g in inputs]
    results, errors = {}, []

    def first():  # pauses inside its backward's rerun of the forward
        try:
            y = variant(inputs[0][0])
            module.pause.thread = threading.current_thread()
            results[0] = torch.autograd.grad(y, [inputs[0][0], variant.weight], inputs[0][1])
        except BaseException as error:
            errors.append(error)
        finally:
            module.pause.paused.set()

    thread = threading.Thread(target=first)
    thread.start()
    try:
        assert module.pause.paused.wait(30) and thread.is_alive(), errors
        results[1] = grads(variant, *inputs[1])  # forward and backward while the rerun is paused
    finally:
        module.pause.resume.set()
        thread.join()
    assert not errors, errors
    for index in range(2):
        for e, a in zip(expected[index], results[index], strict=True):
            assert torch.equal(e, a)


def test_state_dict_pickling_and_to_module_keep_the_zoo_module():
    module = rms_norm()
    variant = PointwiseVariant.from_module(module, bits=4)
    assert variant.weight is module.weight
    assert list(variant.state_dict()) == list(module.state_dict())
    back = variant.to_module()
    assert type(back) is LlamaRMSNorm and back.weight is module.weight
    buffer = io.BytesIO()
    torch.save(variant, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert type(loaded) is type(variant) and loaded.pointwise_options == variant.pointwise_options
    x = torch.randn(2, 33)
    assert torch.equal(loaded(x), module(x))


@pytest.mark.parametrize("module, message", [
    (nn.GELU(), "torch module"),
    (ApproxLayerNorm.from_module(nn.LayerNorm(4)), "already converted"),  # named ...Norm, but a variant
    (PointwiseVariant.from_module(NewGELUActivation()), "already converted"),
    (nn.Sequential(), "torch module"),
    (type("ResidualActivation", (nn.Module,), {"forward": lambda self, x, y: x + y})(), "one input tensor"),
    (type("Gate", (nn.Module,), {"forward": lambda self, x: x})(), "neither a zoo activation"),
])
def test_modules_it_cannot_take_are_refused_with_the_reason(module, message):
    with pytest.raises(ConversionError, match=message):
        PointwiseVariant.from_module(module)
    counting = type("CountingNorm", (nn.Module,), {"forward": lambda self, x: x * self.seen.add_(1)})()
    counting.register_buffer("seen", torch.zeros(()))
    with pytest.raises(ConversionError, match="buffers"):
        PointwiseVariant.from_module(counting)
    nested = type("NestedActivation", (nn.Module,), {"forward": lambda self, x: self.inner(x)})()
    nested.inner = nn.Tanh()
    with pytest.raises(ConversionError, match="child modules"):
        PointwiseVariant.from_module(nested)


def test_probe_tells_which_modules_keep_more_than_their_input():
    assert bp_keeps_more_than_input(NewGELUActivation())  # several ops, each keeping a tensor
    assert bp_keeps_more_than_input(rms_norm())
    assert not bp_keeps_more_than_input(GELUActivation())  # one functional gelu keeps x only


def _tiny_gpt2():
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=100, n_layer=2, n_embd=32, n_head=2, n_positions=64,
                                     attn_implementation="eager", bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def test_recompute_on_hugging_face_gpt2_keeps_less_with_bp_gradients_bit_for_bit():
    model = _tiny_gpt2()
    ids = torch.randint(0, 100, (4, 16))
    converted = aalconvert.convert(model, "recompute", example_inputs=(ids,))
    assert type(converted.transformer.h[0].mlp.act).__name__ == "KeepInput[NewGELUActivation]"
    model.eval(), converted.eval()  # no dropout: the same function
    grads_bp = torch.autograd.grad(model(ids).logits.square().sum(), list(model.parameters()))
    grads_converted = torch.autograd.grad(converted(ids).logits.square().sum(), list(converted.parameters()))
    for expected, actual in zip(grads_bp, grads_converted, strict=True):
        assert torch.equal(expected, actual)
    model.train(), converted.train()
    kept = [measure_saved(lambda m=m: m(ids).logits, m.parameters()).nbytes for m in (model, converted)]
    assert kept[1] < 0.8 * kept[0]
    reverted = aalconvert.revert(converted)
    assert type(reverted.transformer.h[0].mlp.act) is NewGELUActivation


def test_approx_converts_zoo_activations_and_the_report_says_so():
    model = _tiny_gpt2()
    ids = torch.randint(0, 100, (4, 16))
    report = aalconvert.inspect(model, (ids,), "approx4")
    row = next(r for r in report.to_dict()["rows"] if r["name"] == "transformer.h.0.mlp.act")
    assert row["rule"] == "approx4" and "4-bit copy of its input" in row["explanation"]
    assert row["bytes_converted"] < row["bytes_bp"] / 4


def test_gpt2_with_zoo_variants_compiles_into_one_graph_with_eager_gradients():
    model = _tiny_gpt2().eval()
    ids = torch.randint(0, 100, (2, 16))
    converted = aalconvert.convert(model, ["recompute", "approx4"], example_inputs=(ids,))
    assert isinstance(converted.transformer.h[0].mlp.act, PointwiseVariant)
    eager = torch.autograd.grad(converted(ids).logits.square().sum(), list(converted.parameters()))
    compiled = torch.compile(converted, backend="aot_eager", fullgraph=True)
    graph = torch.autograd.grad(compiled(ids).logits.square().sum(), list(converted.parameters()))
    for e, c in zip(eager, graph, strict=True):
        torch.testing.assert_close(c, e)


@pytest.mark.parametrize("when", ["before", "after"])
def test_output_changing_hooks_on_a_zoo_activation_do_not_run_again_in_backward(when):
    # Once, backward recomputed the forward through module.__call__: the hook ran a second time
    # inside backward and scaled the gradient of the input and of every Parameter before it.
    model = _tiny_gpt2().eval()
    ids = torch.randint(0, 100, (2, 16))

    def double(module, args, output):
        return output * 2.0

    if when == "before":
        model.transformer.h[0].mlp.act.register_forward_hook(double)
    converted = aalconvert.convert(model, "recompute", example_inputs=(ids,))
    assert isinstance(converted.transformer.h[0].mlp.act, PointwiseVariant)
    if when == "after":
        for m in (model, converted):
            m.transformer.h[0].mlp.act.register_forward_hook(double)
    grads_bp = torch.autograd.grad(model(ids).logits.square().sum(), list(model.parameters()))
    grads_converted = torch.autograd.grad(converted(ids).logits.square().sum(), list(converted.parameters()))
    for expected, actual in zip(grads_bp, grads_converted, strict=True):
        assert torch.equal(expected, actual)


def _tiny_llama():
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2, attn_implementation="eager")
    return transformers.LlamaForCausalLM(config)


def test_recompute_on_llama_pre_norm_blocks_gives_bp_gradients_bit_for_bit():
    # A pre-norm RMSNorm's input is also the residual: recomputing the norm as one node summed the
    # gradient contributions at that input in another order than BP (last-bit differences). The
    # exact rule gives such norms the variant that keeps BP's graph (zoo_pointwise_graph).
    model = _tiny_llama().eval()
    ids = torch.randint(0, 100, (2, 16))
    converted = aalconvert.convert(model, "recompute", example_inputs=(ids,))
    assert isinstance(converted.model.layers[0].input_layernorm, GraphPointwiseVariant)
    grads_bp = torch.autograd.grad(model(ids).logits.square().sum(), list(model.parameters()))
    grads_converted = torch.autograd.grad(converted(ids).logits.square().sum(), list(converted.parameters()))
    for expected, actual in zip(grads_bp, grads_converted, strict=True):
        assert torch.equal(expected, actual)
    report = aalconvert.inspect(model, (ids,), "recompute")
    row = next(r for r in report.to_dict()["rows"] if r["name"] == "model.layers.0.input_layernorm")
    assert "autograd's graph as BP's" in row["explanation"]
    approx = aalconvert.convert(model, "approx4", example_inputs=(ids,))
    assert isinstance(approx.model.layers[0].input_layernorm, PointwiseVariant)

"""The approx rules' saved-tensor packer (aalconvert.nn.saved_pack, rules/saved_pack.py).

References are plain torch: BP of the unconverted model, and torch's own
backward fed with an activation decoded by the reference quantizer
(``aalconvert.kernels.quantize`` / ``dequantize``), computed here independently.
"""

import copy
import io
import threading
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import aalconvert
from aalconvert.kernels import dequantize, quantize
from aalconvert.memory import measure_saved
from aalconvert.nn.approx_common import ApproxOptions
from aalconvert.nn.saved_pack import PackedSave, SavedTensorPacker
from tests.threads import run_in_threads


def cosine(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    flat_a = torch.cat([t.flatten().double() for t in a])
    flat_b = torch.cat([t.flatten().double() for t in b])
    return float(F.cosine_similarity(flat_a, flat_b, dim=0))


def grads(model: nn.Module, *inputs: torch.Tensor) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    out = model(*inputs)
    out.square().mean().backward()
    return [p.grad.clone() for p in model.parameters()]


def kept(model: nn.Module, *inputs: torch.Tensor) -> int:
    return measure_saved(lambda: model(*inputs), model.parameters()).nbytes


class SDPABlock(nn.Module):
    """timm's ViT block as written: fused qkv, F.scaled_dot_product_attention, layer scale."""

    def __init__(self, dim: int = 64, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), 0.5))

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        return x + self.gamma * self.proj(o)


class MHABlock(nn.Module):
    """torchvision's ViT encoder block: nn.MultiheadAttention, then an MLP."""

    def __init__(self, dim: int = 64, heads: int = 4, batch_first: bool = True):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=batch_first)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        h = self.norm(x)
        x = x + self.attention(h, h, h, need_weights=False)[0]
        return x + self.mlp(x)


class Functional(nn.Module):
    """Only functional ops on its own Parameter: nothing a leaf swap can reach."""

    def __init__(self, dim: int = 64):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(dim, dim) / dim**0.5)

    def forward(self, x):
        h = x @ self.weight
        return F.gelu(h) * torch.sigmoid(h)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("make", [SDPABlock, MHABlock, lambda: MHABlock(batch_first=False)],
                         ids=["sdpa", "mha", "mha_seq_first"])
def test_attention_however_written_keeps_k_bit_copies_with_forward_exact(make, bits):
    torch.manual_seed(0)
    model = nn.Sequential(make(), make())
    x = torch.randn(4, 64, 64)
    converted = aalconvert.convert(model, f"approx{bits}", example_inputs=(x,))
    with torch.no_grad():
        assert torch.equal(converted(x), model(x))
    ratio = kept(converted, x) / kept(model, x)
    assert ratio < {8: 0.32, 4: 0.2}[bits]
    assert cosine(grads(converted, x), grads(model, x)) > 0.99


def test_inspect_predicts_what_the_packer_keeps_and_names_the_rule_on_each_row():
    torch.manual_seed(0)
    model = nn.Sequential(SDPABlock(), SDPABlock())
    x = torch.randn(4, 64, 64)
    report = aalconvert.inspect(model, (x,), "approx4")
    converted = aalconvert.convert(model, "approx4", example_inputs=(x,))
    assert report.totals.converted_bytes == kept(converted, x)
    rows = {row.name: row for row in report.rows}
    assert rows["0"].rule == "approx4" and "4-bit copies" in rows["0"].explanation
    assert rows["0"].bytes_converted < rows["0"].bytes_bp / 4


def _recorded_saves(forward, packer: SavedTensorPacker, keep_as_is=()):
    """Run ``forward`` with ``packer`` active inside a recording hook: what reached the outside."""
    seen: list = []

    def outer_pack(tensor):
        seen.append((tuple(tensor.shape), tensor.dtype))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(outer_pack, lambda t: t):
        packer.begin(keep_as_is)
        try:
            out = forward()
        finally:
            packer.end()
    return out, seen


def test_sdpa_keeps_q_k_v_output_k_bit_and_its_logsumexp_exact():
    packer = SavedTensorPacker(ApproxOptions(bits=4, min_numel=0))
    q, k, v = (torch.randn(2, 4, 32, 16, requires_grad=True) for _ in range(3))
    out, seen = _recorded_saves(lambda: F.scaled_dot_product_attention(q * 1, k * 1, v * 1), packer)
    codes = [s for s in seen if s[1] == torch.uint8]
    assert len(codes) == 4  # q, k, v and the output, 4-bit codes each
    assert all(shape == (2 * 4 * 32 * 16 // 2,) for shape, _ in codes)
    assert ((2, 4, 32), torch.float32) in seen  # the logsumexp, as it is


def test_parameters_their_views_inputs_buffers_and_non_differentiable_tensors_are_not_packed():
    packer = SavedTensorPacker(ApproxOptions(bits=4, min_numel=0))
    weight = nn.Parameter(torch.randn(16, 16))
    buffer = torch.randn(32, 16)
    x = torch.randn(32, 16, requires_grad=True)
    _, seen = _recorded_saves(lambda: (F.linear(x, weight) * buffer).sum(), packer,
                              keep_as_is=(weight, buffer, x))
    assert all(dtype == torch.float32 for _, dtype in seen)  # nothing was packed
    _, seen = _recorded_saves(lambda: (F.linear(x * 1, weight) * buffer).sum(), packer,
                              keep_as_is=(weight, buffer, x))
    assert sum(dtype == torch.uint8 for _, dtype in seen) == 1  # x * 1, an activation


def test_one_tensor_saved_by_several_ops_is_packed_once():
    packer = SavedTensorPacker(ApproxOptions(bits=4, min_numel=0))
    x = torch.randn(64, 64, requires_grad=True)
    _, seen = _recorded_saves(lambda: (lambda h: h * h + h.sin())(x * 1), packer)
    assert sum(dtype == torch.uint8 for _, dtype in seen) == 1  # mul saves h twice, sin once: one pack
    assert packer._state().cache == {}  # let go of at the end of the forward


def test_views_covering_one_storage_are_packed_once_and_each_comes_back_as_its_own_view():
    # torch.matmul of 4-D operands saves a 3-D view of them for bmm's backward, while
    # softmax saves the 4-D tensor itself (HF Swin's eager attention): one storage, one copy.
    torch.manual_seed(0)
    options = ApproxOptions(bits=4, min_numel=0)
    packer = SavedTensorPacker(options)
    scores = torch.randn(2, 3, 16, 16, requires_grad=True)
    values = torch.randn(2, 3, 16, 8, requires_grad=True)

    def attention():
        probs = torch.softmax(scores * 1, dim=-1)
        return probs @ (values * 1)

    out, seen = _recorded_saves(attention, packer)
    codes = [shape for shape, dtype in seen if dtype == torch.uint8]
    assert sorted(codes) == [(2 * 3 * 16 * 8 // 2,), (2 * 3 * 16 * 16 // 2,)]  # probs once, values once
    out.backward(torch.ones_like(out))

    def decoded(t):
        return dequantize(quantize(t, 4, group_size=options.group_size, companding=options.companding))

    probs = torch.softmax(scores.detach(), dim=-1)
    probs_d, values_d = decoded(probs), decoded(values.detach())
    grad_probs = torch.ones(2, 3, 16, 8) @ values_d.transpose(-1, -2)
    expected = torch._softmax_backward_data(grad_probs, probs_d, -1, torch.float32)
    torch.testing.assert_close(scores.grad, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(values.grad, probs_d.transpose(-1, -2) @ torch.ones(2, 3, 16, 8))


def test_a_storage_changed_in_place_between_two_saves_is_packed_again():
    packer = SavedTensorPacker(ApproxOptions(bits=4, min_numel=0))
    x = torch.randn(32, 32, requires_grad=True)

    def forward():
        h = x * 1
        first = h.sin()  # saves h
        h.view(-1).mul_(2)  # a view of the same storage, changed in place: a new version
        return first + h.view(32, 32).cos()  # saves the changed storage through another view

    _, seen = _recorded_saves(forward, packer)
    assert sum(dtype == torch.uint8 for _, dtype in seen) == 2


@pytest.mark.parametrize("layout", ["contiguous", "transposed", "channels_last", "slice"])
def test_unpacked_tensor_has_the_saved_shape_and_strides_and_the_decoded_values(layout):
    torch.manual_seed(0)
    base = torch.randn(4, 8, 6, 10)
    tensor = {
        "contiguous": base,
        "transposed": base.transpose(1, 3),
        "channels_last": base.contiguous(memory_format=torch.channels_last),
        "slice": base[:, 1:5],  # does not cover its memory densely: packed from a contiguous copy
    }[layout].requires_grad_()
    options = ApproxOptions(bits=4, min_numel=0)
    packer = SavedTensorPacker(options)
    packer.keep()  # a mode on the stack without pushing hooks, then made a packing one
    packer._state().modes[-1] = True
    restored = packer._pack(tensor).unpack()
    # the elements in the order they lie in memory, from the largest stride to the smallest
    order = range(4) if layout == "slice" else sorted(range(4), key=lambda d: -tensor.stride(d))
    in_memory_order = tensor.detach().permute(*order).reshape(-1)
    reference = dequantize(quantize(in_memory_order, 4, group_size=options.group_size,
                                    companding=options.companding))
    assert restored.shape == tensor.shape
    assert restored.stride() == (base[:, 1:5].contiguous().stride() if layout == "slice" else tensor.stride())
    assert torch.equal(restored.permute(*order).reshape(-1), reference)


def test_weight_gradient_is_torch_backward_at_the_decoded_saved_tensors():
    torch.manual_seed(0)
    model = Functional()
    x = torch.randn(256, 64)
    converted = aalconvert.convert(model, "approx4", example_inputs=(x,))
    converted.zero_grad()
    converted(x).sum().backward()
    options = ApproxOptions(bits=4)

    def decoded(t):
        return dequantize(quantize(t, 4, group_size=options.group_size, companding=options.companding))

    # forward exact: h = x @ W (x is the caller's input, never packed), out = gelu(h) * sigmoid(h);
    # gelu saves h, sigmoid its output s, mul gelu(h) and s (s once: the same tensor)
    h = x @ model.weight.detach()
    s, gelu_h = torch.sigmoid(h), F.gelu(h)
    h_d, s_d, gelu_d = decoded(h), decoded(s), decoded(gelu_h)
    probe = h_d.clone().requires_grad_()
    (through_gelu,) = torch.autograd.grad(F.gelu(probe), probe, s_d)
    g_h = through_gelu + gelu_d * s_d * (1 - s_d)
    torch.testing.assert_close(converted.weight.grad, x.t() @ g_h, rtol=1e-5, atol=1e-5)


def test_outer_hooks_see_the_packed_parts_save_on_cpu_and_checkpoint_still_give_the_gradients():
    torch.manual_seed(0)
    model = nn.Sequential(SDPABlock(), SDPABlock())
    x = torch.randn(4, 64, 64)
    converted = aalconvert.convert(model, "approx4", example_inputs=(x,))
    expected = grads(converted, x)
    with torch.autograd.graph.save_on_cpu():
        assert cosine(grads(converted, x), expected) > 0.999999
    checkpointed = lambda inp: torch.utils.checkpoint.checkpoint(converted, inp, use_reentrant=False)  # noqa: E731
    converted.zero_grad()
    checkpointed(x).square().mean().backward()
    assert cosine([p.grad for p in converted.parameters()], expected) > 0.999999


class Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = SDPABlock()

    def forward(self, x):
        return torch.utils.checkpoint.checkpoint(self.block, x, use_reentrant=False) + x


def test_checkpoint_inside_the_model_is_left_to_checkpoint():
    torch.manual_seed(0)
    model = nn.Sequential(Inner(), SDPABlock())
    x = torch.randn(2, 32, 64)
    converted = aalconvert.convert(model, "approx4", example_inputs=(x,))
    assert cosine(grads(converted, x), grads(model, x)) > 0.99


def test_variants_and_skipped_modules_keep_their_own_saves():
    torch.manual_seed(0)
    model = nn.Sequential(Functional(), Functional(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    x = torch.randn(128, 64)
    report = aalconvert.inspect(model, (x,), ["ara", "approx4"], skip=["1"])
    rows = {row.name: row for row in report.rows}
    assert rows["0"].bytes_converted < rows["0"].bytes_bp / 2  # all but the model's input, which it keeps
    assert rows["1"].bytes_converted == rows["1"].bytes_bp  # skip= holds inside the packer too
    converted = aalconvert.convert(model, ["ara", "approx4"], example_inputs=(x,), skip=["1"])
    assert kept(converted, x) == report.totals.converted_bytes


def test_direct_submodule_calls_and_no_grad_forwards_pack_nothing():
    torch.manual_seed(0)
    model = nn.Sequential(Functional(), Functional())
    x = torch.randn(128, 64)
    converted = aalconvert.convert(model, "approx4", example_inputs=(x,))
    assert kept(converted[0], x) == kept(model[0], x)
    with torch.no_grad():
        converted(x)
    assert torch._C._autograd._top_saved_tensors_default_hooks(False) is None


def test_an_exception_mid_forward_lets_go_of_the_hooks():
    class Failing(nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    torch.manual_seed(0)
    model = nn.Sequential(Functional(), Failing())
    x = torch.randn(128, 64)
    converted = aalconvert.convert(model[:1], "approx4", example_inputs=(x,))
    converted.append(Failing())
    with pytest.raises(RuntimeError, match="boom"):
        converted(x)
    assert torch._C._autograd._top_saved_tensors_default_hooks(False) is None
    converted = converted[:1]
    assert cosine(grads(converted, x), grads(model[:1], x)) > 0.99


def test_threads_sharing_a_model_each_pack_their_own_forward():
    torch.manual_seed(0)
    model = nn.Sequential(SDPABlock(), SDPABlock())
    converted = aalconvert.convert(model, "approx4", example_inputs=(torch.randn(2, 32, 64),))
    batches = [torch.randn(2, 32, 64) for _ in range(4)]

    def step(x):
        out = converted(x)
        return torch.autograd.grad(out.square().mean(), list(converted.parameters()))

    alone = [step(x) for x in batches]
    together = run_in_threads(step, batches, repeats=3)
    for one, other in zip(alone, together):
        for a, b in zip(one, other):
            assert torch.equal(a, b)


def test_second_order_gradients_follow_the_graph_at_the_decoded_values():
    torch.manual_seed(0)
    model = Functional()
    x = torch.randn(128, 64)
    converted = aalconvert.convert(model, "approx8", example_inputs=(x,))
    results = []
    for m in (model, converted):
        xx = x.clone().requires_grad_()
        (g,) = torch.autograd.grad(m(xx).square().sum(), xx, create_graph=True)
        results.append(torch.autograd.grad(g.square().sum(), m.weight))
    assert cosine(results[1], results[0]) > 0.99


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_other_dtypes_pack_when_the_quantizer_takes_them_and_pass_otherwise(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(SDPABlock(), SDPABlock()).to(dtype)
    x = torch.randn(4, 64, 64, dtype=dtype)
    converted = aalconvert.convert(model, "approx8", example_inputs=(x,))
    ratio = kept(converted, x) / kept(model, x)
    if dtype == torch.float64:
        assert ratio > 0.5  # float64 is kept exact, as every approx variant keeps it
    else:
        assert ratio < 0.6
    assert cosine(grads(converted, x), grads(model, x)) > 0.99


@pytest.mark.parametrize("scale", [1e-3, 1e30])  # fp16 steps: tinier groups lose precision (quantizer)
def test_huge_and_tiny_finite_activations_come_back_finite_and_close(scale):
    torch.manual_seed(0)
    tensor = (torch.randn(64, 64) * scale).requires_grad_()
    packer = SavedTensorPacker(ApproxOptions(bits=8, min_numel=0))
    packer.keep()
    packer._state().modes[-1] = True
    restored = packer._pack(tensor).unpack()
    assert torch.isfinite(restored).all()
    assert cosine([restored], [tensor.detach()]) > 0.99


def test_copies_of_a_converted_model_pack_on_their_own():
    torch.manual_seed(0)
    model = nn.Sequential(Functional(), Functional())
    x = torch.randn(128, 64)
    converted = aalconvert.convert(model, "approx4", example_inputs=(x,))
    expected = kept(converted, x)
    buffer = io.BytesIO()
    torch.save(converted, buffer)
    buffer.seek(0)
    for copied in (copy.deepcopy(converted), torch.load(buffer, weights_only=False)):
        assert kept(copied, x) == expected
        assert cosine(grads(copied, x), grads(model, x)) > 0.99


def test_revert_removes_the_hooks():
    torch.manual_seed(0)
    model = nn.Sequential(Functional(), Functional())
    x = torch.randn(128, 64)
    reverted = aalconvert.revert(aalconvert.convert(model, "approx4", example_inputs=(x,)))
    assert not reverted._forward_pre_hooks and not reverted._forward_hooks
    assert kept(reverted, x) == kept(model, x)


def test_under_torch_compile_the_packer_stands_aside_and_gradients_stay_right():
    torch.manual_seed(0)
    model = nn.Sequential(Functional(), Functional())
    x = torch.randn(128, 64)
    converted = aalconvert.convert(model, "approx4", example_inputs=(x,))
    compiled = torch.compile(converted, backend="aot_eager")
    converted.zero_grad()
    compiled(x).square().mean().backward()
    got = [p.grad.clone() for p in converted.parameters()]
    for a, b in zip(got, grads(model, x)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


class LossInside(nn.Module):
    """A language model that computes its loss in forward, as Hugging Face's do with labels=."""

    def __init__(self, vocab: int = 512, dim: int = 64):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.block = SDPABlock(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, ids, labels):
        logits = self.head(self.block(self.embed(ids)))
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten())


def test_a_loss_inside_the_model_keeps_its_log_probabilities_exact():
    torch.manual_seed(0)
    model = LossInside()
    ids = torch.randint(0, 512, (4, 64))
    converted = aalconvert.convert(model, "approx4", example_inputs=(ids, ids))
    packer = SavedTensorPacker(ApproxOptions(bits=4, min_numel=0))
    logits = (torch.randn(256, 512) * 10).requires_grad_()
    _, seen = _recorded_saves(lambda: F.cross_entropy(logits * 1, torch.randint(0, 512, (256,))), packer)
    assert ((256, 512), torch.float32) in seen and ((256 * 512 // 2,), torch.uint8) not in seen

    def step(m):
        m.zero_grad()
        m(ids, ids).backward()
        return [p.grad.clone() for p in m.parameters()]

    assert cosine(step(converted), step(model)) > 0.99


def test_masks_and_two_level_tensors_keep_one_bit_and_come_back_bit_identical():
    packer = SavedTensorPacker(ApproxOptions(bits=4, min_numel=0))
    x = torch.randn(64, 128, requires_grad=True)
    keep = torch.rand(64, 128) > 0.3
    scaled = keep.float() / 0.7  # dropout's mask as SDPA's CPU math path keeps it
    other = torch.rand(64, 128)  # no grad, many values: a statistic-like tensor stays exact
    _, seen = _recorded_saves(lambda: ((x * 1).masked_fill(keep, 0.0) * scaled * other).sum(), packer)
    bit_packs = [shape for shape, dtype in seen if dtype == torch.uint8 and shape == (64 * 128 // 8,)]
    assert len(bit_packs) == 2  # the bool mask and the scaled one
    assert ((64, 128), torch.float32) in seen  # other, as it is
    model_grads = []
    for active in (False, True):
        xx = x.detach().requires_grad_()
        run = lambda: ((xx * 1).masked_fill(keep, 0.0) * scaled * other).square().sum()  # noqa: E731
        if active:
            loss, _ = _recorded_saves(run, packer)
        else:
            loss = run()
        model_grads.append(torch.autograd.grad(loss, xx)[0])
    assert torch.equal(model_grads[0], model_grads[1])


class FunctionalDropoutAttention(nn.Module):
    """Hugging Face's eager attention: masked_fill with a computed causal mask, F.dropout on the probabilities."""

    def __init__(self, dim: int = 64, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        causal = torch.ones(n, n, dtype=torch.bool, device=x.device).triu(1).expand(b, self.heads, n, n)
        scores = (q @ k.transpose(-1, -2)).masked_fill(causal, float("-inf"))
        probs = F.dropout(scores.softmax(-1), p=0.2, training=self.training)
        return x + self.proj((probs @ v).transpose(1, 2).reshape(b, n, d))


def test_exact_packs_functional_masks_in_one_bit_with_bit_identical_gradients():
    torch.manual_seed(0)
    model = nn.Sequential(FunctionalDropoutAttention(), FunctionalDropoutAttention())
    x = torch.randn(4, 64, 64)
    converted = aalconvert.convert(model, "exact", example_inputs=(x,))
    bp_bytes, kept_bytes = kept(model, x), kept(converted, x)
    torch.manual_seed(5)
    expected = grads(model, x)
    torch.manual_seed(5)
    got = grads(converted, x)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    # each layer's dropout mask (4 x 4 x 64 x 64 bools) goes from one byte to one bit per element
    assert bp_bytes - kept_bytes >= 2 * (4 * 4 * 64 * 64) * 7 // 8
    # CPU dropout keeps a float 0-or-1/(1-p) mask: 1 bit once its values are seen; fake tensors
    # show none, so the estimate follows how the mask was made (bernoulli_, div_) and agrees
    report = aalconvert.inspect(model, (x,), "exact")
    assert report.totals.converted_bytes == kept_bytes


def test_a_functional_relu_keeps_one_bit_of_its_output_and_its_backward_stays_exact():
    packer = SavedTensorPacker(ApproxOptions(bits=4, min_numel=0))
    x = (torch.randn(64, 128) * 1e-3).requires_grad_()  # small positives: a k-bit copy would zero many
    w = torch.randn(128, 32, requires_grad=True)  # its gradient needs the ReLU's output values
    y, seen = _recorded_saves(lambda: torch.relu(x * 1) @ w, packer, keep_as_is=(w,))
    assert ((64 * 128 // 8,), torch.uint8) in seen  # the ReLU's mask
    assert ((64 * 128 // 2,), torch.uint8) in seen  # the product's k-bit copy of the same output
    (grad,) = torch.autograd.grad(y.sum(), x)
    (expected,) = torch.autograd.grad((torch.relu(x * 1) @ w).sum(), x)
    assert torch.equal(grad, expected)  # through w (kept as is) and the exact mask


def test_the_packer_hooks_no_mask_variant_so_fused_attention_cores_still_fuse():
    from examples import EXAMPLES
    from aalconvert.nn.lossless import MaskDropout

    model = EXAMPLES["transformer"].build_model().train()
    inputs = EXAMPLES["transformer"].example_inputs(batch_size=2)
    converted = aalconvert.convert(model, "recompute")
    converted(*inputs)  # the packer arms its pass-through hooks at the first forward
    dropouts = [m for m in converted.modules() if isinstance(m, MaskDropout)]
    assert dropouts and not any(m._forward_hooks or m._forward_pre_hooks for m in dropouts)
    assert kept(converted, *inputs) < 0.55 * kept(model, *inputs)  # 0.59 when the cores fell back


def test_a_tensor_read_once_and_found_many_valued_is_not_read_again_by_later_saves(monkeypatch):
    # Llama's rotary cos/sin: made once per forward, saved through a new view by every layer.
    import aalconvert.nn.saved_pack as saved_pack

    reads = []
    monkeypatch.setattr(saved_pack, "two_levels", lambda flat: reads.append(flat.shape) or None)
    packer = SavedTensorPacker(None)
    x = torch.randn(4, 128, 64, requires_grad=True)

    def forward():
        table = torch.rand(128, 64) + 0.5  # many values, no gradient
        h = x
        for _ in range(3):
            h = (h * table.unsqueeze(0)).tanh()
        other = table + 1.0  # another tensor is read on its own
        return (h * other.unsqueeze(0)).sum()

    torch.manual_seed(0)
    loss, _ = _recorded_saves(forward, packer)
    assert len(reads) == 2
    (got,) = torch.autograd.grad(loss, x)
    torch.manual_seed(0)
    (expected,) = torch.autograd.grad(forward(), x)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("change", ["weight stepped", "activation changed in place in the forward"])
def test_a_saved_tensor_changed_in_place_before_backward_raises_as_torch_does(change):
    # torch checks saved tensors' versions only without saved-tensor hooks; the packer's hooks
    # once let backward read the new values silently.
    class Gate(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.out = nn.Linear(16, 16), nn.Linear(16, 16)

        def forward(self, x):
            h = torch.sigmoid(self.fc(x))  # sigmoid saves its output
            if change.startswith("activation"):
                h.mul_(2.0)
            return self.out(h)

    torch.manual_seed(0)
    model, x = nn.Sequential(Gate(), Gate()), torch.randn(8, 16)
    for m in (model, aalconvert.convert(copy.deepcopy(model), "exact", example_inputs=(x,))):
        loss = m(x).square().sum()
        if change == "weight stepped":
            with torch.no_grad():
                m[0].out.weight.add_(0.5)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()


class SDPADropoutAttention(FunctionalDropoutAttention):
    """Hugging Face BERT's sdpa attention: F.scaled_dot_product_attention with dropout_p (on the CPU,
    torch's math path: softmax, a 0-or-1/(1-p) noise times the probabilities, then matmul)."""

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        o = F.scaled_dot_product_attention(q, k, v, dropout_p=0.2 if self.training else 0.0)
        return x + self.proj(o.transpose(1, 2).reshape(b, n, d))


DROPOUT_ATTENTIONS = [FunctionalDropoutAttention, SDPADropoutAttention]


@pytest.mark.parametrize("rules", ["exact", "auto"])
@pytest.mark.parametrize("make", DROPOUT_ATTENTIONS, ids=["functional", "sdpa"])
def test_dropped_probabilities_are_rebuilt_from_softmax_output_and_mask_with_bit_identical_gradients(make, rules):
    torch.manual_seed(0)
    model = nn.Sequential(make(), nn.LayerNorm(64), make())
    x = torch.randn(4, 64, 64)
    converted = aalconvert.convert(copy.deepcopy(model), rules, example_inputs=(x,))
    torch.manual_seed(5)
    bp_bytes = kept(model, x)
    torch.manual_seed(5)
    kept_bytes = kept(converted, x)
    probabilities = 4 * 4 * 64 * 64  # per layer
    # per layer: the dropped probabilities (fp32) and the float noise (fp32 -> 1 bit and its value)
    assert bp_bytes - kept_bytes >= 2 * (8 * probabilities - probabilities // 8 - 4)
    if rules == "exact":
        torch.manual_seed(5)
        expected = grads(model, x)
        torch.manual_seed(5)
        assert all(torch.equal(a, b) for a, b in zip(grads(converted, x), expected))
        assert aalconvert.inspect(model, (x,), rules).totals.converted_bytes == kept_bytes


@pytest.mark.parametrize("make", DROPOUT_ATTENTIONS, ids=["functional", "sdpa"])
def test_rebuilt_probabilities_follow_retained_and_second_order_graphs_bit_identically(make):
    torch.manual_seed(0)
    model = make()
    x = torch.randn(2, 32, 64)
    converted = aalconvert.convert(copy.deepcopy(model), "exact", example_inputs=(x,))
    results = []
    for m in (model, converted):
        torch.manual_seed(3)
        xx = x.clone().requires_grad_()
        loss = m(xx).square().sum()
        first = torch.autograd.grad(loss, xx, create_graph=True)[0]
        second = torch.autograd.grad(first.square().sum(), m.qkv.weight, retain_graph=True)[0]
        again = torch.autograd.grad(loss, xx)[0]  # the retained graph unpacks once more
        results.append((first.detach(), again, second))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_dropped_probabilities_changed_in_place_after_the_matmul_raise_as_torch_does():
    class Probe(FunctionalDropoutAttention):
        def forward(self, x):
            b, n, d = x.shape
            q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
            probs = F.dropout((q @ k.transpose(-1, -2)).softmax(-1), p=0.2, training=self.training)
            o = probs @ v
            probs.mul_(2.0)  # the matmul saved probs: torch's backward refuses
            return x + self.proj(o.transpose(1, 2).reshape(b, n, d))

    torch.manual_seed(0)
    model, x = Probe(), torch.randn(2, 32, 64)
    for m in (model, aalconvert.convert(copy.deepcopy(model), "exact", example_inputs=(x,))):
        loss = m(x).square().sum()
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()


def test_under_a_checkpoint_around_the_model_the_product_is_kept_and_gradients_stay_exact():
    # checkpoint's hooks outside the packer take one unpack per save: no entry is read twice
    torch.manual_seed(0)
    model, x = SDPADropoutAttention(), torch.randn(2, 32, 64)
    converted = aalconvert.convert(copy.deepcopy(model), "exact", example_inputs=(x,))
    got = []
    for m in (model, converted):
        m.zero_grad()
        torch.manual_seed(3)
        torch.utils.checkpoint.checkpoint(m, x, use_reentrant=False).square().sum().backward()
        got.append([p.grad.clone() for p in m.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*got))


def _same_gradients(model: nn.Module, rules: str, x: torch.Tensor, loss=lambda out: out.square().sum()) -> None:
    """The converted model's gradients are BP's, bit for bit (infinities' signs included)."""
    converted = aalconvert.convert(copy.deepcopy(model), rules, example_inputs=(x,))
    results = []
    for m in (model, converted):
        torch.manual_seed(1)
        results.append(torch.autograd.grad(loss(m(x)), list(m.parameters())))
    for a, b in zip(*results):
        assert torch.equal(a.nan_to_num(), b.nan_to_num())


def test_a_product_written_in_place_before_it_is_saved_is_kept_as_written():
    class Clamped(nn.Module):
        def __init__(self):
            super().__init__()
            self.qk, self.v = nn.Linear(16, 16), nn.Linear(16, 16)

        def forward(self, x):
            probs = F.dropout((self.qk(x) @ x.transpose(-1, -2)).softmax(-1), 0.2, self.training)
            with torch.no_grad():
                probs.clamp_(max=0.3)  # torch allows it: the multiply's backward needs only the noise
            return probs @ self.v(x)

    torch.manual_seed(0)
    _same_gradients(Clamped(), "exact", torch.randn(4, 64, 16))


def test_a_factor_holding_negative_zeros_keeps_their_sign():
    class Divided(nn.Module):
        def __init__(self):
            super().__init__()
            self.w, self.y = nn.Parameter(torch.randn(64, 64) / 8), nn.Parameter(torch.ones(4, 64, 64))

        def forward(self, x):
            a = torch.sigmoid(x @ self.w)
            b = ((torch.rand_like(a) > 0.5).float() - 1.0) * -2.0  # -0.0 and 2.0
            return self.y / (a * b)  # a gradient of -inf where the product is -0.0

    torch.manual_seed(0)
    _same_gradients(Divided(), "exact", torch.randn(4, 64, 64), loss=lambda out: out.sum())


def test_a_relus_one_bit_save_of_its_output_is_no_factor_of_a_rebuilt_product():
    # under approx a ReLU keeps only output > 0; its output times a dropout noise must not be
    # rebuilt from that mask
    class ReluDropout(nn.Module):
        def __init__(self):
            super().__init__()
            self.w1, self.w2 = nn.Parameter(torch.randn(64, 64) / 8), nn.Parameter(torch.randn(64, 64) / 8)

        def forward(self, x):
            return F.dropout(F.relu(x @ self.w1), 0.2, self.training) @ self.w2

    torch.manual_seed(0)
    model, x = ReluDropout(), torch.randn(4, 64, 64)
    converted = aalconvert.convert(copy.deepcopy(model), "approx8", example_inputs=(x,))
    got = []
    for m in (model, converted):
        torch.manual_seed(1)
        got.append(torch.autograd.grad(m(x).square().sum(), m.w2)[0])
    assert (got[0] - got[1]).norm() / got[0].norm() < 0.01  # 0.28 when rebuilt from the mask


def test_a_factor_made_by_autograd_in_another_thread_is_not_taken_for_one_of_the_forwards():
    # node numbers are per thread: the input's sigmoid and the forward's exp are both node 0
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(64, 64) / 8)

        def forward(self, a, y):
            e = torch.exp(self.w)
            return (a * (torch.rand_like(a) > 0.5).float()) @ self.w + y @ e

    def in_new_thread(fn):
        out = {}
        thread = threading.Thread(target=lambda: out.setdefault("result", fn()))
        thread.start()
        thread.join()
        return out["result"]

    torch.manual_seed(0)
    model, x, y = Model(), torch.randn(4, 64, 64), torch.randn(4, 64, 64) / 8
    converted = aalconvert.convert(copy.deepcopy(model), "exact", example_inputs=(torch.sigmoid(x), y))
    results = []
    for m in (model, converted):
        a = in_new_thread(lambda: torch.sigmoid(x.requires_grad_()))

        def step(m=m, a=a):
            torch.manual_seed(1)
            return torch.autograd.grad(m(a, y).square().sum(), m.w)[0]

        results.append(in_new_thread(step))
    assert torch.equal(*results)


def test_what_the_packer_files_for_rebuilds_does_not_hold_dropped_activations_alive():

    class Dropping(nn.Module):
        """A diagnostic computed with grad inside the forward, then dropped: its graph goes at once."""

        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(256, 256) / 16)

        def forward(self, x):
            self.storages = []
            for _ in range(4):
                h = torch.exp(x @ self.w)  # exp saves its output
                self.storages.append(weakref.ref(h.untyped_storage()))
                x = x + h.mean().detach()
                del h
            self.alive = sum(ref() is not None for ref in self.storages)
            return (x @ self.w).sum()

    torch.manual_seed(0)
    x = torch.randn(1024, 256) / 16
    converted = aalconvert.convert(Dropping(), "exact", example_inputs=(x,))
    converted(x).backward()
    assert converted.alive == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
@pytest.mark.parametrize("make", DROPOUT_ATTENTIONS, ids=["functional", "sdpa"])
def test_rebuilt_probabilities_are_bit_identical_in_other_dtypes_and_odd_shapes(make, dtype):
    torch.manual_seed(0)
    model = make(dim=48, heads=3).to(dtype)
    x = torch.randn(3, 37, 48, dtype=dtype)  # 3 x 3 x 37 x 37 probabilities: above min_numel, odd sizes
    converted = aalconvert.convert(copy.deepcopy(model), "exact", example_inputs=(x,))
    torch.manual_seed(5)
    bp_bytes = kept(model, x)
    torch.manual_seed(5)
    probabilities = 3 * 3 * 37 * 37
    # SDPA's math path computes bf16 attention in fp32; the noise goes to 1 bit, the product is not kept
    size = 4 if make is SDPADropoutAttention and dtype == torch.bfloat16 else x.element_size()
    assert bp_bytes - kept(converted, x) >= 2 * probabilities * size - probabilities // 8 - 16
    torch.manual_seed(5)
    expected = grads(model, x)
    torch.manual_seed(5)
    assert all(torch.equal(a, b) for a, b in zip(grads(converted, x), expected))

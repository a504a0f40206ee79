"""Chunked linear cross-entropy (nn/linear_cross_entropy.py) against torch's materialised loss head.

The reference is plain PyTorch: ``F.cross_entropy(softcap(F.linear(hidden, weight, bias).float()),
labels)``, i.e. what Hugging Face's ``ForCausalLMLoss`` computes on the logits. Every test runs
both on the same inputs and compares the loss and the gradients of hidden, weight and bias:
fp32 within 1e-6 (loss) and 1e-5 (gradients) relative, bf16/fp16 under autocast within the
dtype's rounding. Shapes are awkward on purpose: one token, a vocabulary that is not a multiple
of anything, token counts that leave a short last chunk, chunk_size=1.
"""

import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from aalconvert.errors import ConversionError, SavedTensorModifiedError
from aalconvert.nn.functional import linear_cross_entropy
from aalconvert.nn.linear_cross_entropy import CHUNK_LOGITS_BYTES, default_chunk_size
from spawn import run_ranks

# ------------------------------------------------------------------ the reference


def reference(hidden, weight, labels, bias=None, ignore_index=-100, reduction="mean",
              label_smoothing=0.0, softcap=None, divisor=None):
    """The materialised loss head, as Hugging Face computes it."""
    logits = F.linear(hidden, weight, bias)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # .float(), fp64 left as it is
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    flat = logits.reshape(-1, weight.shape[0])
    loss = F.cross_entropy(flat, labels.reshape(-1), ignore_index=ignore_index,
                           reduction="sum" if divisor is not None else reduction,
                           label_smoothing=label_smoothing)
    if divisor is not None:
        return loss / divisor
    return loss.reshape(labels.shape) if reduction == "none" else loss


def make_inputs(tokens, hidden_size, vocab, bias=True, dtype=torch.float32, ignore_every=0, seed=0):
    """hidden (*tokens, H), weight (V, H), bias (V,) leaves requiring grad; labels with ignored rows."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*tokens, hidden_size, generator=generator, dtype=dtype).requires_grad_()
    weight = (torch.randn(vocab, hidden_size, generator=generator, dtype=dtype) / hidden_size**0.5).requires_grad_()
    bias_ = torch.randn(vocab, generator=generator, dtype=dtype).requires_grad_() if bias else None
    labels = torch.randint(0, vocab, tokens, generator=generator)
    if ignore_every:
        labels.view(-1)[::ignore_every] = -100
    return hidden, weight, bias_, labels


def upstream(loss, seed=1):
    """A non-trivial upstream gradient: a scalar != 1, or one value per token for reduction='none'."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(loss.shape, generator=generator, dtype=loss.dtype) if loss.dim() else torch.tensor(0.7)


def grads(loss, tensors, grad_output):
    """Gradients of loss with respect to the tensors that require grad (None for the others)."""
    wanted = [t for t in tensors if t is not None and t.requires_grad]
    found = iter(torch.autograd.grad(loss, wanted, grad_output))
    return [next(found) if t is not None and t.requires_grad else None for t in tensors]


def assert_matches(hidden, weight, bias, labels, rtol_loss=1e-6, rtol_grad=1e-5, **options):
    """Loss and gradients of linear_cross_entropy equal the reference's within the tolerances.

    Both schemes (gradients formed in backward, and in forward) for a summed loss, unless
    ``gradients_in_forward`` names one.
    """
    chunk_size = options.pop("chunk_size", None)
    schemes = [options.pop("gradients_in_forward")] if "gradients_in_forward" in options else \
        [False, True] if options.get("reduction", "mean") != "none" else [False]
    expected = reference(hidden, weight, labels, bias, **options)
    grad_output = upstream(expected)
    inputs = (hidden, weight, bias)
    wanted = grads(expected, inputs, grad_output)
    for in_forward in schemes:
        actual = linear_cross_entropy(hidden, weight, labels, bias, chunk_size=chunk_size,
                                      gradients_in_forward=in_forward, **options)
        assert actual.dtype == expected.dtype and actual.shape == expected.shape
        torch.testing.assert_close(actual, expected, rtol=rtol_loss, atol=1e-6, equal_nan=True)
        for got, want in zip(grads(actual, inputs, grad_output), wanted):
            if want is None:
                assert got is None
                continue
            assert got.dtype == want.dtype
            scale = want.abs().amax().item() if want.numel() else 0.0
            torch.testing.assert_close(got, want, rtol=rtol_grad, atol=1e-6 * (1 + scale))


# ------------------------------------------------------------------ fp32 exactness over awkward shapes

SHAPES = [  # (token shape, hidden size, vocabulary, chunk_size)
    ((1,), 8, 33, None),          # one token
    ((1,), 8, 33, 1),
    ((17,), 12, 33, 4),           # 17 tokens: a short last chunk; vocabulary 33
    ((17,), 12, 33, 1),           # chunk_size 1
    ((16,), 8, 40, 16),           # exactly one chunk
    ((5,), 8, 31, 100),           # chunk larger than the token count
    ((2, 7), 12, 37, 3),          # 3-D hidden
    ((3, 1, 5), 4, 29, 4),        # 4-D hidden
]


SCHEMES = [  # (reduction, gradients_in_forward): both schemes for the summed losses
    ("mean", False), ("mean", True), ("sum", False), ("sum", True), ("none", False)]


@pytest.mark.parametrize("reduction,in_forward", SCHEMES)
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("tokens,hidden_size,vocab,chunk_size", SHAPES)
def test_loss_and_gradients_match_torch_in_fp32(tokens, hidden_size, vocab, chunk_size, with_bias, reduction,
                                                in_forward):
    hidden, weight, bias, labels = make_inputs(tokens, hidden_size, vocab, bias=with_bias, ignore_every=4)
    assert_matches(hidden, weight, bias, labels, reduction=reduction, chunk_size=chunk_size,
                   gradients_in_forward=in_forward)


@pytest.mark.parametrize("reduction,in_forward", SCHEMES)
@pytest.mark.parametrize("label_smoothing,softcap", [(0.1, None), (1.0, None), (0.0, 2.5), (0.2, 30.0)])
def test_label_smoothing_and_softcap_match_torch(label_smoothing, softcap, reduction, in_forward):
    hidden, weight, bias, labels = make_inputs((3, 5), 12, 37, ignore_every=3)
    hidden.data *= 3  # large logits, so the softcap bends them
    assert_matches(hidden, weight, bias, labels, reduction=reduction, label_smoothing=label_smoothing,
                   softcap=softcap, chunk_size=4, gradients_in_forward=in_forward)


def test_ignore_index_rows_contribute_nothing():
    """A custom ignore_index (a real class id): those rows get no loss and no gradient."""
    hidden, weight, bias, labels = make_inputs((23,), 8, 19)
    labels[::2] = 5
    assert_matches(hidden, weight, bias, labels, ignore_index=5, chunk_size=5)
    losses = linear_cross_entropy(hidden, weight, labels, bias, ignore_index=5, reduction="none")
    assert torch.equal(losses[labels == 5], torch.zeros(int((labels == 5).sum())))
    (grad_hidden,) = torch.autograd.grad(losses, hidden, torch.randn(23))
    assert torch.equal(grad_hidden[labels == 5], torch.zeros_like(grad_hidden[labels == 5]))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_all_labels_ignored_gives_what_torch_gives(reduction, label_smoothing):
    """mean: nan (0 / 0), sum: 0, none: zeros; every gradient zero."""
    hidden, weight, bias, labels = make_inputs((2, 3), 8, 11)
    labels.fill_(-100)
    assert_matches(hidden, weight, bias, labels, reduction=reduction, label_smoothing=label_smoothing,
                   chunk_size=2)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_no_tokens_gives_what_torch_gives(reduction):
    hidden, weight, bias, labels = make_inputs((0,), 8, 11)
    assert_matches(hidden, weight, bias, labels, reduction=reduction)


@pytest.mark.parametrize("divisor", [7, 7.5, torch.tensor(9), torch.tensor([11.0])])
def test_divisor_is_hugging_faces_num_items_in_batch(divisor):
    """reduction='mean' with divisor: sum / divisor, as ForCausalLMLoss does with num_items_in_batch."""
    hidden, weight, bias, labels = make_inputs((2, 9), 8, 21, ignore_every=5)
    assert_matches(hidden, weight, bias, labels, divisor=divisor, chunk_size=4)


def test_int32_labels_are_accepted_like_long():
    hidden, weight, bias, labels = make_inputs((9,), 8, 21, ignore_every=4)
    expected = reference(hidden, weight, labels, bias)
    torch.testing.assert_close(linear_cross_entropy(hidden, weight, labels.int(), bias), expected,
                               rtol=1e-6, atol=1e-6)


def test_flat_labels_are_accepted_for_3d_hidden():
    hidden, weight, bias, labels = make_inputs((2, 5), 8, 21, ignore_every=4)
    expected = reference(hidden, weight, labels, bias, reduction="none")
    actual = linear_cross_entropy(hidden, weight, labels.reshape(-1), bias, reduction="none")
    torch.testing.assert_close(actual, expected.reshape(-1), rtol=1e-6, atol=1e-6)


def test_non_contiguous_hidden_and_labels_work():
    """hidden[:, :-1] and labels[:, 1:], the causal-LM shift done by slicing."""
    hidden, weight, bias, labels = make_inputs((3, 8), 12, 29, ignore_every=5)
    assert_matches(hidden[:, :-1], weight, bias, labels[:, 1:], chunk_size=4)
    assert_matches(hidden.transpose(0, 1), weight, bias, labels.t(), reduction="none", chunk_size=5)


def test_float64_inputs_are_computed_in_float64():
    hidden, weight, bias, labels = make_inputs((7,), 8, 21, dtype=torch.float64, ignore_every=3)
    assert_matches(hidden, weight, bias, labels, rtol_loss=1e-12, rtol_grad=1e-10, chunk_size=3)


# ------------------------------------------------------------------ lower precision

# (dtype, loss rtol, gradient rtol): bf16 2**-8 and fp16 2**-11 are one unit of the dtype's rounding.
LOW_PRECISION = [(torch.bfloat16, 2**-8, 2 * 2**-8), (torch.float16, 2**-11, 2 * 2**-11)]


def max_relative_error(actual, truth):
    return ((actual.double() - truth.double()).abs().amax() / truth.double().abs().amax()).item()


@pytest.mark.parametrize("softcap", [None, 20.0])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dtype,rtol_loss,rtol_grad", LOW_PRECISION)
def test_autocast_matches_torch_within_dtype_rounding(dtype, rtol_loss, rtol_grad, reduction, softcap):
    """fp32 parameters under CPU autocast: loss and gradients fp32, within rounding of torch's.

    Also no less accurate than torch: both are compared with the float64 loss head, and our error
    is at most twice torch's (measured: within 0.7x-1.3x; the weight gradient differs from torch's
    because ours adds the chunks' products in fp32 where torch rounds one product).
    """
    hidden, weight, bias, labels = make_inputs((3, 11), 64, 97, ignore_every=5)
    with torch.autocast("cpu", dtype=dtype):
        expected = reference(hidden, weight, labels, bias, reduction=reduction, softcap=softcap)
        actual = linear_cross_entropy(hidden, weight, labels, bias, reduction=reduction, softcap=softcap,
                                      chunk_size=7)
    truth = reference(hidden.double(), weight.double(), labels, bias.double(), reduction=reduction,
                      softcap=softcap)
    assert actual.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(actual, expected, rtol=rtol_loss, atol=rtol_loss)
    grad_output = upstream(expected)
    inputs = (hidden, weight, bias)
    true_grads = torch.autograd.grad(truth, inputs, grad_output.double())
    for got, want, true in zip(grads(actual, inputs, grad_output), grads(expected, inputs, grad_output), true_grads):
        assert got.dtype == want.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=rtol_grad, atol=rtol_grad * want.abs().amax().item())
        assert max_relative_error(got, true) <= 2 * max_relative_error(want, true) + rtol_grad / 8


@pytest.mark.parametrize("dtype,rtol_loss,rtol_grad", LOW_PRECISION)
def test_low_precision_inputs_without_autocast_get_gradients_in_their_dtype(dtype, rtol_loss, rtol_grad):
    """A bf16/fp16 model without autocast: logits in that dtype, upcast for the loss (as HF does)."""
    hidden, weight, bias, labels = make_inputs((13,), 32, 41, dtype=dtype, ignore_every=4)
    expected = reference(hidden, weight, labels, bias)
    actual = linear_cross_entropy(hidden, weight, labels, bias, chunk_size=4)
    assert actual.dtype == torch.float32
    torch.testing.assert_close(actual, expected, rtol=rtol_loss, atol=rtol_loss)
    inputs = (hidden, weight, bias)
    for got, want in zip(grads(actual, inputs, torch.tensor(1.0)), grads(expected, inputs, torch.tensor(1.0))):
        assert got.dtype == want.dtype == dtype
        torch.testing.assert_close(got, want, rtol=rtol_grad, atol=rtol_grad * want.abs().max().item())


# ------------------------------------------------------------------ what is differentiated, what is kept


def test_frozen_weight_gets_no_gradient_and_hidden_gets_torchs():
    hidden, weight, bias, labels = make_inputs((11,), 8, 23, ignore_every=3)
    weight.requires_grad_(False)
    bias.requires_grad_(False)
    assert_matches(hidden, weight, bias, labels, chunk_size=4)
    linear_cross_entropy(hidden, weight, labels, bias).backward()
    assert weight.grad is None and bias.grad is None and hidden.grad is not None


def test_hidden_without_grad_gives_weight_and_bias_gradients():
    hidden, weight, bias, labels = make_inputs((11,), 8, 23, ignore_every=3)
    hidden.requires_grad_(False)
    assert_matches(hidden, weight, bias, labels, chunk_size=4)


def test_no_grad_gives_the_same_loss():
    hidden, weight, bias, labels = make_inputs((11,), 8, 23, ignore_every=3)
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, labels, bias)
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, reference(hidden, weight, labels, bias).detach(), rtol=1e-6, atol=1e-6)


def saved_shapes(function) -> list[tuple[torch.Tensor, tuple[int, ...]]]:
    """Every tensor autograd saves while function() runs, with its shape."""
    saved = []

    def pack(tensor):
        saved.append((tensor, tuple(tensor.shape)))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        function()
    return saved


def test_backward_scheme_keeps_nothing_with_a_vocabulary_dimension_but_weight_and_bias():
    """Logits formed again in backward: kept are the inputs and per-token scalars, never an N x V tensor."""
    tokens, vocab = (3, 7), 53
    hidden, weight, bias, labels = make_inputs(tokens, 16, vocab, ignore_every=4)
    # The check can see what plain torch keeps: its log-softmax has a vocabulary dimension.
    plain = saved_shapes(lambda: reference(hidden, weight, labels, bias))
    assert any(vocab in shape and tensor is not weight and tensor is not bias for tensor, shape in plain)
    for softcap, smoothing in [(None, 0.0), (5.0, 0.1)]:
        ours = saved_shapes(lambda: linear_cross_entropy(hidden, weight, labels, bias, softcap=softcap,
                                                        label_smoothing=smoothing, chunk_size=4))
        assert ours
        with_vocab = [shape for tensor, shape in ours if vocab in shape
                      and not (tensor.data_ptr() in (weight.data_ptr(), bias.data_ptr()))]
        assert with_vocab == [], f"saved for backward with a vocabulary dimension: {with_vocab}"
        kept = sum(t.numel() * t.element_size() for t, _ in ours
                   if t.data_ptr() not in (weight.data_ptr(), bias.data_ptr(), hidden.data_ptr()))
        assert kept <= 21 * (8 + 4) + 64  # labels (int64) and a log-sum-exp (fp32) per token, plus scalars


@pytest.mark.parametrize("frozen", ["nothing", "weight and bias", "hidden"])
def test_forward_scheme_keeps_exactly_the_gradients_that_are_needed(frozen):
    """Gradients made in forward: kept is one tensor per input needing a gradient, in its shape and dtype."""
    hidden, weight, bias, labels = make_inputs((3, 7), 16, 53, ignore_every=4)
    if frozen == "weight and bias":
        weight.requires_grad_(False), bias.requires_grad_(False)
    if frozen == "hidden":
        hidden.requires_grad_(False)
    ours = saved_shapes(lambda: linear_cross_entropy(hidden, weight, labels, bias, softcap=5.0, chunk_size=4,
                                                    gradients_in_forward=True))
    needing = [t for t in (hidden.reshape(-1, 16), weight, bias) if t.requires_grad]
    assert sorted(shape for _, shape in ours) == sorted(tuple(t.shape) for t in needing)
    assert all(t.dtype == torch.float32 and t.data_ptr() not in (hidden.data_ptr(), weight.data_ptr(),
                                                                bias.data_ptr()) for t, _ in ours)


def test_input_modified_in_place_before_backward_raises_clearly():
    hidden, weight, bias, labels = make_inputs((5,), 8, 13)
    states = hidden * 1.0
    loss = linear_cross_entropy(states, weight, labels, bias)
    states.add_(1.0)
    with pytest.raises(SavedTensorModifiedError, match="modified in place"):
        loss.backward()


def test_forward_scheme_gives_the_gradients_of_the_values_the_loss_was_computed_from():
    """Changing an input after the loss changes nothing: its gradients were made from the forward's values."""
    hidden, weight, bias, labels = make_inputs((5,), 8, 13)
    expected = grads(reference(hidden, weight, labels, bias), (hidden, weight, bias), torch.tensor(1.0))
    states = hidden * 1.0
    loss = linear_cross_entropy(states, weight, labels, bias, gradients_in_forward=True)
    states.add_(1.0)
    with torch.no_grad():
        weight.add_(0.5)  # as an optimizer step before backward would
    loss.backward()
    with torch.no_grad():
        weight.sub_(0.5)
    for got, want in zip((hidden.grad, weight.grad, bias.grad), expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("in_forward", [True, False])
def test_gradient_accumulation_sums_like_torch(in_forward):
    """Two micro-batches, each with its own backward, then two losses summed under one backward."""
    first, second = make_inputs((6,), 8, 19, seed=1), make_inputs((6,), 8, 19, seed=2)
    weight, bias = first[1], first[2]
    reference_grads = [torch.zeros_like(t) for t in (weight, bias)]
    for hidden, _, _, labels in (first, second):
        for total, got in zip(reference_grads, grads(reference(hidden, weight, labels, bias) / 2, (weight, bias),
                                                     torch.tensor(1.0))):
            total += got
    for hidden, _, _, labels in (first, second):
        (linear_cross_entropy(hidden, weight, labels, bias, gradients_in_forward=in_forward) / 2).backward()
    for got, want in zip((weight.grad, bias.grad), reference_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    weight.grad = bias.grad = None
    losses = [linear_cross_entropy(h, weight, y, bias, gradients_in_forward=in_forward) / 2
              for h, _, _, y in (first, second)]
    sum(losses).backward()
    for got, want in zip((weight.grad, bias.grad), reference_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_forward_scheme_refuses_a_second_backward_through_the_same_loss():
    hidden, weight, bias, labels = make_inputs((5,), 8, 13)
    loss = linear_cross_entropy(hidden, weight, labels, bias, gradients_in_forward=True)
    loss.backward(retain_graph=True)
    first = [t.grad.clone() for t in (hidden, weight, bias)]
    with pytest.raises(RuntimeError, match="second backward through the same loss.*loss_head_gradients='backward'"):
        loss.backward()
    for tensor, want in zip((hidden, weight, bias), first):  # the first backward's gradients are left as they were
        torch.testing.assert_close(tensor.grad, want, rtol=0, atol=0)
    for got, want in zip(first, grads(reference(hidden, weight, labels, bias), (hidden, weight, bias),
                                      torch.tensor(1.0))):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    again = linear_cross_entropy(hidden, weight, labels, bias)
    again.backward(retain_graph=True)
    again.backward()  # the backward scheme forms its gradients again each time


@pytest.mark.parametrize("in_forward", [True, False])
def test_second_order_gradient_is_refused(in_forward):
    hidden, weight, bias, labels = make_inputs((5,), 8, 13)
    loss = linear_cross_entropy(hidden, weight, labels, bias, gradients_in_forward=in_forward)
    (grad_hidden,) = torch.autograd.grad(loss, hidden, create_graph=True)
    torch.testing.assert_close(grad_hidden, torch.autograd.grad(reference(hidden, weight, labels, bias), hidden)[0],
                               rtol=1e-5, atol=1e-6)
    assert grad_hidden.requires_grad  # linked to an error, not silently a constant
    with pytest.raises(RuntimeError, match="second-order"):
        grad_hidden.sum().backward()


def test_default_chunk_size_keeps_one_chunks_fp32_logits_within_budget():
    for vocab in (1, 50, 32000, 151936, 262144, CHUNK_LOGITS_BYTES):
        chunk = default_chunk_size(vocab)
        assert chunk >= 1
        assert chunk * vocab * 4 <= CHUNK_LOGITS_BYTES or chunk == 1
        assert (chunk + 1) * vocab * 4 > CHUNK_LOGITS_BYTES
    assert default_chunk_size(32000) == 524


def peak_bytes(function) -> int:
    """Peak of CPU bytes allocated while function() runs, from the profiler's allocation events."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        function()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()  # negative for a free
        peak = max(peak, live)
    return peak


def test_peak_memory_is_a_few_chunks_not_the_logits():
    """Forward + backward: torch's peak holds N x V logits several times; ours a few chunks."""
    tokens, width, vocab, chunk = 512, 32, 2048, 32
    hidden, weight, bias, labels = make_inputs((tokens,), width, vocab)
    logits_bytes = tokens * vocab * 4
    grads_bytes = (hidden.numel() + weight.numel() + bias.numel()) * 4

    def step(fn):
        return lambda: fn().backward()

    plain = peak_bytes(step(lambda: reference(hidden, weight, labels, bias)))
    ours = peak_bytes(step(lambda: linear_cross_entropy(hidden, weight, labels, bias, chunk_size=chunk)))
    assert plain > grads_bytes + 2 * logits_bytes  # measured: logits, log-softmax and its gradient at once
    assert ours < grads_bytes + 3 * chunk * vocab * 4 + 64 * tokens  # measured: about one chunk


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize("change,message", [
    (dict(labels=torch.zeros(4, dtype=torch.long)), "labels have shape"),
    (dict(labels=torch.zeros(2, 4, dtype=torch.long)), "labels have shape"),
    (dict(labels=torch.zeros(2, 3)), "integer class indices"),
    (dict(labels=torch.zeros(2, 3, dtype=torch.bool)), "integer class indices"),
    (dict(bias=torch.zeros(12)), r"vocabulary of 11; bias must have shape \(11,\)"),
    (dict(hidden=torch.zeros(2, 3, 5)), "last dimension of 8"),
    (dict(weight=torch.zeros(11, 8, 1)), "weight must be 2-D"),
    (dict(reduction="avg"), "reduction='avg' is not one of"),
    (dict(chunk_size=0), "chunk_size=0 must be an int >= 1"),
    (dict(chunk_size=2.5), "chunk_size=2.5 must be an int >= 1"),
    (dict(label_smoothing=1.5), "label_smoothing=1.5 must be in"),
    (dict(softcap=0.0), "softcap=0.0 must be a positive number"),
    (dict(divisor=4, reduction="sum"), "divisor replaces the token count"),
    (dict(divisor=torch.ones(2)), "one-element tensor"),
    (dict(hidden=torch.zeros(2, 3, 8, dtype=torch.float64)), "cast them to one dtype"),
    (dict(gradients_in_forward=True, reduction="none"), "needs a loss summed over tokens"),
    (dict(gradients_in_forward="yes"), "must be True or False"),
])
def test_bad_arguments_raise_before_any_work(change, message):
    arguments = dict(hidden=torch.zeros(2, 3, 8), weight=torch.zeros(11, 8),
                     labels=torch.zeros(2, 3, dtype=torch.long), bias=torch.zeros(11))
    arguments.update(change)
    with pytest.raises(ConversionError, match=message):
        linear_cross_entropy(**arguments)
    assert issubclass(ConversionError, ValueError)


def test_label_outside_the_vocabulary_raises_like_torch():
    hidden, weight, bias, labels = make_inputs((5,), 8, 13)
    labels[2] = 13
    with pytest.raises((IndexError, RuntimeError)):
        reference(hidden, weight, labels, bias)
    with pytest.raises((IndexError, RuntimeError)):
        linear_cross_entropy(hidden, weight, labels, bias)


# ------------------------------------------------------------------ shapes at random


@settings(max_examples=30, deadline=None)
@given(tokens=st.lists(st.integers(1, 6), min_size=1, max_size=3), hidden_size=st.integers(1, 9),
       vocab=st.integers(1, 40), chunk_size=st.one_of(st.none(), st.integers(1, 50)),
       with_bias=st.booleans(), reduction=st.sampled_from(["mean", "sum", "none"]),
       label_smoothing=st.sampled_from([0.0, 0.05]), softcap=st.sampled_from([None, 4.0]),
       ignore_every=st.integers(0, 4), seed=st.integers(0, 2**16))
def test_property_matches_torch_for_any_shape(tokens, hidden_size, vocab, chunk_size, with_bias, reduction,
                                              label_smoothing, softcap, ignore_every, seed):
    hidden, weight, bias, labels = make_inputs(tuple(tokens), hidden_size, vocab, bias=with_bias,
                                               ignore_every=ignore_every, seed=seed)
    assert_matches(hidden, weight, bias, labels, reduction=reduction, label_smoothing=label_smoothing,
                   softcap=softcap, chunk_size=chunk_size)


def test_a_one_word_vocabulary_with_label_smoothing_sums_to_torchs_exact_zero():
    # found by the property test above: combined in logits, 0.95 t + 0.05 t - t rounded away from 0
    hidden, weight, bias, labels = make_inputs((4, 4, 5), 1, 1, seed=4)
    assert_matches(hidden, weight, bias, labels, reduction="sum", label_smoothing=0.05)


def test_a_one_word_vocabulary_with_label_smoothing_has_torchs_exact_zero_gradient():
    # found by the property test above (CI): the label's target subtracted in two steps left 1e-8 per token
    hidden, weight, bias, labels = make_inputs((4, 6, 6), 1, 1, seed=0)
    assert_matches(hidden, weight, bias, labels, reduction="sum", label_smoothing=0.05)


# ------------------------------------------------------------------ torch.compile and DDP


def test_torch_compile_aot_eager_gives_the_same_loss_and_gradients():
    import torch._dynamo

    torch._dynamo.reset()
    hidden, weight, bias, labels = make_inputs((2, 9), 16, 37, ignore_every=4)

    def loss_fn(hidden, weight, bias, labels):
        return linear_cross_entropy(hidden, weight, labels, bias, label_smoothing=0.1, softcap=10.0,
                                    chunk_size=5)

    compiled = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)
    inputs = (hidden, weight, bias)
    expected = reference(hidden, weight, labels, bias, label_smoothing=0.1, softcap=10.0)
    expected_grads = grads(expected, inputs, torch.tensor(0.7))
    for fn in (compiled, compiled, loss_fn):  # twice compiled: the second call reuses the graph
        loss = fn(hidden, weight, bias, labels)
        torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
        for got, want in zip(grads(loss, inputs, torch.tensor(0.7)), expected_grads):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


WORLD = 2


class TinyLM(nn.Module):
    """A trunk and an output head whose loss goes through linear_cross_entropy."""

    def __init__(self, width=8, vocab=29):
        super().__init__()
        self.trunk = nn.Linear(width, width)
        self.head = nn.Linear(width, vocab)

    def forward(self, inputs, labels):
        hidden = torch.tanh(self.trunk(inputs))
        return linear_cross_entropy(hidden, self.head.weight, labels, self.head.bias, chunk_size=3)


def _batch():
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(2 * WORLD, 5, 8, generator=generator)
    labels = torch.randint(0, 29, (2 * WORLD, 5), generator=generator)
    return inputs, labels


def _ddp_rank(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(TinyLM())
    inputs, labels = _batch()
    model(inputs[rank::WORLD], labels[rank::WORLD]).backward()
    torch.save({name: p.grad for name, p in model.module.named_parameters()}, f"{out_dir}/rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def test_ddp_on_two_processes_gives_the_single_process_gradients(tmp_path):
    run_ranks(_ddp_rank, str(tmp_path), WORLD, timeout_s=120)
    torch.manual_seed(0)
    model = TinyLM()
    inputs, labels = _batch()
    for rank in range(WORLD):  # DDP averages the ranks' gradients of their own mean losses
        (model(inputs[rank::WORLD], labels[rank::WORLD]) / WORLD).backward()
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for name, parameter in model.named_parameters():
            torch.testing.assert_close(got[name], parameter.grad, rtol=1e-5, atol=1e-7)

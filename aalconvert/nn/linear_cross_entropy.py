"""The loss head without its logits: cross-entropy of ``hidden @ weight.T + bias``, chunk by chunk.

methods.md section 6, "the loss head". ``F.cross_entropy(lm_head(hidden).float(), labels)``
materialises the N x V logits, keeps their fp32 log-softmax for backward and, in backward,
builds an N x V gradient: with V = 32k-256k this is often the largest tensor of a training
step. Here the tokens are taken ``chunk_size`` at a time: a chunk's logits are formed, reduced
to per-token scalars and dropped before the next chunk, so no tensor with a vocabulary
dimension outlives a chunk and the extra memory at any moment is a few chunk-sized buffers
(the chunk's logits in the compute dtype, their fp32 copy and the softmax/gradient written
over it).

Design: logits formed again in backward, or gradients made in forward
--------------------------------------------------------------------
Two exact schemes exist, and both are here. (a), the default, keeps only the inputs
(``hidden``, ``weight``, ``bias``, ``labels``: the storage a plain head keeps) plus one fp32
log-sum-exp per token, and forms each chunk's logits again in backward: one extra N x H x V
matmul (four instead of three per step), nothing with a vocabulary dimension kept, gradients
built only for the inputs that need them, every reduction and any upstream gradient handled
alike, a second backward through one graph works, and an input modified in place before
backward raises. (b) ``gradients_in_forward=True``, for a "mean" or "sum" loss, makes the
chunk's gradients for ``hidden``, ``weight`` and ``bias`` during forward, as Liger-Kernel
does: the loss is a sum over tokens, so its upstream gradient is one scalar that backward
multiplies them by. Three matmuls, as the plain head; kept until backward are those
gradients (a ``hidden``-sized one and, for a trainable head, a ``weight``-sized one in the
weight's dtype). One forward then backward allocates the weight's gradient at the start of
backward anyway, so the step's peak does not rise (beyond a few per-token vectors), but they
count as kept (more than the plain head's log-softmax when there are fewer tokens than the
hidden size), two forwards before one backward keep two, they are made even if no backward
follows, and a second backward through the same graph raises (the first scales them in
place). reduction="none" (a per-token upstream gradient does not factor) and
``torch.compile`` always use (a). Neither scheme is differentiable again: under
``create_graph=True`` the gradients returned are linked to an error node (as torch's
``once_differentiable`` does), so a second-order gradient through the loss head raises
instead of being silently zero.

Numerics
--------
The logits are computed in the compute dtype (the inputs' dtype, or the autocast dtype under
``torch.autocast``, as ``F.linear`` would) and upcast to at least fp32 before softcapping
and the softmax, as Hugging Face's ``ForCausalLMLoss`` does (``logits.float()``). The loss
is returned in that upcast dtype (fp32 for fp32/bf16/fp16 inputs). The logits' gradient is
formed in fp32, cast to the compute dtype and multiplied there, which is what autograd does
for ``F.linear(...).float()``; the weight and bias gradients are accumulated over chunks in
fp32 (a V x H fp32 buffer while they are formed when the head is bf16/fp16) and returned in
each input's own dtype. Scheme (b) folds the token count of "mean" (or ``divisor``) into the
logits' gradient, as autograd would, and multiplies by the upstream scalar afterwards, in
the gradients' own dtype: exact when it is 1 or a power of two, one more rounding otherwise
(a loss divided by 3 for gradient accumulation, on a bf16 head). Under autocast the softcap
is applied to the fp32 logits, where Gemma applies it to the bf16 ones: the two differ
within bf16 rounding.
"""

import math

import torch
import torch.nn.functional as F

from aalconvert.errors import ConversionError
from aalconvert.nn.saved import saved_tensors_or_raise

CHUNK_LOGITS_BYTES = 64 * 2**20
"""Default budget (bytes) for one chunk's upcast logits: the chunk size is this over V x 4 bytes."""

REDUCTIONS = ("mean", "sum", "none")
_AUTOCAST_ELIGIBLE = (torch.float32, torch.float16, torch.bfloat16)
_WHERE = "linear_cross_entropy"


def default_chunk_size(vocab_size: int, itemsize: int = 4) -> int:
    """Tokens per chunk so that one chunk's upcast logits take about CHUNK_LOGITS_BYTES (>= 1)."""
    return max(1, CHUNK_LOGITS_BYTES // max(1, vocab_size * itemsize))


# ------------------------------------------------------------------ validation


def _validate(hidden, weight, labels, bias, reduction, label_smoothing, softcap, chunk_size,
              divisor) -> None:
    """Raise ConversionError, before any work, for arguments torch's loss would reject or misread."""
    for name, tensor in (("hidden", hidden), ("weight", weight), ("labels", labels)):
        if not isinstance(tensor, torch.Tensor):
            raise ConversionError(f"{_WHERE}: {name} must be a torch.Tensor, got {type(tensor).__name__}.")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise ConversionError(f"{_WHERE}: bias must be a torch.Tensor or None, got {type(bias).__name__}.")
    if reduction not in REDUCTIONS:
        raise ConversionError(f"{_WHERE}: reduction={reduction!r} is not one of {REDUCTIONS}.")
    if divisor is not None and reduction != "mean":
        raise ConversionError(
            f"{_WHERE}: divisor replaces the token count of reduction='mean' (Hugging Face's "
            f"num_items_in_batch); it means nothing with reduction={reduction!r}. Pass reduction='mean'.")
    if isinstance(divisor, torch.Tensor) and divisor.numel() != 1:
        raise ConversionError(f"{_WHERE}: divisor must be a number or a one-element tensor, "
                              f"got a tensor of shape {tuple(divisor.shape)}.")
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise ConversionError(f"{_WHERE}: label_smoothing={label_smoothing} must be in [0, 1] (as in torch).")
    if softcap is not None and not float(softcap) > 0.0:
        raise ConversionError(f"{_WHERE}: softcap={softcap} must be a positive number (the logits become "
                              "softcap * tanh(logits / softcap)), or None for no capping.")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ConversionError(f"{_WHERE}: chunk_size={chunk_size!r} must be an int >= 1 (tokens per "
                              "chunk), or None to choose it from the vocabulary size.")
    if weight.dim() != 2:
        raise ConversionError(f"{_WHERE}: weight must be 2-D (vocabulary, hidden size) like "
                              f"nn.Linear.weight, got shape {tuple(weight.shape)}.")
    vocab, width = weight.shape
    if hidden.dim() < 1 or hidden.shape[-1] != width:
        raise ConversionError(
            f"{_WHERE}: hidden has shape {tuple(hidden.shape)} but weight {tuple(weight.shape)} needs "
            f"a last dimension of {width} (the hidden size); pass the states the head reads.")
    if bias is not None and tuple(bias.shape) != (vocab,):
        raise ConversionError(
            f"{_WHERE}: bias has shape {tuple(bias.shape)} but weight {tuple(weight.shape)} has a "
            f"vocabulary of {vocab}; bias must have shape ({vocab},).")
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise ConversionError(
            f"{_WHERE}: labels must hold integer class indices, got dtype {labels.dtype}; "
            "pass token ids (torch.long). Soft (probability) targets are not supported.")
    tokens = hidden.shape[:-1]
    if tuple(labels.shape) != tuple(tokens) and not (labels.dim() == 1 and labels.numel() == math.prod(tokens)):
        raise ConversionError(
            f"{_WHERE}: labels have shape {tuple(labels.shape)} but hidden {tuple(hidden.shape)} has "
            f"{math.prod(tokens)} tokens of shape {tuple(tokens)}; labels must have shape {tuple(tokens)} "
            "(or be flat with one label per token). For a causal LM, shift the labels first.")
    for name, tensor in (("weight", weight), ("labels", labels), ("bias", bias)):
        if tensor is not None and tensor.device != hidden.device:
            raise ConversionError(f"{_WHERE}: {name} is on {tensor.device} but hidden is on "
                                  f"{hidden.device}; move them to one device.")


def _compute_dtype(hidden, weight, bias) -> torch.dtype:
    """The dtype F.linear would compute the logits in: the inputs' own, or autocast's."""
    device_type = hidden.device.type
    floats = [t for t in (hidden, weight, bias) if t is not None]
    for tensor in floats:
        if not tensor.is_floating_point():
            raise ConversionError(f"{_WHERE}: hidden, weight and bias must be floating point, got {tensor.dtype}.")
    autocast = torch.is_autocast_enabled(device_type)
    if autocast:
        target = torch.get_autocast_dtype(device_type)
        dtypes = {target if t.dtype in _AUTOCAST_ELIGIBLE else t.dtype for t in floats}
    else:
        dtypes = {t.dtype for t in floats}
    if len(dtypes) != 1:
        found = ", ".join(f"{n}={t.dtype}" for n, t in (("hidden", hidden), ("weight", weight), ("bias", bias))
                          if t is not None)
        raise ConversionError(f"{_WHERE}: {found} differ; cast them to one dtype or run under torch.autocast "
                              "(as F.linear requires).")
    return dtypes.pop()


# ------------------------------------------------------------------ one chunk


def _chunk_logits(hidden_chunk, weight_c, bias_c, float_dtype, softcap):
    """Upcast (and softcapped) logits of one chunk; the raw logits are freed when this returns."""
    logits = F.linear(hidden_chunk, weight_c, bias_c).to(float_dtype)
    if softcap is not None:
        logits = torch.tanh(logits / softcap).mul_(softcap)
    return logits


def _chunk_losses_(logits, safe_labels, label_smoothing):
    """Per-token losses and log-sum-exp of one chunk; leaves exp(logits - row max) in ``logits``.

    Returns (losses, lse, sum of exp(logits - row max)).
    """
    vocab = logits.shape[1]
    target = logits.gather(1, safe_labels[:, None]).squeeze(1)
    mean_logit = logits.sum(dim=-1) / vocab if label_smoothing else None
    # torch.logsumexp's own steps, in place over the logits: one chunk buffer, not two.
    chunk_max = logits.amax(dim=-1)
    sum_exp = logits.sub_(chunk_max[:, None]).exp_().sum(dim=-1)
    lse = sum_exp.log().add_(chunk_max)
    # As torch does, in log-probabilities (lse - logit), so that what cancels there does
    # exactly: a one-word vocabulary's loss is 0, not a rounding of 0.95 t + 0.05 t - t.
    losses = (1.0 - label_smoothing) * (lse - target)
    if label_smoothing:
        losses = losses + label_smoothing * (lse - mean_logit)
    return losses, lse, sum_exp


def _logit_gradient_(probs, capped, safe_labels, scale, label_smoothing, softcap):
    """d loss / d logits of one chunk, over ``probs`` (its softmax) in place, times ``scale`` per token.

    softmax - (1 - eps) * onehot(label) - eps / V, times the token's scale; through the softcap
    z = s * tanh(u / s) (``capped`` holds z and is consumed), dz/du = 1 - (z / s)^2.
    """
    rows = torch.arange(probs.shape[0], device=probs.device)
    # The label's target (1 - eps + eps / V) is subtracted as one number, as torch sums it before
    # subtracting: in two steps a one-word vocabulary's gradient is 1e-8 per token, not 0.
    at_label = probs[rows, safe_labels] - ((1.0 - label_smoothing) + label_smoothing / probs.shape[1])
    if label_smoothing:
        probs.sub_(label_smoothing / probs.shape[1])
    probs[rows, safe_labels] = at_label
    probs.mul_(scale[:, None])
    if softcap is not None:
        probs.mul_(capped.div_(softcap).square_().neg_().add_(1.0))
    return probs


class _InputGradients:
    """The gradients of hidden, weight and bias, filled chunk by chunk (None where not needed)."""

    def __init__(self, hidden, weight, bias, needs, compute_dtype):
        need_hidden, need_weight, need_bias = needs
        self.accumulate = torch.promote_types(compute_dtype, torch.float32)
        self.compute_dtype = compute_dtype
        self.hidden = torch.empty_like(hidden) if need_hidden else None
        self.weight = torch.zeros(weight.shape, dtype=self.accumulate, device=weight.device) if need_weight else None
        self.bias = torch.zeros(weight.shape[0], dtype=self.accumulate, device=weight.device) if need_bias else None

    def add_chunk(self, grad, start, end, hidden_c, weight_c):
        """Add one chunk's logit gradient (fp32, consumed) to the input gradients."""
        grad = grad.to(self.compute_dtype)
        if self.hidden is not None:
            self.hidden[start:end] = (grad @ weight_c).to(self.hidden.dtype)
        if self.weight is not None:
            if self.accumulate == self.compute_dtype:
                self.weight.addmm_(grad.t(), hidden_c)
            else:
                self.weight += grad.t() @ hidden_c
        if self.bias is not None:
            self.bias += grad.sum(dim=0, dtype=self.accumulate)

    def results(self, weight, bias):
        """(hidden, weight, bias) gradients, each in its input's dtype."""
        return (self.hidden,
                None if self.weight is None else self.weight.to(weight.dtype),
                None if self.bias is None else self.bias.to(bias.dtype))


def _labels_and_validity(labels, ignore_index):
    valid = labels != ignore_index
    return valid, torch.where(valid, labels, torch.zeros_like(labels))


# ------------------------------------------------------------------ the autograd.Functions


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Per-token losses of ``cross_entropy(softcap(hidden @ weight.T + bias), labels)``, chunk by chunk.

    Inputs are flat: ``hidden`` (N, H), ``labels`` (N,) int64, ``weight`` (V, H), ``bias`` (V,)
    or None. Output: (N,) losses in ``float_dtype``, 0 where ``labels == ignore_index``. Saves
    the inputs and an (N,) log-sum-exp; backward forms each chunk's logits again.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index, label_smoothing, softcap, chunk_size,
                compute_dtype, float_dtype):
        with torch.autocast(hidden.device.type, enabled=False):
            weight_c = weight.to(compute_dtype)
            bias_c = None if bias is None else bias.to(compute_dtype)
            tokens = hidden.shape[0]
            valid, safe_labels = _labels_and_validity(labels, ignore_index)
            lse = torch.empty(tokens, dtype=float_dtype, device=hidden.device)
            losses = torch.empty(tokens, dtype=float_dtype, device=hidden.device)
            for start in range(0, tokens, chunk_size):
                end = min(start + chunk_size, tokens)
                logits = _chunk_logits(hidden[start:end].to(compute_dtype), weight_c, bias_c, float_dtype,
                                       softcap)
                losses[start:end], lse[start:end], _ = _chunk_losses_(logits, safe_labels[start:end],
                                                                      label_smoothing)
                del logits
            losses = torch.where(valid, losses, torch.zeros_like(losses))
        ctx.save_for_backward(hidden, weight, bias, labels, lse)
        ctx.options = (ignore_index, label_smoothing, softcap, chunk_size, compute_dtype, float_dtype)
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        create_graph = torch.is_grad_enabled()
        with torch.no_grad():
            grads = LinearCrossEntropyFunction._backward(ctx, grad_losses)
        if create_graph:
            grads = _second_order_error(grads)
        return grads

    @staticmethod
    def _backward(ctx, grad_losses):
        hidden, weight, bias, labels, lse = saved_tensors_or_raise(
            ctx, lambda message: f"{_WHERE}: an input of the loss head (hidden, weight, bias or labels) was "
                                 f"modified in place between forward and backward; clone it first. ({message})")
        ignore_index, label_smoothing, softcap, chunk_size, compute_dtype, float_dtype = ctx.options
        if not any(ctx.needs_input_grad[:3]):
            return (None,) * 10
        tokens = hidden.shape[0]
        with torch.autocast(hidden.device.type, enabled=False):
            weight_c = weight.to(compute_dtype)
            bias_c = None if bias is None else bias.to(compute_dtype)
            valid, safe_labels = _labels_and_validity(labels, ignore_index)
            # The loss of an ignored token is the constant 0: its upstream gradient must not reach the inputs.
            scale = torch.where(valid, grad_losses.to(float_dtype), torch.zeros((), dtype=float_dtype,
                                                                                 device=hidden.device))
            grads = _InputGradients(hidden, weight, bias, ctx.needs_input_grad[:3], compute_dtype)
            for start in range(0, tokens, chunk_size):
                end = min(start + chunk_size, tokens)
                hidden_c = hidden[start:end].to(compute_dtype)
                logits = _chunk_logits(hidden_c, weight_c, bias_c, float_dtype, softcap)
                capped = logits if softcap is not None else None
                probs = logits.sub(lse[start:end, None]).exp_() if softcap is not None else \
                    logits.sub_(lse[start:end, None]).exp_()
                del logits
                grad = _logit_gradient_(probs, capped, safe_labels[start:end], scale[start:end],
                                        label_smoothing, softcap)
                del probs, capped
                grads.add_chunk(grad, start, end, hidden_c, weight_c)
                del grad
        return (*grads.results(weight, bias), None, None, None, None, None, None, None)


class LinearCrossEntropyGradientsInForward(torch.autograd.Function):
    """The summed loss (over ``divisor`` when given) and, already in forward, its input gradients.

    The loss is a sum over tokens, so its upstream gradient is one scalar: backward multiplies
    the gradients made in forward by it, in place, and hands them on (a second backward through
    the same graph raises). Inputs as ``LinearCrossEntropyFunction``'s, plus ``divisor`` (a
    number, a 0-dim tensor, or None for a plain sum) and ``needs`` (which of hidden, weight,
    bias want a gradient). Saves only those gradients: no logits are formed in backward and no
    input is kept.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, divisor, needs, ignore_index, label_smoothing, softcap,
                chunk_size, compute_dtype, float_dtype):
        with torch.autocast(hidden.device.type, enabled=False):
            weight_c = weight.to(compute_dtype)
            bias_c = None if bias is None else bias.to(compute_dtype)
            tokens = hidden.shape[0]
            valid, safe_labels = _labels_and_validity(labels, ignore_index)
            one = torch.ones((), dtype=float_dtype, device=hidden.device)
            token_scale = one if divisor is None else one / divisor
            # An ignored token's loss is the constant 0: nothing of it reaches the inputs.
            scale = torch.where(valid, token_scale, torch.zeros_like(one))
            losses = torch.empty(tokens, dtype=float_dtype, device=hidden.device)
            grads = _InputGradients(hidden, weight, bias, needs, compute_dtype)
            for start in range(0, tokens, chunk_size):
                end = min(start + chunk_size, tokens)
                hidden_c = hidden[start:end].to(compute_dtype)
                logits = _chunk_logits(hidden_c, weight_c, bias_c, float_dtype, softcap)
                capped = logits.clone() if softcap is not None else None
                losses[start:end], _, sum_exp = _chunk_losses_(logits, safe_labels[start:end], label_smoothing)
                probs = logits.div_(sum_exp[:, None])
                del logits
                grad = _logit_gradient_(probs, capped, safe_labels[start:end], scale[start:end],
                                        label_smoothing, softcap)
                del probs, capped
                grads.add_chunk(grad, start, end, hidden_c, weight_c)
                del grad
            total = torch.where(valid, losses, torch.zeros_like(losses)).sum()
            loss = total if divisor is None else total / divisor
        ctx.save_for_backward(*grads.results(weight, bias))
        ctx.spent = False
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.spent:
            raise RuntimeError(
                f"{_WHERE}: a second backward through the same loss (retain_graph=True); this loss head "
                "computes its gradients in forward and scales them in place in the first backward. To form them "
                "in each backward instead, convert with loss_head_gradients='backward' (or call "
                "linear_cross_entropy(..., gradients_in_forward=False)).")
        ctx.spent = True
        create_graph = torch.is_grad_enabled()
        with torch.no_grad():
            grads = tuple(None if grad is None else grad.mul_(grad_loss) for grad in ctx.saved_tensors)
        if create_graph:
            grads = _second_order_error(grads)
        return (*grads, None, None, None, None, None, None, None, None, None)


def _second_order_error(grads: tuple) -> tuple:
    """The gradients, linked (under create_graph) to a node that raises if differentiated again."""
    tensors = [index for index, grad in enumerate(grads) if grad is not None]
    if not tensors:
        return grads
    error = torch._C._functions.DelayedError(
        b"linear_cross_entropy has no second-order gradient (its gradients are formed chunk by chunk "
        b"outside autograd); compute the gradient penalty through the plain F.cross_entropy head", len(tensors))
    linked = error(*[grads[index].detach().requires_grad_() for index in tensors])
    linked = linked if isinstance(linked, tuple) else (linked,)
    out = list(grads)
    for index, tensor in zip(tensors, linked):
        out[index] = tensor
    return tuple(out)


# ------------------------------------------------------------------ the public function


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    softcap: float | None = None,
    chunk_size: int | None = None,
    divisor: int | float | torch.Tensor | None = None,
    gradients_in_forward: bool = False,
) -> torch.Tensor:
    """``F.cross_entropy(softcap(F.linear(hidden, weight, bias).float()), labels, ...)`` without the logits.

    ``hidden`` (..., H), ``weight`` (V, H) as ``nn.Linear.weight``, ``bias`` (V,) or None,
    ``labels`` integer class indices of shape ``hidden.shape[:-1]`` (or flat, one per token;
    already shifted for a causal LM). ``reduction``: "mean" (over tokens whose label is not
    ``ignore_index``; nan when there are none, as torch), "sum", or "none" (a loss per token,
    shaped like ``labels``, 0 at ignored tokens). ``divisor`` (with "mean" only): divide the sum
    by this count instead (Hugging Face's ``num_items_in_batch``: ``divisor=num_items_in_batch``).
    ``label_smoothing`` as in torch; ``softcap`` s maps the logits to ``s * tanh(logits / s)``
    before the loss (Gemma's ``final_logit_softcapping``). ``chunk_size`` tokens are processed
    at a time (None: about CHUNK_LOGITS_BYTES of fp32 logits per chunk). Returns the loss in
    fp32 (or the inputs' dtype if wider), with gradients for ``hidden``, ``weight`` and
    ``bias`` in their own dtypes; labels outside [0, V) other than ``ignore_index`` raise as
    in torch (an index error on CPU, a device assert on CUDA).

    ``gradients_in_forward``: for a "mean" or "sum" loss, form the gradients of ``hidden``,
    ``weight`` and ``bias`` while the loss is computed and only scale them in backward (no
    logits formed again; a weight-sized gradient kept until backward); False (default): keep the
    inputs and form each chunk's logits again in backward. Not with reduction="none"; ignored
    where no gradient is wanted and under ``torch.compile``.
    """
    _validate(hidden, weight, labels, bias, reduction, label_smoothing, softcap, chunk_size, divisor)
    if not isinstance(gradients_in_forward, bool):
        raise ConversionError(f"{_WHERE}: gradients_in_forward={gradients_in_forward!r} must be True or False.")
    if gradients_in_forward and reduction == "none":
        raise ConversionError(
            f"{_WHERE}: gradients_in_forward=True needs a loss summed over tokens (reduction='mean' or "
            "'sum'): with reduction='none' each token's upstream gradient is known only in backward.")
    compute_dtype = _compute_dtype(hidden, weight, bias)
    float_dtype = torch.promote_types(compute_dtype, torch.float32)
    width = weight.shape[1]
    flat_hidden = hidden.reshape(-1, width)
    flat_labels = labels.reshape(-1).long()
    if chunk_size is None:
        chunk_size = default_chunk_size(weight.shape[0], float_dtype.itemsize)
    options = (int(ignore_index), float(label_smoothing), None if softcap is None else float(softcap), chunk_size,
               compute_dtype, float_dtype)
    needs = tuple(torch.is_grad_enabled() and t is not None and t.requires_grad for t in (hidden, weight, bias))
    if gradients_in_forward and any(needs) and not torch.compiler.is_compiling():
        return LinearCrossEntropyGradientsInForward.apply(
            flat_hidden, weight, bias, flat_labels, _divisor(reduction, divisor, flat_labels, ignore_index),
            needs, *options)
    losses = LinearCrossEntropyFunction.apply(flat_hidden, weight, bias, flat_labels, *options)
    if reduction == "none":
        return losses.reshape(labels.shape)
    total = losses.sum()
    divisor = _divisor(reduction, divisor, flat_labels, ignore_index)
    return total if divisor is None else total / divisor


def _divisor(reduction, divisor, flat_labels, ignore_index) -> torch.Tensor | float | None:
    """What the summed loss is divided by (None for "sum"): a number, or a tensor on the labels' device."""
    if reduction == "sum":
        return None
    if divisor is None:
        return (flat_labels != ignore_index).sum()
    if isinstance(divisor, torch.Tensor):
        return divisor.detach().to(flat_labels.device)
    return divisor

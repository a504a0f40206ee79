"""In-place activations after a batch norm keep the norm's input, not a copy of their own,
whether the norm is a module of its own or the activation is fused into it (timm).

The blocks copy torchvision's ``Conv2dNormActivation`` as EfficientNet (SiLU),
MobileNetV3 (Hardswish) and timm's Mish users build it: conv -> BatchNorm2d ->
activation(inplace=True) -> conv. BP keeps, per activation, a copy of the norm's
output that autograd makes before the in-place op.
"""

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import aalconvert
from aalconvert.errors import ConversionError
from aalconvert.memory import measure_saved
from aalconvert.nn.recompute import is_norm_act
from aalconvert.nn.recompute_activation import (
    RecomputedInputHardswish,
    RecomputedInputMish,
    RecomputedInputSiLU,
    RecomputedNormAct,
)

VARIANTS = {nn.SiLU: RecomputedInputSiLU, nn.Hardswish: RecomputedInputHardswish, nn.Mish: RecomputedInputMish}


def block(act: type[nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), act(inplace=True),
                         nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), act(inplace=True),
                         nn.Conv2d(8, 4, 1)).train()


def images() -> torch.Tensor:
    return torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def _grads(model: nn.Module, x: torch.Tensor, create_graph: bool = False) -> list[torch.Tensor]:
    parameters = list(model.parameters())
    first = torch.autograd.grad(model(x).square().sum(), parameters, create_graph=create_graph)
    if not create_graph:
        return list(first)
    penalty = sum(g.square().sum() for g in first)
    return [g.detach() for g in first] + list(torch.autograd.grad(penalty, parameters))


@pytest.mark.parametrize("act", list(VARIANTS), ids=lambda a: a.__name__)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_gradients_are_bit_identical_and_the_copy_is_gone(act, dtype):
    model, x = block(act).to(dtype), images().to(dtype)
    reference = copy.deepcopy(model)
    converted = aalconvert.convert(model, "recompute", example_inputs=(x,))
    assert type(converted[2]) is VARIANTS[act] and type(converted[5]) is VARIANTS[act]
    assert all(torch.equal(a, b) for a, b in zip(_grads(converted, x), _grads(reference, x)))
    assert all(torch.equal(a, b) for a, b in zip(converted.buffers(), reference.buffers()))
    kept = [measure_saved(lambda m=m: m(x), m.parameters()).nbytes for m in (reference, converted)]
    assert kept[0] - kept[1] >= 2 * x.new_empty(2, 8, 8, 8).nbytes  # one copy per activation
    assert aalconvert.inspect(reference, (x,), "recompute").totals.converted_bytes == kept[1]


def test_second_order_gradients_follow_bp():
    model, x = block(nn.SiLU).double(), images().double()
    reference = copy.deepcopy(model)
    converted = aalconvert.convert(model, "recompute", example_inputs=(x,))
    got, expected = _grads(converted, x, create_graph=True), _grads(reference, x, create_graph=True)
    count = len(list(reference.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(got[:count], expected[:count]))
    largest = max(b.abs().max() for b in expected[count:])  # up to the order of sums (some are 0 + noise)
    for a, b in zip(got[count:], expected[count:]):
        assert (a - b).abs().max() <= 1e-9 * largest


def test_a_hook_or_a_direct_call_makes_it_the_plain_activation():
    model, x = block(nn.SiLU), images()
    reference = copy.deepcopy(model)
    converted = aalconvert.convert(model, "recompute", example_inputs=(x,))
    converted[1].register_forward_hook(lambda module, args, output: output * 2)
    reference[1].register_forward_hook(lambda module, args, output: output * 2)
    assert all(torch.equal(a, b) for a, b in zip(_grads(converted, x), _grads(reference, x)))
    other = torch.randn(2, 8, 8, 8, requires_grad=True)
    out = converted[2](other * 1)
    assert out.grad_fn is not None and torch.equal(out, nn.functional.silu(other.detach()))


def test_without_autograd_it_runs_in_place_and_revert_restores_the_module():
    model, x = block(nn.Hardswish), images()
    converted = aalconvert.convert(model, "recompute", example_inputs=(x,))
    h = torch.randn(2, 8, 8, 8)
    with torch.no_grad():
        assert converted[2](h) is h
    reverted = aalconvert.revert(converted)
    assert type(reverted[2]) is nn.Hardswish and reverted[2].inplace


def test_an_out_of_place_activation_is_refused():
    with pytest.raises(ConversionError, match="in-place nn.SiLU"):
        RecomputedInputSiLU.from_module(nn.SiLU())


class BatchNormAct2d(nn.BatchNorm2d):
    """Copies timm's ``timm.layers.norm_act.BatchNormAct2d``: torch's batch-norm arithmetic and
    statistics update in its own forward, then ``drop`` and ``act`` children."""

    def __init__(self, channels: int, act: nn.Module):
        super().__init__(channels)
        self.drop, self.act = nn.Identity(), act

    def forward(self, x):
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                         self.training or self.running_mean is None, factor, self.eps)
        return self.act(self.drop(x))


def fused(act: type[nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), BatchNormAct2d(8, act(inplace=True)),
                         nn.Conv2d(8, 8, 3, padding=1, groups=8), BatchNormAct2d(8, act(inplace=True)),
                         nn.Conv2d(8, 4, 1)).train()


@pytest.mark.parametrize("act", [nn.SiLU, nn.Hardswish], ids=lambda a: a.__name__)
def test_a_fused_norm_activation_keeps_no_copy_and_gradients_stay_bit_identical(act):
    # timm's EfficientNet, EfficientNetV2, MobileNetV3 and ReXNet run BatchNormAct2d(SiLU/Hardswish)
    model, x = fused(act), images()
    reference = copy.deepcopy(model)
    converted = aalconvert.convert(model, "recompute", example_inputs=(x,))
    assert isinstance(converted[1], RecomputedNormAct) and isinstance(converted[1], BatchNormAct2d)
    assert all(torch.equal(a, b) for a, b in zip(_grads(converted, x), _grads(reference, x)))
    assert all(torch.equal(a, b) for a, b in zip(converted.buffers(), reference.buffers()))  # once, as BP
    kept = [measure_saved(lambda m=m: m(x), m.parameters()).nbytes for m in (reference, converted)]
    assert kept[0] - kept[1] >= 2 * x.new_empty(2, 8, 8, 8).nbytes  # one copy per fused activation
    assert aalconvert.inspect(reference, (x,), "recompute").totals.converted_bytes == kept[1]


@pytest.mark.parametrize("act", [nn.SiLU, nn.ReLU], ids=lambda a: a.__name__)
def test_a_hook_changing_the_fused_activations_input_keeps_bp_and_revert_and_pickle_work(act):
    # Until 2026-11-30 the conv after a fused norm rebuilt its input without such a hook's change
    # (silently wrong gradients), with a fused ReLU too: the chain link now breaks on it.
    model, x = fused(act), images()
    reference = copy.deepcopy(model)
    converted = aalconvert.convert(model, "recompute", example_inputs=(x,))
    for m in (converted, reference):
        m[1].act.register_forward_pre_hook(lambda module, args: (args[0] * 0.5,))
    assert all(torch.equal(a, b) for a, b in zip(_grads(converted, x), _grads(reference, x)))
    plain = fused(nn.SiLU)
    buffer = io.BytesIO()
    torch.save(aalconvert.convert(plain, "recompute", example_inputs=(x,)), buffer)
    buffer.seek(0)
    assert isinstance(torch.load(buffer, weights_only=False)[1], RecomputedNormAct)
    reverted = aalconvert.revert(converted)
    assert type(reverted[1]) is BatchNormAct2d and type(reverted[1].act) is act


def test_beside_an_approx_rule_the_packer_keeps_fused_activations():
    model, x = fused(nn.SiLU), images()
    converted = aalconvert.convert(model, ["recompute", "approx4"], example_inputs=(x,))
    assert type(converted[1]) is BatchNormAct2d


def test_a_synchronised_batch_norm_is_no_chain_start():
    class SyncBatchNormAct2d(nn.SyncBatchNorm):  # timm's: statistics reduced across processes
        def __init__(self, channels):
            super().__init__(channels)
            self.drop, self.act = nn.Identity(), nn.ReLU(inplace=True)

    assert not is_norm_act(SyncBatchNormAct2d(4))


def test_under_approx_a_layer_after_a_fused_norm_shares_its_copy_on_every_forward():
    # The packer's own pass-through hooks on the fused activation, armed by the first forward,
    # once broke the chain link from then on (timm EfficientNet approx4 0.117 -> 0.288 of BP).
    model, x = fused(nn.SiLU), torch.randn(4, 3, 32, 32)
    converted = aalconvert.convert(model, "approx4", example_inputs=(x,))
    alone = aalconvert.convert(copy.deepcopy(model), "approx4", example_inputs=(x,), skip=["2", "4"])
    kept = [[measure_saved(lambda m=m: m(x), m.parameters()).nbytes for _ in range(2)] for m in (converted, alone)]
    assert kept[0][0] == kept[0][1] == aalconvert.inspect(model, (x,), "approx4").totals.converted_bytes
    assert kept[0][1] < kept[1][1]  # the layers keep no k-bit copy of their own


def _same_gradients(converted: nn.Module, reference: nn.Module, x: torch.Tensor) -> bool:
    return all(torch.equal(a, b) for a, b in zip(_grads(converted, x), _grads(reference, x)))


@pytest.mark.parametrize("act", list(VARIANTS), ids=lambda a: a.__name__)
def test_an_activation_set_out_of_place_after_conversion_still_runs(act):
    # It once returned its input unchanged: the in-place path ran the activation out of place.
    model, x = block(act), images()
    reference = copy.deepcopy(model)
    converted = aalconvert.convert(model, "recompute", example_inputs=(x,))
    for m in (converted, reference):
        m[2].inplace = False
    assert torch.equal(converted(x), reference(x))
    assert _same_gradients(converted, reference, x)


@pytest.mark.parametrize("act", [nn.SiLU, nn.ReLU], ids=lambda a: a.__name__)
@pytest.mark.parametrize("child", ["drop -> Dropout(0)", "act -> ELU", "act -> Sequential(act)"])
def test_a_fused_norms_child_replaced_after_conversion_leaves_the_next_layer_exact(act, child):
    # The rebuild runs a fused norm's act only while it is one: a replaced child made it return
    # the batch norm's output alone (a wrong weight gradient for the conv after it).
    model, x = fused(act), images()
    reference = copy.deepcopy(model)
    converted = aalconvert.convert(model, "recompute", example_inputs=(x,))
    for m in (converted, reference):
        if child.startswith("drop"):
            m[1].drop = nn.Dropout(0.0)
        else:
            m[1].act = nn.ELU() if "ELU" in child else nn.Sequential(act())
    assert _same_gradients(converted, reference, x)


@pytest.mark.parametrize("act", [nn.SiLU, nn.ReLU], ids=lambda a: a.__name__)
def test_a_global_pre_hook_changing_a_fused_activations_input_keeps_bp_gradients(act):
    model, x = fused(act), images()
    reference = copy.deepcopy(model)
    converted = aalconvert.convert(model, "recompute", example_inputs=(x,))
    acts = {id(converted[1].act), id(reference[1].act)}
    handle = torch.nn.modules.module.register_module_forward_pre_hook(
        lambda module, args: (args[0] * 0.5,) if id(module) in acts else None)
    try:
        assert _same_gradients(converted, reference, x)
    finally:
        handle.remove()


def _double_in_place(module, args):
    args[0].mul_(2.0)


def _add_one_in_place(module, args):
    args[0].add_(1.0)


@pytest.mark.parametrize("where", ["pre-hook on the in-place activation", "pre-hook on the next conv",
                                   "forward hook prepended on the norm"])
def test_hooks_registered_after_conversion_where_the_wiring_cannot_see_them_keep_bp_gradients(where):
    model, x = block(nn.SiLU), images()
    reference = copy.deepcopy(model)
    converted = aalconvert.convert(model, "recompute", example_inputs=(x,))
    for m in (converted, reference):
        if where.startswith("pre-hook on the in-place"):
            m[2].register_forward_pre_hook(_double_in_place)
        elif where.startswith("pre-hook on the next"):
            m[3].register_forward_pre_hook(_add_one_in_place)
        else:
            m[1].register_forward_hook(lambda module, args, output: output * 2, prepend=True)
    assert _same_gradients(converted, reference, x)


def test_an_inference_mode_forward_runs_in_train_and_eval_mode():
    model, x = block(nn.SiLU), images()
    reference = copy.deepcopy(model)
    converted = aalconvert.convert(model, "recompute", example_inputs=(x,))
    for mode in (True, False):
        converted.train(mode), reference.train(mode)
        with torch.inference_mode():
            assert torch.equal(converted(x), reference(x))


@pytest.mark.parametrize("model_of", [block, fused], ids=["torchvision", "timm-fused"])
def test_an_eval_forward_then_a_train_forward_before_one_backward_gives_bp_gradients(model_of):
    # The train forward updates the running statistics the eval forward normalized with; the
    # rebuild once read the updated ones.
    model, x = model_of(nn.SiLU), images()
    reference = copy.deepcopy(model)
    converted = aalconvert.convert(model, "recompute", example_inputs=(x,))

    def both(m):
        m.eval()
        loss = m(x).square().sum()
        m.train()
        loss = loss + m(x * 0.5 + 1.0).square().sum()
        return torch.autograd.grad(loss, list(m.parameters()))

    assert all(torch.equal(a, b) for a, b in zip(both(converted), both(reference)))

"""aalconvert.step_memory: a real step measured by the profiler, and the simulated step inspect predicts with.

The predicted peak of a training step (``Report.totals``) must match what the
profiler measures on the same step: within 5 % on every example, plain and
converted, with SGD and AdamW, and with checkpointed blocks recomputing.
"""

import pytest
import torch
from torch import nn
from torch._subclasses import FakeTensorMode

import aalconvert
from aalconvert.budget import convert_to_budget, plan_budget
from aalconvert.checkpointing import CheckpointedForward, block_names
from aalconvert.facts import gather_facts
from aalconvert.memory import measure_saved
from aalconvert.step_memory import (
    OPTIMIZERS, Allocation, StepMemory, StepSimulation, backward_of, depthwise_weight_buffer_bytes,
    measure_training_step, replay, training_loss)
from aalconvert.report import OPTIMIZER_STATE_PER_PARAMETER
from tiny_llama import tiny_llama
from examples import EXAMPLES


def predicted_step_bytes(totals, converted: bool) -> int:
    """The predicted peak above the step's start: without parameters and optimizer state, as measured."""
    peak = totals.peak_converted_bytes if converted else totals.peak_bp_bytes
    return peak - totals.parameter_bytes - totals.optimizer_state_bytes


def example(name: str, batch_size: int):
    torch.manual_seed(0)
    model = EXAMPLES[name].build_model().train()
    return model, EXAMPLES[name].example_inputs(batch_size=batch_size)


@pytest.mark.parametrize("rules", ["bp", "auto+approx4"])
@pytest.mark.parametrize("name", list(EXAMPLES))
def test_the_predicted_step_peak_is_within_5_percent_of_the_measured_one(name, rules):
    model, inputs = example(name, batch_size=8)
    chosen = "exact" if rules == "bp" else rules.split("+")
    totals = aalconvert.inspect(model, inputs, chosen, optimizer="sgd").totals
    if rules != "bp":
        model = aalconvert.convert(model, chosen, example_inputs=inputs)
    measured = measure_training_step(model, lambda: training_loss(model(*inputs))).peak_bytes
    predicted = predicted_step_bytes(totals, converted=rules != "bp")
    assert abs(predicted - measured) <= 0.05 * measured, (predicted, measured)


def test_adamw_temporaries_make_the_peak_where_gradients_dominate():
    # resnet_bottleneck: on resnet_basic with oneDNN's AVX2 kernels, the 4 weights' worth its last convolutions
    # hold on 1x1 maps make the peak instead (small_map_weight_buffers)
    model, inputs = example("resnet_bottleneck", batch_size=2)
    totals = aalconvert.inspect(model, inputs, "exact", optimizer="adamw").totals
    assert totals.optimizer_step_bytes > 0
    assert totals.gradient_bytes + totals.optimizer_step_bytes > totals.bp_step_bytes  # the step's peak
    measured = measure_training_step(model, lambda: training_loss(model(*inputs)), optimizer="adamw").peak_bytes
    predicted = predicted_step_bytes(totals, converted=False)
    assert abs(predicted - measured) <= 0.05 * measured, (predicted, measured)


def test_checkpointed_blocks_recomputing_are_in_the_predicted_peak():
    model, inputs = example("vit", batch_size=8)
    rules = ["exact", "recompute", "checkpoint"]
    everything = plan_budget(model, 1 << 40, inputs, rules=rules)
    budget = int(everything.floor_bytes + 0.25 * (everything.peak_bp_bytes - everything.floor_bytes))
    plan = plan_budget(model, budget, inputs, rules=rules)
    assert "checkpoint" in plan.decisions.values() and plan.recompute_bytes > 0
    converted = convert_to_budget(model, plan.budget_bytes, inputs, rules=rules)
    measured = measure_training_step(converted, lambda: training_loss(converted(*inputs))).peak_bytes
    predicted = plan.peak_bytes - plan.report.totals.parameter_bytes
    assert abs(predicted - measured) <= 0.05 * measured, (predicted, measured)
    assert measured <= plan.budget_bytes - plan.report.totals.parameter_bytes


def test_a_checkpointed_conv_net_peaks_as_predicted_where_late_stages_hold_weight_sized_temporaries():
    # Every block recomputes: the peak comes late in backward, in convolutions on small feature maps
    # (weight-sized temporaries) and strided ones (two input-sized buffers), 4.4 % under before both.
    model, inputs = example("resnet_bottleneck", batch_size=16)
    for name in block_names(gather_facts(model, inputs)):
        block = model.get_submodule(name)
        block.forward = CheckpointedForward(block)
    predicted = predicted_step_bytes(aalconvert.inspect(model, inputs, "exact", optimizer="sgd").totals, False)
    measured = measure_training_step(model, lambda: training_loss(model(*inputs))).peak_bytes
    assert abs(predicted - measured) <= 0.01 * measured, (predicted, measured)


def test_a_hugging_face_model_with_its_own_loss_is_predicted_within_5_percent():
    model, ids = tiny_llama()
    totals = aalconvert.inspect(model, (ids,), "exact").totals  # labels = the ids: the model's own loss
    measured = measure_training_step(model, lambda: model(ids, labels=ids).loss).peak_bytes
    predicted = predicted_step_bytes(totals, converted=False)
    assert abs(predicted - measured) <= 0.05 * measured, (predicted, measured)


class ChannelsLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of an N, C, H, W map through channels-last permutes (torchvision's LayerNorm2d)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    """torchvision's ConvNeXt block (CNBlock): 7x7 depthwise convolution, LayerNorm and an inverted MLP on
    channels-last permutes, layer scale, stochastic depth by rows (bernoulli, in-place division), residual."""

    def __init__(self, dim: int, drop: float) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.up, self.down = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.layer_scale = nn.Parameter(torch.full((dim, 1, 1), 1e-6))
        self.drop = drop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.depthwise(x).permute(0, 2, 3, 1)
        y = self.layer_scale * self.down(nn.functional.gelu(self.up(self.norm(y)))).permute(0, 3, 1, 2)
        if self.training and self.drop > 0:
            y = y * torch.empty(y.shape[0], 1, 1, 1).bernoulli_(1 - self.drop).div_(1 - self.drop)
        return x + y


def small_convnext() -> nn.Sequential:
    """torchvision's convnext_tiny in small: 4x4 stem, two stages of two blocks, LayerNorm2d + 2x2 downsample."""
    return nn.Sequential(nn.Conv2d(3, 32, 4, stride=4), ChannelsLayerNorm(32), ConvNeXtBlock(32, 0.0),
                         ConvNeXtBlock(32, 0.05), ChannelsLayerNorm(32), nn.Conv2d(32, 64, 2, stride=2),
                         ConvNeXtBlock(64, 0.1), ConvNeXtBlock(64, 0.1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.LayerNorm(64), nn.Linear(64, 10))


def test_a_convnext_peaks_as_predicted_where_depthwise_backward_holds_a_weight_gradient_buffer():
    # The blocks' inputs are channels-last (they come out of permutes): oneDNN's backward of the 7x7
    # depthwise convolution then holds 256 (AVX-512) or 64 (AVX2) weights' worth for the weight's gradient,
    # the step's peak. Before it was modelled: -51 % here, -12.2 % on torchvision's convnext_tiny.
    torch.manual_seed(0)
    model, x = small_convnext().train(), torch.randn(2, 3, 64, 64)
    predicted = predicted_step_bytes(aalconvert.inspect(model, (x,), "exact", optimizer="sgd").totals, False)
    measured = measure_training_step(model, lambda: training_loss(model(x))).peak_bytes
    assert abs(predicted - measured) <= 0.01 * measured, (predicted, measured)


def test_convolutions_on_maps_smaller_than_their_kernel_peak_as_predicted():
    # The last stages of a ResNet on small images: 3x3 convolutions on 2x2 and 1x1 maps. oneDNN's AVX2
    # kernels hold 4 weights' worth for the weight's gradient there, its AVX-512 ones one (the step's peak
    # either way). Before it was modelled: -26 % on resnet_basic at batch 16 on an AVX2 machine.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(64, 128, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(128, 128, 3, padding=1),
                          nn.ReLU(), nn.Conv2d(128, 128, 3, padding=1), nn.Flatten(), nn.Linear(128, 10)).train()
    x = torch.randn(16, 64, 2, 2)
    predicted = predicted_step_bytes(aalconvert.inspect(model, (x,), "exact", optimizer="sgd").totals, False)
    measured = measure_training_step(model, lambda: training_loss(model(x))).peak_bytes
    assert abs(predicted - measured) <= 0.02 * measured, (predicted, measured)


def test_the_depthwise_buffer_is_counted_only_for_channels_last_inputs_and_a_weight_gradient():
    weight = torch.empty(64, 1, 7, 7)
    last = torch.empty(2, 64, 8, 8).to(memory_format=torch.channels_last)

    def args(source: torch.Tensor, groups: int = 64, mask: tuple = (True, True, True)) -> tuple:
        return (source, source, weight, [64], [1, 1], [3, 3], [1, 1], False, [0, 0], groups, list(mask))

    assert depthwise_weight_buffer_bytes(last.contiguous(), weight, args(last.contiguous())) == 0
    assert depthwise_weight_buffer_bytes(last, weight, args(last, mask=(True, False, True))) == 0
    assert depthwise_weight_buffer_bytes(last, weight, args(last, groups=1)) == 0
    three = torch.empty(64, 1, 3, 3)
    assert depthwise_weight_buffer_bytes(last, three, args(last)) == 0
    assert depthwise_weight_buffer_bytes(last, weight, args(last)) in (0, (64 + 1) * 64 * 49 * 4, (256 + 1) * 64 * 49 * 4)


# -- the simulation --------------------------------------------------------------------------


def test_the_simulation_counts_new_storages_until_freed_and_never_known_ones():
    mode = FakeTensorMode()
    with mode:
        known = torch.empty(1000)
        with StepSimulation([known]) as simulation:
            known.add_(1)  # in place: nothing new
            view = known[:10]  # a view: nothing new
            made = known * 2  # 4000 bytes
            more = made + 1  # 4000 more
            del made
            assert simulation.level == 4000
            del more, view
    assert simulation.peak_bytes == 8000 and simulation.level == 0


def test_backward_of_takes_a_scalar_loss_or_a_stand_in_for_cross_entropy():
    weight = torch.randn(3, 4, requires_grad=True)
    backward_of({"loss": (weight ** 2).sum(), "logits": weight * 3})  # the scalar first: it is the loss
    assert torch.allclose(weight.grad, 2 * weight)
    weight.grad = None
    backward_of((weight * 1.0,))
    assert torch.allclose(weight.grad, torch.softmax(weight, -1) / 3)
    backward_of(torch.randn(3))  # nothing needs a gradient: nothing to do


# -- the measurement -------------------------------------------------------------------------


def test_replay_counts_kept_at_the_forward_end_and_the_peak_and_sets_host_copies_apart():
    A = Allocation
    events = [A(1, 100, 40), A(2, 200, 10, host=True), A(3, 300, 5), A(4, 300, -5),  # forward
              A(6, 400, 30), A(7, 100, -40), A(8, 200, -10), A(9, 500, 7), A(10, 400, -30), A(11, 500, -7)]
    memory = replay(list(reversed(events)), forward_end_ns=5)  # sorted by time inside
    assert memory == StepMemory(kept_bytes=40, peak_bytes=70, host_bytes=10)
    # a free at a host copy's address after that copy is gone is an ordinary free
    again = replay([A(1, 200, 8, host=True), A(2, 200, -8), A(3, 200, 4), A(6, 200, -4)], 5)
    assert again == StepMemory(kept_bytes=4, peak_bytes=4, host_bytes=8)


def test_measuring_what_a_forward_saves_leaves_the_step_peak_as_it_is():
    """Every saved tensor holds the pack hook until backward frees it: the hook must not hold the storages."""
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Sequential(nn.Linear(256, 256), nn.Tanh()) for _ in range(6)))
    x = torch.randn(64, 256)
    plain = measure_training_step(model, lambda: model(x).sum())
    watched = measure_training_step(model, lambda: measure_saved(lambda: model(x).sum(), model.parameters()).output)
    assert watched.peak_bytes == plain.peak_bytes


def test_the_measured_step_takes_every_optimizer_inspect_counts_and_names_the_choices_otherwise():
    assert set(OPTIMIZERS) == set(OPTIMIZER_STATE_PER_PARAMETER) - {None}
    with pytest.raises(ValueError, match="optimizer must be one of sgd, sgd_momentum, adam, adamw"):
        measure_training_step(nn.Linear(2, 2), lambda: torch.zeros(()), optimizer="lion")

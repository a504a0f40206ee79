"""known_ones: which fake storages hold only ones, followed from real inputs and the ops that made them.

The estimate relies on this to drop an all-ones attention mask as the real
forward does; a storage wrongly held to be ones would under-predict, so every
way to lose the ones is tried as well.
"""

import torch
from torch._subclasses import FakeTensorMode

from aalconvert.known_ones import OnesStorages
from aalconvert.memory import fake_inputs

held = OnesStorages.active_holds  # asks the innermost active OnesStorages

CPU = torch.device("cpu")


def fakes(*reals: torch.Tensor) -> tuple[FakeTensorMode, tuple]:
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    return mode, fake_inputs(reals, mode, CPU)


def test_an_input_of_ones_is_followed_through_a_cast_a_slice_and_an_index():
    mode, (mask,) = fakes(torch.ones(2, 8, dtype=torch.long))
    with mode, OnesStorages([mask]):
        boolean = mask.to(torch.bool)
        assert held(mask) and held(boolean)
        assert held(boolean[:, 2:5])
        assert held(boolean[:, torch.arange(3)])
        assert held(mask == 1) and held(mask != 0) and held(mask > 0)
        assert not held(mask == 0) and not held(~boolean)
        assert held(torch.cat([boolean, boolean], 1))
        assert not held(torch.cat([boolean, torch.zeros_like(boolean)], 1))


def test_inputs_with_one_zero_a_view_of_a_larger_storage_or_other_values_are_not_held():
    with_zero = torch.ones(2, 8, dtype=torch.long)
    with_zero[1, 0] = 0
    larger = torch.zeros(2, 16, dtype=torch.long)
    larger[:, :8] = 1
    mode, inputs = fakes(with_zero, larger[:, :8], torch.full((2, 8), 2), torch.empty(0))
    with mode, OnesStorages(inputs):
        assert not any(held(t) for t in inputs)


def test_ones_made_by_ops_are_held_and_writes_forget_them():
    mode = FakeTensorMode()
    with mode, OnesStorages([]):
        made = [torch.ones(3, 4), torch.full((3, 4), 1.0), torch.zeros(3, 4).new_ones(3, 4),
                torch.ones_like(torch.empty(3)), torch.empty(2).fill_(1)]
        assert all(held(t) for t in made)
        assert not held(torch.full((3, 4), 0.5)) and not held(torch.empty(3))
        ones = torch.ones(3, 4)
        ones[0, 1] = 0  # a write of another value anywhere in the storage
        assert not held(ones)
        partly = torch.zeros(3, 4)
        partly[:, :2].fill_(1)  # ones written over part of the storage only
        assert not held(partly)
        copied = torch.zeros(3, 4).copy_(torch.ones(3, 4))
        assert held(copied)
        still = torch.ones(3, 4)
        still[1:].fill_(1)
        assert held(still)


def test_nothing_is_held_outside_the_mode_and_each_mode_starts_from_the_inputs():
    mode, (mask,) = fakes(torch.ones(2, 8, dtype=torch.long))
    assert not held(mask)
    with mode, OnesStorages([mask]):
        mask.zero_()
        assert not held(mask)
    with mode, OnesStorages([mask]):  # the real input was ones: a new estimate starts from it again
        assert held(mask)

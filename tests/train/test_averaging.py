"""WeightAverage against the recurrence computed by hand, its swap in and out, and its checkpoint state."""

import pytest
import torch

from kdinpaint.train.averaging import WeightAverage


def test_average_follows_the_recurrence_and_swaps_back():
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    b = torch.nn.Parameter(torch.tensor(4.0))
    avg = WeightAverage([w, b], decay=0.75)
    expected_w, expected_b = torch.tensor([1.0, -2.0]), torch.tensor(4.0)
    for value in (3.0, -1.0, 0.5):
        with torch.no_grad():
            w.fill_(value)
            b.fill_(2 * value)
        avg.update()
        expected_w = 0.75 * expected_w + 0.25 * value  # by hand: avg <- d avg + (1 - d) theta
        expected_b = 0.75 * expected_b + 0.25 * 2 * value
    with avg.applied():
        torch.testing.assert_close(w.detach(), expected_w)
        torch.testing.assert_close(b.detach(), expected_b)
    assert torch.equal(w.detach(), torch.tensor([0.5, 0.5])) and b.item() == 1.0  # the trained values are back
    assert avg.updates == 3


def test_values_come_back_after_an_error_inside_the_block():
    w = torch.nn.Parameter(torch.zeros(3))
    avg = WeightAverage([w], decay=0.5)
    with torch.no_grad():
        w.fill_(2.0)
    with pytest.raises(RuntimeError, match="inside"), avg.applied():
        assert w.sum().item() == 0.0
        raise RuntimeError("inside")
    assert w.sum().item() == 6.0


def test_state_round_trip_and_mismatch():
    w = torch.nn.Parameter(torch.ones(2))
    avg = WeightAverage([w], decay=0.9)
    with torch.no_grad():
        w.mul_(3)
    avg.update()
    other = WeightAverage([torch.nn.Parameter(torch.zeros(2))], decay=0.1)
    other.load_state_dict(avg.state_dict())
    assert other.decay == 0.9 and other.updates == 1 and torch.equal(other.shadow[0], avg.shadow[0])
    with pytest.raises(ValueError, match="does not fit"):
        WeightAverage([torch.nn.Parameter(torch.zeros(3))], decay=0.9).load_state_dict(avg.state_dict())


@pytest.mark.parametrize("decay", [-0.1, 1.0, 2])
def test_bad_decay_is_refused(decay):
    with pytest.raises(ValueError, match="decay must be in"):
        WeightAverage([torch.nn.Parameter(torch.zeros(1))], decay=decay)

"""attach() refuses what would silently do nothing or the wrong thing, naming the spec field and its fix: a spec
that taps nothing, a model or teacher called in a way its forward does not take (``input: concat`` on a two-argument
model, a teacher of another channel count), and tapped modules under gradient checkpointing. Encoder levels inside a
block checkpointed with ``use_reentrant=False`` are captured correctly: same losses and gradients as without."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import kdinpaint
from kdinpaint.attach import is_attached
from tiny import LEVELS, TinyUNet, batch


class TwoArgs(nn.Module):
    """``model(image, mask)`` with ``in_channels`` image channels; level ``down``."""

    def __init__(self, in_channels: int = 3, checkpointed: bool | None = None):
        super().__init__()
        self.stem = nn.Conv2d(in_channels + 1, 4, 3, padding=1)
        self.down = nn.Sequential(nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.ReLU())
        self.deeper = nn.Sequential(nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.Upsample(scale_factor=4.0), nn.Conv2d(4, 3, 3, padding=1))
        self.checkpointed = checkpointed  # None: no checkpointing; else torch.utils.checkpoint's use_reentrant

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.stem(torch.cat([image * (1 - mask), mask], 1))
        if self.checkpointed is None or not torch.is_grad_enabled():
            x = self.deeper(self.down(x))
        else:  # the usual memory saving: the encoder recomputed in the backward pass
            x = checkpoint(lambda t: self.deeper(self.down(t)), x, use_reentrant=self.checkpointed)
        return self.head(x)


SELF_ONLY = {"encoder_levels": ["down", "deeper"], "cross_distillation": False, "completion_sites": []}


# ---- a spec that taps nothing ------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", [{}, {"name": "mine", "encoder_levels": []},
                                  {"encoder_levels": [], "completion_sites": [], "attention_sites": [{"module": "down", "transfer": False}]}])
def test_a_spec_that_taps_nothing_is_refused_unless_allowed(spec):
    net = TwoArgs()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ValueError, match=r"taps no module.*every distillation loss would be 0.*allow_empty=True"):
        kdinpaint.attach(net, None, spec)
    assert not is_attached(net)  # nothing left behind: a later attach works
    kd = kdinpaint.attach(net, None, spec, allow_empty=True)  # a baseline, trained as it is
    image, mask = batch(1, 16)
    net(image, mask)
    assert kd.losses(image)["total"].item() == 0.0
    kd.detach()
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_registered_baselines_attach_only_when_allowed():
    adapter = kdinpaint.get_adapter("reference")
    with pytest.raises(ValueError, match="spec 'reference:baseline' taps no module"):
        kdinpaint.attach(adapter.student("baseline", width=4), None, "reference:baseline")
    kdinpaint.attach(adapter.student("baseline", width=4), None, "reference:baseline", allow_empty=True).detach()


# ---- how the model and the teacher are called --------------------------------------------------------------
def test_input_concat_on_a_two_argument_model_names_the_field_and_its_value():
    with pytest.raises(ValueError) as err:
        kdinpaint.attach(TwoArgs(), None, {**SELF_ONLY, "input": "concat", "mask_arg": None})
    message = str(err.value)
    assert "the spec's input is 'concat'" in message
    assert "set input: separate, image_arg: 'image', mask_arg: 'mask'" in message
    kdinpaint.attach(TwoArgs(), None, {**SELF_ONLY, "image_arg": "image", "mask_arg": "mask"}).detach()  # the fix works


def test_a_concat_teacher_call_on_a_two_argument_teacher_names_teacher_call():
    with pytest.raises(ValueError, match=r"the teacher TwoArgs.*set teacher_call.input: separate, image_arg: 'image'"):
        kdinpaint.attach(TwoArgs(), TwoArgs(), {"encoder_levels": ["down"], "teacher_call": {"input": "concat", "mask_arg": None}})
    with pytest.raises(ValueError, match=r"teacher_input: image_only calls it with the image alone.*set teacher_input"):
        kdinpaint.attach(TwoArgs(), TwoArgs(), {"encoder_levels": ["down"], "teacher_input": "image_only"})


def test_a_teacher_of_another_channel_count_names_the_teacher_and_teacher_call():
    student, teacher = TwoArgs(3), TwoArgs(4)  # a 4-channel teacher fed the 3-channel ground truth
    with pytest.raises(ValueError) as err:
        kdinpaint.attach(student, teacher, {"encoder_levels": ["down"]})
    message = str(err.value)
    assert message.startswith("the teacher TwoArgs(tensor (1, 3, 64, 64), tensor (1, 1, 64, 64)) fails")
    assert "to have 5 channels, but got 4" in message  # torch's own words, kept
    assert "expects another channel count than the 3 it is given" in message
    assert "teacher_input='empty_mask'" in message and "teacher_call is null" in message
    assert not is_attached(student)
    assert all(p.requires_grad for p in teacher.parameters())  # not frozen by a failed attach


# ---- gradient checkpointing ----------------------------------------------------------------------------------
def _losses_and_grads(net: TwoArgs, spec: dict) -> tuple[dict, dict]:
    kd = kdinpaint.attach(net, None, spec)
    image, mask = batch(2, 16)
    net.train()
    pred = net(image, mask)
    losses = kd.losses(image)
    ((pred - image).abs().mean() + losses["total"]).backward()
    grads = {n: p.grad.clone() for n, p in [*net.named_parameters(), *kd.named_parameters(prefix="kd")] if p.grad is not None}
    kd.detach()
    return {k: v.detach() for k, v in losses.items()}, grads


def test_encoder_levels_inside_a_non_reentrant_checkpoint_are_captured_once_and_correctly():
    torch.manual_seed(0)
    plain = TwoArgs()
    checkpointed = TwoArgs(checkpointed=False)
    checkpointed.load_state_dict(plain.state_dict())
    torch.manual_seed(1)
    want_losses, want_grads = _losses_and_grads(plain, SELF_ONLY)
    torch.manual_seed(1)  # the same meta-networks
    got_losses, got_grads = _losses_and_grads(checkpointed, SELF_ONLY)
    assert want_losses["self"] > 0
    assert set(got_losses) == set(want_losses) and all(torch.equal(got_losses[k], want_losses[k]) for k in want_losses)
    assert set(got_grads) == set(want_grads)
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(("reentrant", "spec", "match"), [
    (True, SELF_ONLY, r"tapped module 'down' ran without gradients .*use_reentrant=True.*pass use_reentrant=False"),
    (True, {"encoder_levels": ["down"], "cross_distillation": False}, r"its captured feature and its completion block"),
    (False, {"encoder_levels": ["down"], "cross_distillation": False},
     r"completion site 'down' ran again in the backward pass: torch.utils.checkpoint recomputes.*set completion_sites"),
])
def test_a_tap_under_checkpointing_that_would_lose_its_gradient_names_the_cause_and_fix(reentrant, spec, match):
    net = TwoArgs(checkpointed=reentrant)
    kd = kdinpaint.attach(net, None, spec)
    image, mask = batch(2, 16)
    with pytest.raises(RuntimeError, match=match):
        pred = net(image, mask)
        ((pred - image).abs().mean() + kd.losses(image)["total"]).backward()
    kd.detach()


def test_eval_under_no_grad_is_not_mistaken_for_checkpointing():
    torch.manual_seed(0)
    student = TinyUNet()
    kd = kdinpaint.attach(student, kdinpaint.build_teacher(student), {"encoder_levels": LEVELS})
    image, mask = batch()
    with torch.no_grad():
        student(image, mask)
        assert torch.isfinite(kd.losses(image)["total"])
    kd.detach()

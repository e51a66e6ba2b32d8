"""Teacher helpers: a fresh copy of the student's architecture, and L1 autoencoder pre-training."""

import copy

import pytest
import torch
from tiny import TinyUNet, batch

import kdinpaint


def test_build_teacher_is_a_fresh_copy():
    torch.manual_seed(0)
    student = TinyUNet()
    teacher = kdinpaint.build_teacher(student)
    assert type(teacher) is TinyUNet and teacher is not student
    s_sd, t_sd = student.state_dict(), teacher.state_dict()
    assert list(s_sd) == list(t_sd)
    assert all(s_sd[k].shape == t_sd[k].shape for k in s_sd)
    assert not torch.equal(s_sd["down1.0.weight"], t_sd["down1.0.weight"])  # fresh weights


def test_pretrain_reduces_the_autoencoder_l1():
    torch.manual_seed(0)
    teacher = TinyUNet(width=8)
    image, _ = batch(4, 32, seed=1)
    smooth = torch.nn.functional.avg_pool2d(image, 5, 1, 2)  # something learnable in a few steps
    history = kdinpaint.pretrain(teacher, [smooth], steps=40, lr=3e-3)
    assert len(history) == 40
    # the first loss is an independent re-computation of L1(teacher(gt, empty mask), gt) at the initial weights
    torch.manual_seed(0)
    fresh = TinyUNet(width=8)
    with torch.no_grad():
        first = (fresh(smooth, torch.zeros_like(smooth[:, :1])) - smooth).abs().mean().item()
    assert abs(history[0] - first) < 1e-6
    assert sum(history[-5:]) / 5 < 0.6 * history[0]
    assert not teacher.training


class _OneTensorNet(TinyUNet):
    """TinyUNet called with one tensor, ``model(torch.cat([image, mask], 1))``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(x[:, :3], x[:, 3:])


def test_pretrain_calls_a_one_tensor_teacher_as_build_teacher_was_told():
    torch.manual_seed(0)
    student = _OneTensorNet(width=4)
    image, _ = batch(2, 32, seed=2)
    with pytest.raises(ValueError, match=r"input: concat.*build_teacher\(student, spec="):
        kdinpaint.pretrain(kdinpaint.build_teacher(student), [image], steps=1)
    teacher = kdinpaint.build_teacher(student, spec={"input": "concat"})
    before = copy.deepcopy(teacher)
    history = kdinpaint.pretrain(teacher, [image], steps=1)
    # the first loss, by hand: the teacher fed torch.cat([ground truth, empty mask], 1)
    with torch.no_grad():
        first = (before(torch.cat([image, torch.zeros_like(image[:, :1])], 1)) - image).abs().mean().item()
    assert abs(history[0] - first) < 1e-6

"""The reference network (Fig. 2) and its Table 3 variants."""

import pytest
import torch

import kdinpaint
from kdinpaint_adapters.reference import ReferenceNet
from tiny import batch

VARIANTS = ["baseline", "net1", "net2", "net3", "net4", "net5", "net6", "net7", "net8"]


def _count(module):
    return sum(p.numel() for p in module.parameters())


def test_default_size_and_parameter_matched_baseline():
    adapter = kdinpaint.get_adapter("reference")
    student = adapter.student()
    kd = kdinpaint.attach(student, adapter.teacher(), adapter.spec)
    deployed = _count(kd.export())  # what Net8 keeps at inference: backbone + attention + CB + PGL
    kd.detach()
    assert 12e6 < deployed < 14e6  # "about 13 M" (Table 2)
    baseline = _count(adapter.student("baseline"))
    assert abs(baseline - deployed) / deployed < 0.01


@pytest.mark.parametrize("variant", VARIANTS)
def test_each_variant_trains_one_step(variant):
    torch.manual_seed(0)
    adapter = kdinpaint.get_adapter("reference")
    spec = adapter.spec.variant(variant)
    student, teacher = adapter.student(variant, width=4), adapter.teacher(variant, width=4)
    kd = kdinpaint.attach(student, teacher if spec.needs_teacher or spec.self_distillation else None, spec)
    image, mask = batch(2, 32)
    opt = torch.optim.Adam([*student.parameters(), *kd.student_parameters()], lr=1e-3)
    pred = student(image * (1 - mask), mask)
    losses = kd.losses(target=image)
    loss = (pred - image).abs().mean() + 20 * losses["total"]
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    expect = {
        "baseline": dict(cross=False, self=False, att=False, blocks=0, fusion=0),
        "net1": dict(cross=True, self=False, att=False, blocks=0, fusion=0),
        "net2": dict(cross=False, self=True, att=False, blocks=0, fusion=0),
        "net3": dict(cross=True, self=True, att=False, blocks=0, fusion=0),
        "net4": dict(cross=True, self=True, att=False, blocks=3, fusion=0),
        "net5": dict(cross=False, self=False, att=False, blocks=3, fusion=0),
        "net6": dict(cross=True, self=True, att=False, blocks=3, fusion=0),
        "net7": dict(cross=True, self=True, att=True, blocks=3, fusion=0),
        "net8": dict(cross=True, self=True, att=True, blocks=3, fusion=3),
    }[variant]
    for term in ("cross", "self", "att"):
        assert (losses[term].item() > 0) == expect[term], term
    assert len(kd.blocks) == expect["blocks"] and len(kd.fusion) == expect["fusion"]
    has_attention = isinstance(student.att3, kdinpaint.PixelAttention)
    assert has_attention == (variant in ("net6", "net7", "net8"))
    kd.detach()


def test_size_not_divisible_by_the_stride_is_named():
    net = ReferenceNet(width=4)
    with pytest.raises(ValueError, match="divisible by 8"):
        net(torch.zeros(1, 3, 30, 32), torch.zeros(1, 1, 30, 32))

"""Images in [0, 1] (torchvision's ToTensor convention) are warned about; NaN batches never reach the teacher."""

import warnings

import pytest
import torch
from tiny import TinyUNet

import kdinpaint
from kdinpaint.masking import check_image_range


def test_a_unit_range_image_is_warned_and_a_signed_one_is_not():
    g = torch.Generator().manual_seed(0)
    with pytest.warns(UserWarning, match=r"inside \[0, 1\].*x \* 2 - 1"):
        check_image_range(torch.rand(1, 3, 8, 8, generator=g))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_image_range(torch.rand(1, 3, 8, 8, generator=g) * 2 - 1)
        check_image_range(torch.full((1, 3, 8, 8), 0.5))  # a flat bright image: no spread, no warning


def test_pretrain_refuses_a_nan_batch_naming_it():
    teacher = TinyUNet(width=4)
    good = torch.rand(2, 3, 16, 16) * 2 - 1
    bad = good.clone()
    bad[0, 0, 0, 0] = float("nan")
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    with pytest.raises(ValueError, match="pretrain batch 2"):
        kdinpaint.pretrain(teacher, [good, bad], steps=2)
    assert all(torch.isfinite(v).all() for v in teacher.state_dict().values())
    assert any(not torch.equal(before[k], v) for k, v in teacher.state_dict().items())  # batch 1 trained

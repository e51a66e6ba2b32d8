"""Files kdinpaint writes get the permissions the user's umask gives (safetensors alone would write 0600)."""

from __future__ import annotations

import os
import stat

import pytest
import torch
from tiny import LEVELS, TinyUNet

import kdinpaint
from kdinpaint._files import umask
from kdinpaint.train.runs import save_checkpoint


@pytest.fixture(params=[0o022, 0o077])
def user_umask(request):
    before = os.umask(request.param)
    yield request.param
    os.umask(before)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_umask_is_read_without_changing_it(user_umask):
    assert umask() == user_umask
    assert umask() == user_umask


def test_exported_model_and_checkpoint_files_follow_the_umask(tmp_path, user_umask):
    from accelerate import Accelerator

    expected = 0o666 & ~user_umask  # 0644 under the usual umask
    student = TinyUNet(width=4)
    kd = kdinpaint.attach(student, kdinpaint.build_teacher(student), {"encoder_levels": LEVELS})
    kdinpaint.save_exported(kd.export(), tmp_path / "student.safetensors")
    kd.detach()
    assert _mode(tmp_path / "student.safetensors") == expected

    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(torch.nn.Linear(2, 2))
    del model
    sched = torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD([torch.zeros(1, requires_grad=True)]), lambda s: 1.0)
    final = save_checkpoint(accelerator, tmp_path / "run", 3, keep=2, states={"schedule": sched})
    files = [p for p in final.rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in files)  # accelerate's model file and the trainer state
    assert {p.name: _mode(p) for p in files} == {p.name: expected for p in files}

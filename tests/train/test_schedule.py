"""optim.schedule: the theta learning rate follows the closed-form warm-up / cosine values step by step, the
inner SGD step of Algorithm 1 follows it, and a resumed run continues it exactly."""

import json
import math
from pathlib import Path

import pytest
import torch
from tiny import LEVELS, TinyUNet, batch

import kdinpaint
from kdinpaint.train.bilevel import MetaLearner
from kdinpaint.train.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[2]


def closed_form(k: int, schedule: str, warmup: int, total: int, min_ratio: float) -> float:
    """The learning rate of theta step k (0-based) relative to optim.lr, written out independently."""
    if k < warmup:
        return k / warmup
    if schedule == "constant":
        return 1.0
    return min_ratio + (1 - min_ratio) * (1 + math.cos(math.pi * (k - warmup) / (total - warmup))) / 2


@pytest.mark.slow
@pytest.mark.parametrize("schedule, warmup", [("constant", 0), ("constant", 4), ("cosine", 0), ("cosine", 3)])
def test_lr_after_k_steps_is_the_closed_form(schedule, warmup):
    total, lr = 20, 1e-3
    recipe = load_recipe(None, [f"optim.schedule={schedule}", f"optim.warmup_steps={warmup}", "optim.min_lr_ratio=0.1",
                                f"train.steps={total}", f"optim.lr={lr}"])
    torch.manual_seed(0)
    student = TinyUNet(width=4)
    image, mask = batch(2, 16)
    kd = kdinpaint.attach(student, kdinpaint.build_teacher(student), {"encoder_levels": LEVELS}, example_inputs=(image, mask))
    opt = torch.optim.Adam([*student.parameters(), *kd.student_parameters()], lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: recipe.optim.lr_factor(k, total))
    learner = MetaLearner(kd, opt, lambda p, t, m: (p - t).pow(2).mean(), mode="first_order", steps=2, scheduler=sched)
    for block in range(total // 2):
        k = 2 * block  # theta steps done before this batch
        expected = lr * closed_form(k, schedule, warmup, total, 0.1)
        assert opt.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-12, abs=1e-15)
        logs = learner.step((image * (1 - mask), mask), image)
        assert logs["lr"] == pytest.approx(expected, rel=1e-12, abs=1e-15)
        assert learner.inner_lr == pytest.approx(expected, rel=1e-12, abs=1e-15)  # alpha follows the schedule
    assert sched.last_epoch == total
    if schedule == "cosine":
        assert opt.param_groups[0]["lr"] == pytest.approx(lr * 0.1)
    kd.detach()


@pytest.mark.slow
def test_skipped_batches_advance_the_schedule_and_an_explicit_inner_lr_stays():
    recipe = load_recipe(None, ["optim.schedule=cosine", "train.steps=10"])
    torch.manual_seed(0)
    student = TinyUNet(width=4)
    image, mask = batch(2, 16)
    kd = kdinpaint.attach(student, kdinpaint.build_teacher(student), {"encoder_levels": LEVELS}, example_inputs=(image, mask))
    opt = torch.optim.Adam([*student.parameters(), *kd.student_parameters()], lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: recipe.optim.lr_factor(k, 10))
    learner = MetaLearner(kd, opt, lambda p, t, m: (p - t).pow(2).mean(), mode="first_order", steps=2, inner_lr=0.5,
                          scheduler=sched)
    with pytest.warns(RuntimeWarning, match="theta step skipped"):
        logs = learner.step((image * float("nan"), mask), image)
    assert logs["skipped"] == 1 and sched.last_epoch == 2
    learner.step((image * (1 - mask), mask), image)
    assert sched.last_epoch == 4 and learner.inner_lr == 0.5
    kd.detach()


def test_bad_schedule_keys_are_named():
    with pytest.raises(ValueError, match="not one of"):
        load_recipe(None, ["optim.schedule=linear"])
    with pytest.raises(ValueError, match=r"optim.warmup_steps must be >= 0"):
        load_recipe(None, ["optim.warmup_steps=-1"])
    with pytest.raises(ValueError, match=r"optim.min_lr_ratio must be in \[0, 1\]"):
        load_recipe(None, ["optim.min_lr_ratio=2"])
    with pytest.raises(ValueError, match="train.max_bad_steps must be >= 1"):
        load_recipe(None, ["train.max_bad_steps=0"])
    with pytest.raises(ValueError, match="train.explode_factor must be > 1"):
        load_recipe(None, ["train.explode_factor=1"])
    assert load_recipe(None, ["train.explode_factor=null"]).train.explode_factor is None
    reference = load_recipe(ROOT / "recipes" / "reference.yaml")
    assert reference.optim.schedule == "constant" and reference.optim.warmup_steps == 0  # the paper's setting


@pytest.mark.slow
def test_a_resumed_run_continues_the_schedule(tmp_path):
    """Killed after step 6, resumed from step 4: the same learning rates and the same final weights."""
    from safetensors.torch import load_file
    from training_helpers import TINY, train_child

    def train(run, *extra):
        return train_child(*TINY, f"checkpoint.dir={run}", "train.steps=8", "meta.steps=2", "checkpoint.every=4",
                           "optim.schedule=cosine", "optim.warmup_steps=3", "optim.lr=0.002", *extra, check=False)

    whole = train(tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed = train(tmp_path / "resumed", "--stop-after", "6")
    assert killed.returncode == 3, killed.stderr[-3000:]
    resumed = train(tmp_path / "resumed")
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout + resumed.stderr, resumed.stderr[-3000:]
    marks = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert {"step": 4, "resumed_from": "checkpoints/step_0000004"} in marks

    def lrs(run):
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        steps = [r["step"] for r in records if "lr" in r]
        assert len(steps) == len(set(steps))  # the killed run's records after its checkpoint were dropped on resume
        return {r["step"]: r["lr"] for r in records if "lr" in r}

    expected = {s: round(2e-3 * closed_form(s - 2, "cosine", 3, 8, 0.05), 6) for s in (2, 4, 6, 8)}
    assert lrs(tmp_path / "whole") == pytest.approx(expected) and lrs(tmp_path / "resumed") == lrs(tmp_path / "whole")
    a = load_file(str(tmp_path / "whole" / "student.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "student.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)

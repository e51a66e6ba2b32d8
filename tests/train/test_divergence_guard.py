"""The divergence guard of Algorithm 1: bad theta steps are skipped with a warning naming the term, parameters
stay as they were, training goes on; too many in a row raise TrainingDiverged; recipes/train.py reports it."""

import json
import math
from pathlib import Path

import pytest
import torch
from tiny import LEVELS, TinyUNet, batch

import kdinpaint
from kdinpaint.train.bilevel import DivergenceGuard, MetaLearner, TrainingDiverged

ROOT = Path(__file__).resolve().parents[2]


class FaultyLoss:
    """MSE whose value (``nan``, a factor) or gradient (``nan_grad``) can be spoiled for the next calls."""

    def __init__(self) -> None:
        self.nan = False
        self.nan_grad = False
        self.factor = 1.0

    def __call__(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.nan_grad:
            pred = pred + 0.0
            pred.register_hook(lambda g: torch.full_like(g, float("nan")))  # finite value, NaN gradient
        loss = (pred - target).pow(2).mean() * self.factor
        return loss * float("nan") if self.nan else loss


def _learner(mode: str = "reverse_hg", **kwargs):
    torch.manual_seed(0)
    student = TinyUNet(width=4)
    teacher = kdinpaint.build_teacher(student)
    image, mask = batch(2, 16)
    kd = kdinpaint.attach(student, teacher, {"encoder_levels": LEVELS}, example_inputs=(image, mask))
    loss = FaultyLoss()
    theta = [*student.parameters(), *kd.student_parameters()]
    learner = MetaLearner(kd, torch.optim.Adam(theta, lr=1e-3), loss, mode=mode, steps=2, meta_lr=1e-2, **kwargs)
    return learner, kd, loss, (image * (1 - mask), mask), image


def _state(kd) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in kd.named_parameters()}


def _same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[n], b[n]) for n in a)


@pytest.mark.parametrize("mode", ["reverse_hg", "frozen"])
def test_a_nan_step_is_skipped_and_training_goes_on(mode):
    learner, kd, loss, inputs, gt = _learner(mode)
    assert learner.step(inputs, gt)["skipped"] == 0
    before = _state(kd)
    loss.nan = True
    with pytest.warns(RuntimeWarning, match=r"loss_inp is NaN; theta step skipped \(1/5"):
        logs = learner.step(inputs, gt)
    assert logs["skipped"] == 1 and logs["skipped_term"] == "loss_inp" and math.isnan(logs["loss_inp"])
    assert _same(before, _state(kd))  # neither theta nor Psi moved
    assert all(p.grad is None for p in kd.parameters())
    loss.nan = False
    logs = learner.step(inputs, gt)
    assert logs["skipped"] == 0 and not _same(before, _state(kd))
    assert learner.guard.bad_streak == 0 and learner.guard.skipped_total == 1
    kd.detach()


def test_a_bad_distillation_term_and_gradient_are_named():
    learner, kd, loss, inputs, gt = _learner()
    learner.step(inputs, gt)
    gamma = next(p for n, p in kd.named_parameters() if n.startswith("gamma.") and n.endswith("weight"))
    saved = gamma.detach().clone()
    with torch.no_grad():
        gamma.fill_(float("nan"))  # a broken meta-network: L_inp is fine, the cross-distillation term is not
    with pytest.warns(RuntimeWarning, match=r"kd/cross/down\d is NaN"):
        logs = learner.step(inputs, gt)
    assert logs["skipped_term"].startswith("kd/cross/") and math.isfinite(logs["loss_inp"])
    with torch.no_grad():
        gamma.copy_(saved)
    before = _state(kd)
    loss.nan_grad = True
    with pytest.warns(RuntimeWarning, match="grad_norm is NaN"):
        logs = learner.step(inputs, gt)
    assert logs["skipped_term"] == "grad_norm" and math.isfinite(logs["loss_total"])
    assert _same(before, _state(kd))  # a NaN gradient is never applied
    kd.detach()


def test_nan_on_every_step_raises_training_diverged():
    learner, kd, loss, inputs, gt = _learner(max_bad_steps=3)
    before = _state(kd)
    loss.nan = True
    with pytest.warns(RuntimeWarning, match="theta step skipped"):
        with pytest.raises(TrainingDiverged, match=r"3 consecutive batches skipped.*loss_inp is NaN.*optim.lr") as info:
            for _ in range(10):
                learner.step(inputs, gt)
    assert info.value.term == "loss_inp" and info.value.batch == 3 and info.value.bad_steps == 3
    assert info.value.logs["skipped"] == 1
    assert isinstance(info.value, RuntimeError) and kdinpaint.TrainingDiverged is TrainingDiverged
    assert _same(before, _state(kd))
    kd.detach()


def test_an_exploding_loss_is_detected():
    learner, kd, loss, inputs, gt = _learner("first_order")
    for _ in range(6):  # 12 theta steps recorded: past the warm-up of 10
        assert learner.step(inputs, gt)["skipped"] == 0
    before = _state(kd)
    loss.factor = 1e6
    with pytest.warns(RuntimeWarning, match=r"loss_total \S+ is \d+x its recent median"):
        logs = learner.step(inputs, gt)
    assert logs["skipped"] == 1 and logs["skipped_term"] == "loss_total"
    assert _same(before, _state(kd))
    loss.factor = 1.0
    assert learner.step(inputs, gt)["skipped"] == 0
    kd.detach()


def test_no_guard_applies_every_step_and_a_bad_guard_config_is_named():
    learner, kd, loss, inputs, gt = _learner("frozen", guard=False)
    loss.nan = True
    logs = learner.step(inputs, gt)
    assert "skipped" not in logs and any(p.isnan().any() for p in kd.parameters())
    kd.detach()
    with pytest.raises(ValueError, match="max_bad_steps must be >= 1"):
        DivergenceGuard(max_bad_steps=0)
    with pytest.raises(ValueError, match="explode_factor must be > 1"):
        DivergenceGuard(explode_factor=0.5)


def test_guard_state_round_trips():
    guard = DivergenceGuard(max_bad_steps=2, warmup=2)
    for v in (1.0, 2.0, 3.0):
        guard.record(v)
    with pytest.warns(RuntimeWarning):
        guard.end_batch(("loss_inp", "loss_inp is NaN"), {})
    other = DivergenceGuard(max_bad_steps=2, warmup=2)
    other.load_state_dict(guard.state_dict())
    assert other.state_dict() == guard.state_dict() and other.bad_streak == 1
    assert other.exploded("loss_total", 1000.0, other.history) is not None
    with pytest.raises(TrainingDiverged):
        other.end_batch(("loss_inp", "loss_inp is NaN"), {})


@pytest.mark.slow
def test_train_py_reports_a_diverged_run(tmp_path):
    """NaN images from step 5 on (an InjectNaN callback): exit 2, report.md/json say diverged, the checkpoint
    at step 4 stays, nothing is exported, metrics.jsonl records the skips."""
    from training_helpers import TINY, train_child

    run = tmp_path / "run"
    proc = train_child(*TINY, f"checkpoint.dir={run}", "train.steps=12", "meta.steps=2", "checkpoint.every=2",
                       "checkpoint.keep=5", "train.max_bad_steps=2", "--inject-nan-at", "5", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert "DIVERGED" in out and "loss_inp is NaN" in out
    assert "DIVERGED" in (run / "report.md").read_text()
    report = json.loads((run / "report.json").read_text())
    assert report["diverged"] is True and report["step"] == 8 and "loss_inp is NaN" in report["message"]
    assert [p.name for p in sorted((run / "checkpoints").glob("step_*"))] == ["step_0000002", "step_0000004"]
    assert not (run / "student.safetensors").exists()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 6, 8]
    assert records[1]["skipped"] == 0 and records[2]["skipped"] == 1 and records[2]["skipped_term"] == "loss_inp"
    assert records[2]["loss_inp"] is None  # non-finite values are null, next to the recorded skip
    assert records[3]["diverged"] is True

"""Algorithm 1: the Reverse-HG hypergradient against central finite differences, and the three modes."""

import copy

import pytest
import torch
from tiny import LEVELS, TinyAttentionUNet, batch

import kdinpaint
from kdinpaint.train.bilevel import MetaLearner

SPEC = {"encoder_levels": LEVELS, "attention_sites": [{"module": "att", "fusion": True}]}


def _mse(pred, target, mask):
    return (pred - target).pow(2).mean()


def _setup(dtype=torch.float64, size=16):
    torch.manual_seed(0)
    student = TinyAttentionUNet(width=4).to(dtype)
    teacher = kdinpaint.build_teacher(student)
    image, mask = batch(2, size)
    image, mask = image.to(dtype), mask.to(dtype)
    kd = kdinpaint.attach(student, teacher, SPEC, example_inputs=(image, mask))
    with torch.no_grad():  # generic values everywhere (several meta-networks start at zero)
        for p in kd.meta_parameters():
            p.add_(torch.randn_like(p) * 0.3)
        for block in kd.blocks.values():
            block.conv.f_ker.weight.normal_(0, 0.2)
    return student, kd, image * (1 - mask), mask, image


def _unrolled_inpaint_loss(student, kd, theta, inputs, target, alpha, steps, precondition=None):
    """f(Psi) = L_inp(theta_T): T plain SGD steps on L_tot from `theta`, written out independently
    (``precondition``: a constant per-parameter factor on each gradient, in ``theta``'s order)."""
    params = [p for p in theta]
    with torch.no_grad():
        saved = [p.clone() for p in params]
    try:
        for _ in range(steps):
            out = student(*inputs)
            total = _mse(out, target, None) + 20.0 * kd.losses(target=target)["total"]
            grads = torch.autograd.grad(total, params, allow_unused=True)
            with torch.no_grad():
                for i, (p, g) in enumerate(zip(params, grads)):
                    if g is not None:
                        p -= alpha * g * (1 if precondition is None else precondition[i])
        with torch.no_grad():
            out = student(*inputs)
            kd._session.reset()
            return _mse(out, target, None).item()
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)


def _central_difference(kd, direction, loss, eps=1e-5):
    """``(loss(Psi + eps u) - loss(Psi - eps u)) / (2 eps)`` along ``direction`` (Psi restored afterwards)."""
    psi = dict(kd.named_parameters())

    def at(sign):
        with torch.no_grad():
            for n, u in direction.items():
                psi[n].add_(sign * eps * u)
        try:
            return loss()
        finally:
            with torch.no_grad():
                for n, u in direction.items():
                    psi[n].sub_(sign * eps * u)

    return (at(+1) - at(-1)) / (2 * eps)


def _random_direction(kd, names, seed):
    psi = dict(kd.named_parameters())
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(psi[n].shape, generator=g, dtype=torch.float64) for n in names}


@pytest.mark.slow
@pytest.mark.parametrize("steps", [1, 2])
def test_reverse_hg_equals_central_finite_differences(steps):
    student, kd, masked, mask, gt = _setup()
    theta = [*student.parameters(), *kd.student_parameters()]
    opt = torch.optim.SGD(theta, lr=0.01)
    learner = MetaLearner(kd, opt, _mse, mode="reverse_hg", steps=steps)
    theta0 = {n: p.detach().clone() for n, p in kd.named_parameters() if n in learner._theta_names}
    hyper = learner.hypergradient(theta0, (masked, mask), {}, gt)
    assert set(hyper) == set(learner._psi_names) and any(n.startswith("t.") for n in hyper)

    direction = _random_direction(kd, hyper, 1)
    unrolled = lambda: _unrolled_inpaint_loss(student, kd, theta, (masked, mask), gt, 0.01, steps)  # noqa: E731
    fd = _central_difference(kd, direction, unrolled)
    analytic = sum((hyper[n] * u).sum() for n, u in direction.items()).item()
    assert abs(fd) > 1e-8  # the meta-networks do move L_inp
    assert analytic == pytest.approx(fd, rel=1e-5, abs=1e-10)
    if steps == 1:
        kd.detach()
        return
    # per meta-network too (gamma, rho, phi, t each)
    for prefix in ("gamma.", "rho.", "phi.", "t."):
        sub = {n: u for n, u in direction.items() if n.startswith(prefix)}
        fd_sub = _central_difference(kd, sub, unrolled)
        an_sub = sum((hyper[n] * u).sum() for n, u in sub.items()).item()
        assert an_sub == pytest.approx(fd_sub, rel=1e-4, abs=1e-9), prefix
    kd.detach()


@pytest.mark.slow
def test_adam_preconditioned_unroll_equals_finite_differences():
    """With Adam, each unrolled step is ``alpha * g / (sqrt(v_hat) + eps)`` with Adam's own state held fixed."""
    student, kd, masked, mask, gt = _setup()
    theta = [*student.parameters(), *kd.student_parameters()]
    opt = torch.optim.Adam(theta, lr=1e-3, eps=1e-6)
    learner = MetaLearner(kd, opt, _mse, mode="reverse_hg", steps=2, guard=False)
    assert learner.inner_step == "adam"
    for _ in range(2):  # some Adam state, then the theta the hypergradient starts from
        learner.step((masked, mask), gt)
    out = student(masked, mask)  # the batch's first gradient, which Adam folds into v before its step
    g0 = torch.autograd.grad(_mse(out, gt, None) + 20.0 * kd.losses(target=gt)["total"], theta, allow_unused=True)
    precondition = []
    for p, g in zip(theta, g0):  # Adam's v_hat, bias-corrected, computed here from the state by hand
        st = opt.state[p]
        g = torch.zeros_like(p) if g is None else g
        v = 0.999 * st["exp_avg_sq"] + 0.001 * g * g
        v_hat = v / (1 - 0.999 ** (float(st["step"]) + 1))
        precondition.append(1 / (v_hat.sqrt() + 1e-6))
    theta0 = {n: p.detach().clone() for n, p in kd.named_parameters() if n in learner._theta_names}
    hyper = learner.hypergradient(theta0, (masked, mask), {}, gt)
    assert set(theta0) == set(learner._theta_names) and len(theta0) == len(theta)  # precondition's order is theta's

    direction = _random_direction(kd, hyper, 2)
    fd = _central_difference(
        kd, direction, lambda: _unrolled_inpaint_loss(student, kd, theta, (masked, mask), gt, 1e-3, 2, precondition)
    )
    analytic = sum((hyper[n] * u).sum() for n, u in direction.items()).item()
    assert abs(fd) > 1e-8
    assert analytic == pytest.approx(fd, rel=1e-5, abs=1e-10)
    # the plain unroll gives another value: the preconditioner is really applied
    plain = MetaLearner(kd, opt, _mse, mode="reverse_hg", steps=2, inner_step="sgd", guard=False)
    other = plain.hypergradient(theta0, (masked, mask), {}, gt)
    assert not all(torch.allclose(other[n], hyper[n]) for n in hyper)
    kd.detach()


def test_inner_step_choices_are_checked():
    student, kd, *_ = _setup()
    theta = [*student.parameters(), *kd.student_parameters()]
    with pytest.raises(ValueError, match="inner_step='sgd'"):
        MetaLearner(kd, torch.optim.SGD(theta, lr=0.1), _mse, inner_step="adam")
    with pytest.raises(ValueError, match="not one of"):
        MetaLearner(kd, torch.optim.SGD(theta, lr=0.1), _mse, inner_step="rmsprop")
    assert MetaLearner(kd, torch.optim.SGD(theta, lr=0.1), _mse).inner_step == "sgd"
    kd.detach()


def test_first_order_equals_reverse_hg_for_one_step_and_differs_for_two():
    student, kd, masked, mask, gt = _setup()
    theta = [*student.parameters(), *kd.student_parameters()]
    theta0 = {n: p.detach().clone() for n, p in kd.named_parameters()}
    results = {}
    for mode in ("reverse_hg", "first_order"):
        for steps in (1, 2):
            learner = MetaLearner(kd, torch.optim.SGD(theta, lr=0.01), _mse, mode=mode, steps=steps)
            t0 = {n: theta0[n] for n in learner._theta_names}
            results[mode, steps] = learner.hypergradient(t0, (masked, mask), {}, gt)
    for n in results["reverse_hg", 1]:
        torch.testing.assert_close(results["first_order", 1][n], results["reverse_hg", 1][n])
    diff = sum((results["first_order", 2][n] - results["reverse_hg", 2][n]).abs().sum() for n in results["reverse_hg", 2])
    assert diff > 0
    kd.detach()


@pytest.mark.parametrize("mode", ["reverse_hg", "first_order"])
def test_fused_first_step_gives_the_same_updates(mode):
    # the first ordinary step doubling as the unroll's first step must change nothing: same theta after the
    # Adam steps, same hypergradient (the unfused path is the one checked against finite differences)
    student, kd, masked, mask, gt = _setup()
    start = {k: v.clone() for k, v in kd.state_dict().items()}
    after = {}
    for fuse in (False, True):
        kd.load_state_dict(start)
        theta = [*student.parameters(), *kd.student_parameters()]
        meta_opt = torch.optim.SGD(kd.meta_parameters(), lr=1.0)
        learner = MetaLearner(kd, torch.optim.Adam(theta, lr=1e-3), _mse, meta_opt, mode=mode, steps=2,
                              inner_lr=0.01, max_hypergrad_norm=None, fuse_first_step=fuse)
        logs = learner.step((masked, mask), gt)
        after[fuse] = ({k: v.clone() for k, v in kd.state_dict().items()}, logs)
    (plain, plain_logs), (fused, fused_logs) = after[False], after[True]
    assert fused_logs["hypergrad_norm"] == pytest.approx(plain_logs["hypergrad_norm"], rel=1e-9)
    for k in plain:
        torch.testing.assert_close(fused[k], plain[k], rtol=1e-9, atol=1e-12, msg=lambda m: f"{k}: {m}")
    assert any(not torch.equal(start[k], plain[k]) for k in start if k.startswith("gamma."))
    kd.detach()


def test_step_modes():
    student, kd, masked, mask, gt = _setup(torch.float32, 16)
    theta = [*student.parameters(), *kd.student_parameters()]
    before_psi = [p.detach().clone() for p in kd.meta_parameters()]
    before_theta = [p.detach().clone() for p in theta]
    frozen = MetaLearner(kd, torch.optim.Adam(theta, lr=1e-3), _mse, mode="frozen")
    logs = frozen.step((masked, mask), gt)
    assert all(torch.equal(a, b) for a, b in zip(before_psi, kd.meta_parameters()))  # Psi bit-identical
    assert any(not torch.equal(a, b) for a, b in zip(before_theta, theta))
    assert {"loss_inp", "loss_total", "kd/total"} <= set(logs)
    learner = MetaLearner(kd, torch.optim.Adam(theta, lr=1e-3), _mse, mode="reverse_hg", meta_lr=1e-2)
    logs = learner.step((masked, mask), gt)
    assert logs["hypergrad_norm"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(before_psi, kd.meta_parameters()))
    kd.detach()


def test_every_k_th_batch_steps_psi_and_the_others_are_frozen_steps():
    """meta.every = 3: Psi moves on batches 0 and 3 only; a batch between them is exactly a frozen batch
    (same theta after it as a ``frozen`` learner from the same state and optimiser state)."""
    student, kd, masked, mask, gt = _setup(torch.float64, 16)
    theta = [*student.parameters(), *kd.student_parameters()]
    opt = torch.optim.Adam(theta, lr=1e-3)
    learner = MetaLearner(kd, opt, _mse, mode="reverse_hg", steps=2, every=3, meta_lr=1e-2)
    psi_moved, logged = [], []
    for b in range(5):
        psi = [p.detach().clone() for p in kd.meta_parameters()]
        if b == 1:  # replay the next (non-due) batch with a frozen learner from the same state
            state, opt_state = {k: v.clone() for k, v in kd.state_dict().items()}, copy.deepcopy(opt.state_dict())
            twin_opt = torch.optim.Adam(theta, lr=1e-3)
            twin_opt.load_state_dict(opt_state)
            MetaLearner(kd, twin_opt, _mse, mode="frozen", steps=2).step((masked, mask), gt)
            frozen_theta = [p.detach().clone() for p in theta]
            kd.load_state_dict(state)
        logs = learner.step((masked, mask), gt)
        if b == 1:
            assert all(torch.equal(a, p) for a, p in zip(frozen_theta, theta))
        psi_moved.append(any(not torch.equal(a, p) for a, p in zip(psi, kd.meta_parameters())))
        logged.append("hypergrad_norm" in logs)
    assert psi_moved == [True, False, False, True, False] and logged == psi_moved
    assert learner.batches == 5
    with pytest.raises(ValueError, match="every"):
        MetaLearner(kd, opt, _mse, every=0)
    kd.detach()


def test_reverse_hg_under_bf16_autocast():
    """The ordinary steps under bf16 autocast cache the teacher's features in bf16; the hypergradient, in the
    parameters' float32, reads them (the meta-networks' float32 convolutions refused bf16 input)."""
    student, kd, masked, mask, gt = _setup(torch.float32, 16)
    theta = [*student.parameters(), *kd.student_parameters()]
    learner = MetaLearner(kd, torch.optim.Adam(theta, lr=1e-3), _mse, mode="reverse_hg", meta_lr=1e-2,
                          autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    before = [p.detach().clone() for p in kd.meta_parameters()]
    logs = learner.step((masked, mask), gt)
    assert logs["hypergrad_norm"] > 0 and logs["meta_skipped"] == 0
    assert all(p.dtype == torch.float32 for p in kd.meta_parameters())
    assert any(not torch.equal(a, p) for a, p in zip(before, kd.meta_parameters()))
    kd.detach()


def test_bad_configuration_is_named():
    student, kd, masked, mask, gt = _setup(torch.float32)
    with pytest.raises(ValueError, match="not one of"):
        MetaLearner(kd, torch.optim.SGD(student.parameters(), lr=0.1), _mse, mode="reversehg")
    with pytest.raises(ValueError, match="holds .* meta-parameter"):
        MetaLearner(kd, torch.optim.SGD([*student.parameters(), *kd.meta_parameters()], lr=0.1), _mse)
    kd.detach()


def _live_tensors() -> int:
    import gc
    import warnings

    gc.collect()
    with warnings.catch_warnings():  # touching every object trips deprecated aliases
        warnings.simplefilter("ignore")
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


@pytest.mark.slow
def test_no_tensor_leak_over_200_iterations():
    """The full loop (attention transfer, PGL, reverse_hg) keeps the number of live tensors flat."""
    student, kd, masked, mask, gt = _setup(torch.float32, 16)
    theta = [*student.parameters(), *kd.student_parameters()]
    learner = MetaLearner(kd, torch.optim.Adam(theta, lr=1e-4), _mse, mode="reverse_hg", meta_lr=1e-4)
    counts = []
    for i in range(200):
        learner.step((masked, mask), gt)
        if i in (19, 199):
            counts.append(_live_tensors())
    assert counts[1] <= counts[0] + 5, counts
    assert not kd._session.student and not kd._session.teacher and kd._teacher_cache is None
    kd.detach()


def test_a_theta_optimiser_without_the_added_parameters_is_refused():
    from tiny import LEVELS, TinyUNet

    import kdinpaint

    torch.manual_seed(0)
    student, teacher = TinyUNet(), TinyUNet()
    kd = kdinpaint.attach(student, teacher, {"encoder_levels": LEVELS})
    with pytest.raises(ValueError, match="lacks .* added parameter.*kd.student_parameters"):
        MetaLearner(kd, torch.optim.Adam(student.parameters()), lambda out, t, m: (out - t).abs().mean())
    MetaLearner(kd, torch.optim.Adam([*student.parameters(), *kd.student_parameters()]), lambda out, t, m: (out - t).abs().mean())
    kd.detach()

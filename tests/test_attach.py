"""attach / Distiller: hooks, Eq. (2), (3), (5) end to end against naive re-computation, detach, errors."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from tiny import LEVELS, TinyUNet, batch

import kdinpaint


def _pair(seed=0, **kw):
    torch.manual_seed(seed)
    student = TinyUNet(**kw)
    teacher = kdinpaint.build_teacher(student)
    return student, teacher


def _perturb_blocks(kd, scale=0.3):
    """Give the completion blocks non-zero kernels and offsets so that they matter in the checks."""
    with torch.no_grad():
        for block in kd.blocks.values():
            block.conv.f_ker.weight.normal_(0, scale)
            block.conv.f_off.weight.normal_(0, scale)


def _encoder_naive(model, image, mask, blocks=None):
    """x_1..x_3 of TinyUNet by hand, with Eq. (5) applied by hand when blocks are given."""
    feats = []
    x = model.stem(torch.cat([image * (1 - mask), mask], 1))
    for i, name in enumerate(LEVELS):
        x = getattr(model, name)(x)
        if blocks is not None:
            m = F.max_pool2d(mask, mask.shape[-1] // x.shape[-1])
            x = x + blocks[str(i)].conv(x) * m
        feats.append(x)
    return feats


def _no_hooks(model):
    return all(
        not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks for m in model.modules()
    )


def test_cross_and_self_distillation_match_the_equations():
    student, teacher = _pair()
    image, mask = batch()
    kd = kdinpaint.attach(student, teacher, {"encoder_levels": LEVELS})
    _perturb_blocks(kd)
    with torch.no_grad():  # non-trivial meta-networks too
        for mod in list(kd.rho.values()) + list(kd.phi.values()):
            mod.fc2.weight.normal_(0, 0.5)
    student(image, mask)
    got = kd.losses(target=image)
    kd.detach()  # the naive re-computation below calls submodules directly, without hooks

    xs = _encoder_naive(student, image, mask, kd.blocks)
    ts = _encoder_naive(teacher, image, torch.zeros_like(mask))
    cross_total, self_total = 0.0, 0.0
    for l in range(3):
        m = F.max_pool2d(mask, mask.shape[-1] // xs[l].shape[-1])
        g = kd.gamma[str(l)](ts[l])
        rho = kd.rho[str(l)](ts[l])
        assert torch.allclose(rho.sum(1), torch.ones(2)) and (rho >= 0).all()
        term = 0.0
        for b in range(2):
            for c in range(xs[l].shape[1]):
                term += rho[b, c] * (((xs[l][b, c] - g[b, c]) * m[b, 0]) ** 2).sum()
        term = term / m.sum()
        torch.testing.assert_close(got[f"cross/{LEVELS[l]}"], term, rtol=1e-5, atol=1e-7)
        cross_total += term
    for l in range(2):
        m = F.max_pool2d(mask, mask.shape[-1] // xs[l + 1].shape[-1])
        f = kd.align[str(l)](xs[l])
        phi = kd.phi[str(l)](ts[l + 1])  # phi reads the teacher's deeper feature
        term = sum(
            phi[b, c] * (((f[b, c] - xs[l + 1][b, c]) * m[b, 0]) ** 2).sum()
            for b in range(2)
            for c in range(f.shape[1])
        ) / m.sum()
        torch.testing.assert_close(got[f"self/{LEVELS[l]}"], term, rtol=1e-5, atol=1e-7)
        self_total += term
    torch.testing.assert_close(got["total"], cross_total + self_total, rtol=1e-5, atol=1e-7)


def test_completion_blocks_act_inside_the_users_call():
    student, teacher = _pair()
    image, mask = batch()
    plain = student(image, mask)
    kd = kdinpaint.attach(student, teacher, {"encoder_levels": LEVELS})
    torch.testing.assert_close(student(image, mask), plain)  # fresh blocks are the identity
    _perturb_blocks(kd)
    hooked = student(image, mask=mask)  # mask by keyword works too
    assert not torch.allclose(hooked, plain)
    kd.losses(target=image)
    kd.detach()


def test_gradients_reach_student_and_meta_networks():
    student, teacher = _pair()
    image, mask = batch()
    kd = kdinpaint.attach(student, teacher, {"encoder_levels": LEVELS})
    _perturb_blocks(kd)
    student(image, mask)
    kd.losses(target=image)["total"].backward()
    assert student.down1[0].weight.grad.abs().sum() > 0
    assert student.down3[0].weight.grad.abs().sum() > 0
    for name in ("gamma", "rho", "phi", "blocks", "align"):
        grads = [p.grad for p in getattr(kd, name).parameters()]
        assert any(g is not None and g.abs().sum() > 0 for g in grads), name
    assert all(p.grad is None for p in teacher.parameters())
    theta = {id(p) for p in kd.student_parameters()}
    psi = {id(p) for p in kd.meta_parameters()}
    assert not theta & psi and not theta & {id(p) for p in student.parameters()}
    kd.detach()


def test_self_distillation_target_gets_no_gradient():
    student, _ = _pair()
    image, mask = batch()
    spec = {"encoder_levels": LEVELS, "cross_distillation": False, "completion_sites": []}
    kd = kdinpaint.attach(student, None, spec)  # self-distillation alone needs no teacher
    student(image, mask)
    loss = kd.losses()["self/down2"]  # f_2(x_2) vs x_3: x_3 is the target
    loss.backward()
    assert student.down3[0].weight.grad is None or student.down3[0].weight.grad.abs().sum() == 0
    assert student.down2[0].weight.grad.abs().sum() > 0
    kd.detach()


def test_no_hole_gives_exact_zero_and_finite_gradients():
    student, teacher = _pair()
    image, _ = batch()
    mask = torch.zeros(2, 1, 32, 32)
    kd = kdinpaint.attach(student, teacher, {"encoder_levels": LEVELS})
    student(image, mask)
    losses = kd.losses(target=image)
    for key, value in losses.items():
        assert value.item() == 0.0, key
    losses["total"].backward()
    for p in list(kd.parameters()):
        assert p.grad is None or torch.isfinite(p.grad).all()
    kd.detach()


def test_detach_restores_the_model_exactly():
    student, teacher = _pair(norm=True)
    image, mask = batch()
    student.eval()
    before_out = student(image, mask)
    before_sd = {k: v.clone() for k, v in student.state_dict().items()}
    t_flags = [p.requires_grad for p in teacher.parameters()]
    kd = kdinpaint.attach(student, teacher, {"encoder_levels": LEVELS})
    assert list(student.state_dict()) == list(before_sd)
    assert all(not p.requires_grad for p in teacher.parameters())
    _perturb_blocks(kd)
    student.train()
    student(image, mask)
    kd.losses(target=image)
    student.eval()
    kd.detach()
    assert _no_hooks(student) and _no_hooks(teacher)
    assert [p.requires_grad for p in teacher.parameters()] == t_flags
    # state_dict identical except BatchNorm running stats, which the training forward updated as it would
    for k, v in student.state_dict().items():
        if "running" not in k and "num_batches" not in k:
            assert torch.equal(v, before_sd[k]), k
    student.load_state_dict(before_sd)
    assert torch.equal(student(image, mask), before_out)


def test_probe_leaves_batchnorm_statistics_alone():
    student, teacher = _pair(norm=True)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    kd = kdinpaint.attach(student, teacher, {"encoder_levels": LEVELS})
    for k, v in student.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert student.training
    kd.detach()


class _Exploding(TinyUNet):
    boom = False

    def forward(self, image, mask):
        if self.boom:
            self.down2(self.down1(self.stem(torch.cat([image, mask], 1))))  # the levels fire, then it fails
            raise RuntimeError("boom after down2")
        return super().forward(image, mask)


def test_no_hook_left_after_an_exception_mid_forward():
    torch.manual_seed(0)
    student = _Exploding()
    teacher = kdinpaint.build_teacher(student)
    image, mask = batch()
    with pytest.raises(RuntimeError, match="boom"):
        with kdinpaint.attach(student, teacher, {"encoder_levels": LEVELS}) as kd:
            student.boom = True
            student(image, mask)
    assert not kd.attached and _no_hooks(student) and _no_hooks(teacher)
    student.boom = False
    # and the Distiller recovers if it stays attached
    kd = kdinpaint.attach(student, teacher, {"encoder_levels": LEVELS})
    student.boom = True
    with pytest.raises(RuntimeError):
        student(image, mask)
    student.boom = False
    student(image, mask)
    assert torch.isfinite(kd.losses(target=image)["total"])
    kd.detach()


def test_features_are_released_after_losses():
    student, teacher = _pair()
    image, mask = batch()
    kd = kdinpaint.attach(student, teacher, {"encoder_levels": LEVELS})
    student(image, mask)
    kd.losses(target=image)
    s = kd._session
    assert not s.student and not s.teacher and s.mask is None and s.call is None
    with pytest.raises(RuntimeError, match="before kd.losses"):
        kd.losses(target=image)
    kd.detach()


def test_teacher_stays_frozen_in_eval():
    student, teacher = _pair()
    kd = kdinpaint.attach(student, teacher, {"encoder_levels": LEVELS})
    kd.train()
    assert student.training and not teacher.training
    kd.detach()


def test_eval_and_no_grad():
    student, teacher = _pair()
    image, mask = batch()
    kd = kdinpaint.attach(student, teacher, {"encoder_levels": LEVELS})
    student.eval()
    with torch.no_grad():
        student(image, mask)
        losses = kd.losses(target=image)
    assert not losses["total"].requires_grad and losses["total"] > 0
    kd.detach()


class _InplaceNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, 2, 1)
        self.act = nn.ReLU(inplace=True)
        self.out = nn.Conv2d(4, 3, 1)

    def forward(self, image, mask):
        x = self.act(self.conv(torch.cat([image, mask], 1)))
        return self.out(x)


@pytest.mark.parametrize("clone", [False, True])
def test_in_place_activation_after_a_tap(clone):
    torch.manual_seed(0)
    net = _InplaceNet()
    image, mask = batch()
    kd = kdinpaint.attach(net, None, {"encoder_levels": ["conv"], "completion_sites": [], "cross_distillation": False, "clone_taps": clone})
    net(image, mask)
    tapped = kd._session.student["conv"]
    # without clone the in-place ReLU overwrote the tapped tensor; clone_taps keeps the pre-activation value
    assert bool((tapped < 0).any()) == clone
    kd.detach()


def test_works_with_a_ddp_wrapped_student(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        student, teacher = _pair()
        ddp = nn.parallel.DistributedDataParallel(student)
        image, mask = batch()
        for levels in (LEVELS, [f"module.{p}" for p in LEVELS]):
            kd = kdinpaint.attach(ddp, teacher, {"encoder_levels": levels})
            _perturb_blocks(kd)
            out = ddp(image, mask)
            losses = kd.losses(target=image)
            (out.mean() + losses["total"]).backward()
            assert student.down1[0].weight.grad is not None
            assert losses["total"] > 0
            kd.detach()
            assert _no_hooks(student)
    finally:
        dist.destroy_process_group()


def test_custom_mask_argument_name():
    class Net(TinyUNet):
        def forward(self, x, holes):
            return super().forward(x, holes)

    torch.manual_seed(0)
    net = Net()
    image, mask = batch()
    kd = kdinpaint.attach(net, kdinpaint.build_teacher(net), {"encoder_levels": LEVELS, "mask_arg": "holes"})
    net(image, holes=mask)
    assert kd.losses(target=image)["total"] > 0
    kd.detach()


# ---- bad input ---------------------------------------------------------------------------------
def test_wrong_path_lists_closest_names():
    student, teacher = _pair()
    with pytest.raises(ValueError, match="no module 'dwn1'.*down1"):
        kdinpaint.attach(student, teacher, {"encoder_levels": ["dwn1", "down2"]})
    with pytest.raises(ValueError, match="glob 'enc.\\*' matches no module"):
        kdinpaint.attach(student, teacher, {"encoder_levels": ["enc.*"]})
    assert _no_hooks(student)


def test_glob_expands_in_module_order():
    student, teacher = _pair()
    kd = kdinpaint.attach(student, teacher, {"encoder_levels": ["down?"]})
    assert kd.levels == LEVELS
    kd.detach()


class _Unused(TinyUNet):
    def __init__(self):
        super().__init__()
        self.spare = nn.Conv2d(8, 8, 3, 1, 1)


def test_tap_that_never_fires():
    torch.manual_seed(0)
    net = _Unused()
    with pytest.raises(ValueError, match="'spare'.* never ran"):
        kdinpaint.attach(net, kdinpaint.build_teacher(net), {"encoder_levels": ["down1", "spare"]})
    assert _no_hooks(net)


class _Twice(TinyUNet):
    def forward(self, image, mask):
        x = self.stem(torch.cat([image * (1 - mask), mask], 1))
        x = self.down1(self.down1(x)[:, :, :, :])
        return x


def test_module_called_twice():
    torch.manual_seed(0)
    net = _Twice()
    with pytest.raises(ValueError, match="'down1'.*more than once"):
        kdinpaint.attach(net, kdinpaint.build_teacher(net), {"encoder_levels": ["down1"]})


def test_teacher_levels_of_another_size():
    student, teacher = _pair()
    with pytest.raises(ValueError, match="pair levels of the same resolution"):
        kdinpaint.attach(student, teacher, {"encoder_levels": ["down1", "down2"], "teacher_levels": ["down2", "down3"]})


def test_bad_masks_are_refused_with_the_fix():
    student, teacher = _pair()
    image, mask = batch()
    kd = kdinpaint.attach(student, teacher, {"encoder_levels": LEVELS})
    with pytest.raises(ValueError, match="resize the mask"):
        student(image, mask[..., :16, :16])
    with pytest.raises(ValueError, match="divide it by 255"):
        student(image, mask * 255)
    with pytest.raises(ValueError, match="threshold"):
        student(image, mask * 0.5)
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        student(image, mask.expand(-1, 3, -1, -1))
    student(image, mask)  # still attached and working
    assert kd.losses(target=image)["total"] >= 0
    with pytest.raises(ValueError, match="same batch"):
        student(image, mask)
        kd.losses(target=image[:1])
    kd.detach()


def test_attach_twice_and_copying_a_hooked_model_are_refused():
    student, teacher = _pair()
    kd = kdinpaint.attach(student, teacher, {"encoder_levels": LEVELS})
    with pytest.raises(RuntimeError, match="already has a Distiller"):
        kdinpaint.attach(student, teacher, {"encoder_levels": LEVELS})
    with pytest.raises(RuntimeError, match="before kdinpaint.attach"):
        kdinpaint.build_teacher(student)
    kd.detach()
    kdinpaint.attach(student, teacher, {"encoder_levels": LEVELS}).detach()


def test_teacher_required_when_the_spec_uses_it():
    student, _ = _pair()
    with pytest.raises(ValueError, match="need a teacher"):
        kdinpaint.attach(student, None, {"encoder_levels": LEVELS})

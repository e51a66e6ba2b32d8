"""Pixel attention (Eq. 7-8), attention transfer (Eq. 9) and global-local fusion (Eq. 10)."""

import pytest
import torch
import torch.nn.functional as F
from tiny import LEVELS, TinyAttentionUNet, batch

import kdinpaint
from kdinpaint.pixel_attention import PixelAttention
from kdinpaint.blocks import GlobalLocalFusion
from kdinpaint.losses.attention_transfer import attention_transfer, attention_transfer_from_affinity


def _naive_affinity(att: PixelAttention, d: torch.Tensor) -> torch.Tensor:
    q = att.qk.f_q(d).flatten(2)  # (B, Cq, N)
    k = att.qk.f_k(d).flatten(2)
    p = torch.einsum("bci,bcj->bij", q, k)  # p_ij = f_Q(d_i)^T f_K(d_j)
    return torch.exp(p) / torch.exp(p).sum(-1, keepdim=True)  # Eq. 7, normalised over j


def _naive_transfer(r, r_t, t, mask_small):
    """Eq. (9) on full matrices: sum over hole rows i of t_i sum_j (r^AN_ij - r_ij)^2, per hole row."""
    holes = mask_small.flatten(1) > 0  # (B, N)
    per_row = ((r_t - r) ** 2).sum(-1)  # (B, N)
    total = (t.flatten(1) * per_row * holes).sum()
    return total / holes.sum() if holes.any() else total * 0


@pytest.mark.parametrize("hooked", [False, True])
def test_pixel_attention_is_eq_7_8(hooked):
    torch.manual_seed(0)
    att = PixelAttention(6, qk_channels=3)
    d = torch.randn(2, 6, 5, 7)
    captured = []
    if hooked:
        att.affinity.register_forward_hook(lambda m, i, o: captured.append(o))
    out = att(d)
    r = _naive_affinity(att, d)
    expected = torch.einsum("bij,bcj->bci", r, d.flatten(2)).view_as(d)  # a_i = sum_j r_ij d_j
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    if hooked:
        torch.testing.assert_close(captured[0], r, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(captured[0].sum(-1), torch.ones(2, 35))


def _qk(B=3, N=48, C=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, N, C, generator=g, dtype=torch.float64).requires_grad_() for _ in range(4)]


def test_hole_rows_equal_the_full_matrix_computation():
    q, k, qt, kt = _qk()
    t = torch.rand(3, 1, 6, 8, dtype=torch.float64, requires_grad=True)
    mask = torch.zeros(3, 1, 12, 16)
    mask[0, :, 2:8, 3:9] = 1
    mask[1, :, 0:2, 0:16] = 1  # sample 2 has no hole: rows of different counts per sample
    got = attention_transfer(q, k, qt, kt, t, mask)
    small = F.max_pool2d(mask, 2)
    r = torch.softmax(q @ k.transpose(1, 2), -1)
    r_t = torch.softmax(qt @ kt.transpose(1, 2), -1)
    want = _naive_transfer(r, r_t, t, small)
    torch.testing.assert_close(got.double(), want)
    g1 = torch.autograd.grad(got, (q, k, t))
    g2 = torch.autograd.grad(want, (q, k, t))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-7)
    # the teacher's rows get no gradient only because it is fed detached in the Distiller; the loss is symmetric


def test_no_hole_is_exact_zero():
    q, k, qt, kt = _qk()
    t = torch.rand(3, 1, 6, 8, dtype=torch.float64)
    loss = attention_transfer(q, k, qt, kt, t, torch.zeros(3, 1, 6, 8))
    assert loss.item() == 0.0
    (gq,) = torch.autograd.grad(loss, (q,))
    assert torch.isfinite(gq).all()


def test_materialised_affinities_both_layouts():
    g = torch.Generator().manual_seed(1)
    B, K, H, W = 2, 10, 4, 5
    r = torch.softmax(torch.randn(B, K, H, W, generator=g), 1)
    r_t = torch.softmax(torch.randn(B, K, H, W, generator=g), 1)
    t = torch.rand(B, 1, H, W, generator=g)
    mask = torch.zeros(B, 1, H, W)
    mask[0, :, 1:3, 1:4] = 1
    mask[1, :, 3:, :] = 1
    got = attention_transfer_from_affinity(r, r_t, t, mask, layout="keys_hw")
    to_rows = lambda a: a.flatten(2).transpose(1, 2)  # (B, HW, K): one key distribution per query
    want = _naive_transfer(to_rows(r), to_rows(r_t), t, mask)
    torch.testing.assert_close(got, want)
    got_qk = attention_transfer_from_affinity(to_rows(r), to_rows(r_t), t, mask, layout="queries_keys")
    torch.testing.assert_close(got_qk, want)
    with pytest.raises(ValueError, match="layout keys_hw"):
        attention_transfer_from_affinity(to_rows(r), to_rows(r_t), t, mask, layout="keys_hw")
    with pytest.raises(ValueError, match="differ"):
        attention_transfer_from_affinity(r, r_t[:, :5], t, mask, layout="keys_hw")


def test_global_local_fusion_is_eq_10():
    torch.manual_seed(0)
    fusion = GlobalLocalFusion(4)
    with torch.no_grad():
        fusion.f_w.weight.normal_()
    d, att = torch.randn(2, 4, 6, 6), torch.randn(2, 4, 6, 6)
    w = torch.sigmoid(F.conv2d(d, fusion.f_w.weight, fusion.f_w.bias, padding=1))
    want = att * w + fusion.local(d) * (1 - w)
    torch.testing.assert_close(fusion(d, att), want)
    with pytest.raises(ValueError, match="input's shape"):
        fusion(d, att[:, :2])


SPEC = {"encoder_levels": LEVELS, "attention_sites": [{"module": "att", "fusion": True}]}


def _attached(spec=SPEC):
    torch.manual_seed(0)
    student = TinyAttentionUNet()
    teacher = kdinpaint.build_teacher(student)
    return student, teacher, kdinpaint.attach(student, teacher, spec)


def test_attached_attention_transfer_equals_the_full_matrix():
    student, teacher, kd = _attached()
    with torch.no_grad():
        kd.t["0"].conv.weight.normal_(0, 0.5)
    image, mask = batch(2, 32)
    # independent captures: our own hooks on the attention inputs of both networks
    seen = {}
    hs = [
        student.att.register_forward_hook(lambda m, i, o: seen.__setitem__("s", i[0])),
        teacher.att.register_forward_hook(lambda m, i, o: seen.__setitem__("t", i[0])),
    ]
    student(image, mask)
    losses = kd.losses(target=image)
    for h in hs:
        h.remove()
    r = _naive_affinity(student.att, seen["s"])
    r_t = _naive_affinity(teacher.att, seen["t"])
    t = torch.sigmoid(kd.t["0"].conv(seen["t"]))
    want = _naive_transfer(r, r_t, t, F.max_pool2d(mask, 4))
    torch.testing.assert_close(losses["att/att"], want, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(losses["total"], losses["cross"] + losses["self"] + losses["att"])
    losses["total"].backward()
    assert kd.t["0"].conv.weight.grad.abs().sum() > 0  # gradients reach t
    assert student.att.qk.f_q.weight.grad.abs().sum() > 0
    kd.detach()


def test_pgl_wraps_the_attention_and_export_keeps_it(tmp_path):
    student, teacher, kd = _attached()
    image, mask = batch(2, 32)
    seen = {}
    h = student.att.qk.register_forward_hook(lambda m, i, o: seen.__setitem__("d", i[0]))
    out = student(image, mask)
    h.remove()
    kd.losses(target=image)
    att_out = student.att.forward(seen["d"])  # the attention alone (calling forward skips hooks)
    fused = kd.fusion["0"](seen["d"], att_out)
    assert not torch.allclose(fused, att_out)
    (out.mean() + fused.mean()).backward()
    assert kd.fusion["0"].f_w.weight.grad is not None
    assert {id(p) for p in kd.fusion.parameters()} <= {id(p) for p in kd.student_parameters()}

    exported = kd.export().eval()
    student.eval()
    with torch.no_grad():
        attached = student(image, mask)
        assert torch.equal(exported(image, mask), attached)
    assert "model.att.fusion.f_w.weight" in exported.state_dict()
    kd.detach()
    path = tmp_path / "m.safetensors"
    kdinpaint.save_exported(exported, path)
    again = kdinpaint.load_exported(path, TinyAttentionUNet()).eval()
    with torch.no_grad():
        assert torch.equal(again(image, mask), attached)


def test_attention_bad_input():
    torch.manual_seed(0)
    student = TinyAttentionUNet()
    teacher = kdinpaint.build_teacher(student)
    with pytest.raises(ValueError, match="not the spec's layout keys_hw"):
        kdinpaint.attach(student, teacher, {"attention_sites": [{"module": "att", "affinity": "affinity", "layout": "keys_hw"}]})
    with pytest.raises(ValueError, match="not a kdinpaint PixelAttention"):
        kdinpaint.attach(student, teacher, {"attention_sites": [{"module": "up2"}]})
    with pytest.raises(ValueError, match="no module"):
        kdinpaint.attach(student, teacher, {"attention_sites": [{"module": "attn"}]})
    # a materialised affinity in the right layout works
    kd = kdinpaint.attach(student, teacher, {"attention_sites": [{"module": "att", "affinity": "affinity"}]})
    image, mask = batch(2, 32)
    student(image, mask)
    assert kd.losses(target=image)["att"] > 0
    kd.detach()


@pytest.mark.parametrize("grad", [False, True])
def test_refine_holes_computes_the_hole_rows_only_and_equals_the_full_matrix(grad):
    # d + M ⊙ g ⊙ (a - d) with a from the naive full affinity; the module computes the hole rows alone
    torch.manual_seed(1)
    att = PixelAttention(6, qk_channels=3, refine_holes=True)
    with torch.no_grad():
        att.gate.copy_(torch.randn(1, 6, 1, 1))
    d = torch.randn(3, 6, 6, 8, requires_grad=grad)
    mask = torch.zeros(3, 1, 12, 16)
    mask[0, :, 2:7, 3:9] = 1  # a hole; image 1 has none; image 2 is all hole
    mask[2] = 1
    with torch.set_grad_enabled(grad):
        out = att(d, mask)
    m = F.max_pool2d(mask, 2)
    a = torch.einsum("bij,bcj->bci", _naive_affinity(att, d), d.flatten(2)).view_as(d)
    expected = d + m * att.gate * (a - d)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(out[1], d[1])  # no hole: the feature is kept exactly
    if grad:
        g = torch.randn_like(out)
        params = [d, att.gate, *att.qk.parameters()]
        for x, y in zip(torch.autograd.grad(out, params, g), torch.autograd.grad(expected, params, g)):
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)

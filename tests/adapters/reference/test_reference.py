"""The reference network (Fig. 2) and its Table 3 variants."""

import pytest
import torch

import kdinpaint
from kdinpaint.ops.fill import harmonic_fill
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


def _one_step(student, kd):
    """One Adam step on L1 + 20 * the distillation total of a 2x32x32 batch; (image, mask, losses, loss)."""
    image, mask = batch(2, 32)
    opt = torch.optim.Adam([*student.parameters(), *kd.student_parameters()], lr=1e-3)
    pred = student(image * (1 - mask), mask)
    losses = kd.losses(target=image)
    loss = (pred - image).abs().mean() + 20 * losses["total"]
    loss.backward()
    opt.step()
    return image, mask, losses, loss


@pytest.mark.parametrize("variant", VARIANTS)
def test_each_variant_trains_one_step(variant):
    torch.manual_seed(0)
    adapter = kdinpaint.get_adapter("reference")
    spec = adapter.spec.variant(variant)
    student, teacher = adapter.student(variant, width=4), adapter.teacher(variant, width=4)
    kd = kdinpaint.attach(student, teacher if spec.needs_teacher or spec.self_distillation else None, spec,
                          allow_empty=variant == "baseline")  # the Baseline taps nothing
    image, mask, losses, loss = _one_step(student, kd)
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


def test_fresh_prefill_net_returns_the_clamped_fill():
    # tanh(atanh(clamp(fill)) + head) with the head's last conv at zero: the fill itself, known pixels included
    image, mask = batch(2, 32)
    net = ReferenceNet(width=4, prefill=True)
    few = ReferenceNet(width=4, prefill=True, prefill_iterations=0, prefill_biharmonic=0)
    with torch.no_grad():
        out, out_few = net(image * (1 - mask), mask), few(image * (1 - mask), mask)
    fill = harmonic_fill(image, mask, net.prefill_iterations, net.prefill_biharmonic)
    assert bool((fill.abs() > 0.999).any())  # the clamp is exercised
    torch.testing.assert_close(out, fill.clamp(-0.999, 0.999), atol=1e-5, rtol=0)
    coarse = harmonic_fill(image, mask, 0)
    torch.testing.assert_close(out_few, coarse.clamp(-0.999, 0.999), atol=1e-5, rtol=0)
    assert (coarse - fill).abs().max() > 0.05  # the fill's arguments reach it


def test_biharmonic_prefill_starts_from_scikit_image_biharmonic_fill():
    """``prefill="biharmonic"``: a fresh network returns skimage's inpaint_biharmonic (the oracle, called here on
    its own), clamped as every prefill is; the stem's guide is still the plain harmonic fill minus the start."""
    from skimage.restoration import inpaint_biharmonic

    image, mask = batch(2, 32)
    mask = mask.clone()
    mask[1] = 1  # a sample that is all hole: nothing to fill from, zeros (as the pyramid fill gives)
    net = ReferenceNet(width=4, prefill="biharmonic")
    assert net.prefill and net.prefill_mode == "biharmonic"
    with torch.no_grad():
        out = net(image * (1 - mask), mask)
    rgb = ((image[0].clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy().astype("float64")  # the fill is solved in float64
    ref = torch.from_numpy(inpaint_biharmonic(rgb, mask[0, 0].numpy() > 0.5, channel_axis=-1)).permute(2, 0, 1)
    ref = (ref.float().clamp(0, 1) * 2 - 1) * mask[0] + image[0] * (1 - mask[0])
    torch.testing.assert_close(out[0], ref.clamp(-0.999, 0.999), atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1], torch.zeros_like(out[1]))
    start, guide = net._compute_fills(image * (1 - mask), mask)
    torch.testing.assert_close(guide[0], harmonic_fill(image, mask, net.prefill_iterations)[0].clamp(-1, 1) - start[0])
    for bad in ("exact", 1, None):
        with pytest.raises(ValueError, match="prefill must be false, true, 'pyramid' or 'biharmonic'"):
            ReferenceNet(width=4, prefill=bad)


def test_border_ramp_is_the_clipped_chessboard_distance_to_the_known_pixels():
    from kdinpaint_adapters.reference import border_ramp

    torch.manual_seed(0)
    mask = (torch.rand(2, 1, 12, 10) < 0.7).float()
    mask[1, :, 3:11, 2:9] = 1  # a large hole too
    for width in (1, 3, 5):
        got = border_ramp(mask, width)
        for b in range(2):
            known = (mask[b, 0] == 0).nonzero().tolist()
            for i in range(12):
                for j in range(10):
                    d = 0 if mask[b, 0, i, j] == 0 else min(max(abs(i - y), abs(j - x)) for y, x in known)
                    assert got[b, 0, i, j].item() == pytest.approx(min(d / width, 1.0)), (b, i, j, width)


def test_prefill_ramp_scales_the_correction_by_the_border_ramp():
    """Same weights, ramp R against no ramp: the correction (pre-activation minus atanh of the fill) is
    multiplied by the ramp, so it is 0 on known pixels and a quarter of itself next to them (R = 4)."""
    from kdinpaint_adapters.reference.model import _PREFILL_LIMIT, border_ramp

    torch.manual_seed(0)
    image, mask = batch(2, 32)
    plain, ramped = ReferenceNet(width=4, prefill=True), ReferenceNet(width=4, prefill=True, prefill_ramp=4)
    torch.nn.init.normal_(plain.head[1].weight, std=0.1)  # a head that has moved
    ramped.load_state_dict(plain.state_dict())
    with torch.no_grad():
        fill = torch.atanh(plain._compute_fills(image * (1 - mask), mask)[0].clamp(-_PREFILL_LIMIT, _PREFILL_LIMIT))
        c0 = torch.atanh(plain(image * (1 - mask), mask)) - fill
        c4 = torch.atanh(ramped(image * (1 - mask), mask)) - fill
    assert c0.abs().mean() > 0.01
    torch.testing.assert_close(c4, c0 * border_ramp(mask, 4), atol=1e-3, rtol=1e-3)
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="prefill_ramp is a width in pixels"):
            ReferenceNet(width=4, prefill=True, prefill_ramp=bad)


def test_prefill_gradients_reach_every_parameter_once_the_head_moved():
    torch.manual_seed(0)
    net = ReferenceNet(width=4, prefill=True)
    image, mask = batch(2, 32)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)

    def moving() -> set[str]:
        opt.zero_grad(set_to_none=True)
        (net(image * (1 - mask), mask) - image).abs().mean().backward()
        assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)
        return {n for n, p in net.named_parameters() if p.grad is not None and bool(p.grad.ne(0).any())}

    assert moving() == {"head.1.weight", "head.1.bias"}  # everything else sits behind the zero conv
    for _ in range(2):  # the conv moves, then what sits behind the attention's zero-initialised gates
        opt.step()
        moving()
    opt.step()
    assert moving() == {n for n, _ in net.named_parameters()}


def test_adapter_teacher_is_built_without_prefill():
    adapter = kdinpaint.get_adapter("reference")
    for variant in (None, "net8", "baseline"):
        student = adapter.student(variant, width=4, prefill=True)
        teacher = adapter.teacher(variant, width=4, prefill=True)
        assert student.prefill and not teacher.prefill
        shapes = lambda m: {n: p.shape for n, p in m.named_parameters() if n != "stem.0.weight"}  # noqa: E731
        assert shapes(teacher) == shapes(student)  # the distilled levels match; the stem's inputs do not:
        assert student.stem[0].weight.shape[1] == 7 and teacher.stem[0].weight.shape[1] == 4  # fill, guide, mask
        assert bool(teacher.head[1].weight.ne(0).any())  # the ordinary initialisation, not the correction's zero


@pytest.mark.parametrize("kwargs", [{"width": 4, "prefill": True}, {"width": 4, "prefill": "biharmonic", "prefill_ramp": 3}])
def test_prefill_net8_trains_and_round_trips_through_a_checkpoint(tmp_path, kwargs):
    torch.manual_seed(0)
    adapter = kdinpaint.get_adapter("reference")
    student = adapter.student("net8", **kwargs)
    kd = kdinpaint.attach(student, adapter.teacher("net8", **kwargs), adapter.spec.variant("net8"))
    image, mask, losses, loss = _one_step(student, kd)
    assert torch.isfinite(loss) and all(losses[t].item() > 0 for t in ("cross", "self", "att"))
    exported = kd.export().eval()
    with torch.no_grad():  # generic values where a fresh network starts at zero (head, blocks, fusion, gates)
        for p in exported.parameters():
            if not p.any():
                p.normal_(0, 0.1)
    path = tmp_path / "net8.safetensors"
    kdinpaint.save_exported(exported, path, adapter="reference:net8", builder_kwargs=kwargs)
    kd.detach()
    model, which = kdinpaint.load_checkpoint(path, expected="reference")
    assert which == "reference:net8" and model.model.prefill
    assert (model.model.prefill_mode, model.model.prefill_ramp) == (student.prefill_mode, student.prefill_ramp)
    with torch.no_grad():
        expected = exported(image * (1 - mask), mask)
        assert torch.equal(model.eval()(image * (1 - mask), mask), expected)
    # the builder arguments matter: the network without prefill has a 4-channel stem, and says so
    with pytest.raises(ValueError, match=r"stem\.0\.weight \(4, 7, 5, 5\) vs model \(4, 4, 5, 5\)"):
        kdinpaint.load_exported(path, adapter.student("net8", width=4))


def test_prefill_is_reused_for_the_same_tensors_only():
    """Algorithm 1 calls the network several times on one batch: the fill is computed once for the same
    image and mask objects, and again for a new or modified tensor (never a stale fill)."""
    from unittest import mock

    import kdinpaint_adapters.reference.model as ref  # where ReferenceNet looks harmonic_fill up

    torch.manual_seed(0)
    net = ref.ReferenceNet(width=4, prefill=True)
    image = torch.rand(1, 3, 16, 16) * 2 - 1
    mask = (torch.rand(1, 1, 16, 16) > 0.6).float()
    with mock.patch.object(ref, "harmonic_fill", wraps=ref.harmonic_fill) as fill, torch.no_grad():
        first = net(image, mask)
        assert torch.equal(net(image, mask), first) and fill.call_count == 2  # the prefill and the guide's fill
        net(image.clone(), mask)  # equal values, another tensor
        assert fill.call_count == 4
        image.mul_(0.5)  # modified in place: its version changes
        changed = net(image, mask)
        assert fill.call_count == 6
        # another network with the same fill settings (the control twin, the teacher) reuses them; other settings not
        twin = ref.ReferenceNet(width=4, prefill=True)
        twin(image, mask)
        assert fill.call_count == 6
        other = ref.ReferenceNet(width=4, prefill=True, prefill_iterations=8)
        other(image, mask)
        assert fill.call_count == 8
        start, guide = net._compute_fills(image, mask)
        assert fill.call_count == 10
        seen = []
        twin.stem.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
        twin(image, mask)  # the shared fills are the ones it would compute
        torch.testing.assert_close(seen[0], torch.cat([start, guide, mask], 1), rtol=0, atol=0)
    with torch.inference_mode():  # inference tensors have no version counter: computed, not cached
        assert torch.equal(net(image.clone(), mask.clone()), changed)
    expected = ref.harmonic_fill(image, mask, 64, 100).clamp(-0.999, 0.999)
    assert torch.allclose(changed[mask.expand_as(changed) > 0], expected[mask.expand_as(expected) > 0], atol=1e-5)


def test_prefill_stem_sees_the_fill_the_guide_and_the_mask():
    """The stem's 7 input channels: the prefill, the plain harmonic fill minus it, and the mask."""
    torch.manual_seed(0)
    net = ReferenceNet(width=4, prefill=True)
    image, mask = batch(2, 32)
    seen = []
    net.stem.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    with torch.no_grad():
        net(image * (1 - mask), mask)
    fill = harmonic_fill(image * (1 - mask), mask, net.prefill_iterations, net.prefill_biharmonic).clamp(-1, 1)
    smooth = harmonic_fill(image * (1 - mask), mask, net.prefill_iterations, 0).clamp(-1, 1)
    torch.testing.assert_close(seen[0], torch.cat([fill, smooth - fill, mask], 1))
    assert (smooth - fill).abs().max() > 0.01  # the guide carries information
    assert bool((seen[0][:, 3:6] * (1 - mask)).eq(0).all())  # and none where the pixels are known

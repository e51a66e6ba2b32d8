"""DeepFill v2 adapter: official key layout, checkpoint loading, contextual attention, conventions."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from kdinpaint.masking import masked
from kdinpaint_adapters.gatedconv import (
    ContextualAttention,
    GatedConvInpaint,
    SNConv2d,
    SNPatchGANDiscriminator,
    build_gatedconv,
    build_gatedconv_discriminator,
    checkpoint_filter_fn,
    from_network_output,
    load_official,
    resize_nearest_tf,
    save_official,
    tf_same_pad,
    to_network_input,
)

FIXTURE = json.loads((Path(__file__).parent / "gatedconv_keys.json").read_text())


def _shapes(module: nn.Module) -> list[tuple[str, list[int]]]:
    return [(k, list(v.shape)) for k, v in module.state_dict().items()]


def _box_masks(batch: int, size: int, boxes: list[tuple[int, int, int, int] | None]) -> torch.Tensor:
    mask = torch.zeros(batch, 1, size, size)
    for i, box in enumerate(boxes):
        if box is not None:
            t, l, h, w = box
            mask[i, :, t : t + h, l : l + w] = 1
    return mask


# ------------------------------------------------------------------ official layout and loading


def test_state_dict_keys_and_shapes_equal_official():
    g, d = GatedConvInpaint(), SNPatchGANDiscriminator()
    assert _shapes(g) == list(FIXTURE["generator"].items())
    assert _shapes(d) == list(FIXTURE["discriminator"].items())
    assert sum(p.numel() for p in g.parameters()) == FIXTURE["generator_parameters"]
    assert sum(p.numel() for p in d.parameters()) == FIXTURE["discriminator_parameters"]
    # The attention's softmax / identity submodules add no keys.
    assert dict(g.contextual_attention.state_dict()) == {}
    assert isinstance(g.contextual_attention.softmax, nn.Softmax)
    assert isinstance(g.contextual_attention.affinity, nn.Identity)


def test_official_layout_round_trip(tmp_path):
    torch.manual_seed(0)
    g, d = GatedConvInpaint(cnum=48).eval(), SNPatchGANDiscriminator().eval()
    # As saved by a DataParallel trainer: prefixed keys, generator under 'G', discriminator under 'D'.
    ckpt = {"G": {f"module.{k}": v for k, v in g.state_dict().items()}, "D": d.state_dict(), "n_iter": 7}
    path = tmp_path / "states_tf_places2.pth"
    torch.save(ckpt, path)
    g2, d2 = GatedConvInpaint(), SNPatchGANDiscriminator()
    out = load_official(path, model=g2.eval(), discriminator=d2.eval())
    assert out is g2
    for a, b in ((g, g2), (d, d2)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    image, mask = torch.rand(1, 3, 32, 32) * 2 - 1, _box_masks(1, 32, [(8, 8, 12, 12)])
    with torch.no_grad():
        assert torch.equal(g(image, mask), g2(image, mask))
    # save_official writes the same layout; the constructors read it back.
    save_official(g2, tmp_path / "ours.pth", discriminator=d2)
    assert set(torch.load(tmp_path / "ours.pth", weights_only=True)) == {"G", "D"}
    g3 = build_gatedconv(tmp_path / "ours.pth").eval()
    d3 = build_gatedconv_discriminator(tmp_path / "ours.pth")
    assert all(torch.equal(a, b) for a, b in zip(g3.state_dict().values(), g.state_dict().values()))
    assert all(torch.equal(a, b) for a, b in zip(d3.state_dict().values(), d.state_dict().values()))


def test_tensorflow_variable_names_are_remapped():
    torch.manual_seed(0)
    g = GatedConvInpaint(cnum=8)
    tf_vars = {"global_step": torch.tensor(5), "discriminator/sn_patch_gan/conv1/kernel": torch.zeros(5, 5, 4, 8)}
    for key, value in g.state_dict().items():
        parts = key.split(".")
        scope = f"{parts[0]}/{parts[0]}_conv" if parts[1:3] == ["conv", "conv"] else parts[0]
        name = f"inpaint_net/{scope}/{'kernel' if parts[-1] == 'weight' else 'bias'}"
        tf_vars[name] = value.permute(2, 3, 1, 0) if value.dim() == 4 else value  # OIHW -> HWIO
        tf_vars[name + "/Adam"] = torch.zeros_like(tf_vars[name])
    state = checkpoint_filter_fn(tf_vars)
    ref = g.state_dict()
    assert state.keys() == ref.keys() and all(torch.equal(state[k], ref[k]) for k in ref)


def test_wrong_files_give_clear_errors(tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="weights_only"):
        load_official(garbage)

    sd = GatedConvInpaint(cnum=8).state_dict()
    ckpt = tmp_path / "small.pth"
    torch.save({"G": sd}, ckpt)
    with pytest.raises(ValueError, match="shape mismatches.*conv1.conv.weight.*cnum=48"):
        load_official(ckpt)  # a cnum=48 model cannot take cnum=8 weights

    full = GatedConvInpaint(cnum=8).state_dict()
    full.pop("allconv17.conv.bias")
    full["extra.weight"] = torch.zeros(1)
    torch.save({"G": full}, ckpt)
    with pytest.raises(ValueError, match=r"missing keys \[allconv17.conv.bias\]; unexpected keys \[extra.weight\]"):
        load_official(ckpt, model=GatedConvInpaint(cnum=8))

    torch.save({"G": {"stage1.conv1.conv.weight": torch.zeros(1)}}, ckpt)
    with pytest.raises(ValueError, match="networks.py"):
        load_official(ckpt)

    torch.save({"generator": {"a": 1}, "epoch": 3}, ckpt)
    with pytest.raises(ValueError, match="under 'G'"):
        load_official(ckpt)

    torch.save({"G": GatedConvInpaint(cnum=8).state_dict()}, ckpt)
    with pytest.raises(ValueError, match="no discriminator"):
        load_official(ckpt, model=GatedConvInpaint(cnum=8), discriminator=SNPatchGANDiscriminator())
    with pytest.raises(FileNotFoundError, match="no DeepFill v2 checkpoint"):
        load_official(tmp_path / "missing.pth")


# ------------------------------------------------------------------ TF numerics helpers


def test_resize_nearest_tf_matches_align_corners_formula():
    x = torch.arange(64.0).view(1, 1, 8, 8)
    for n_out in (1, 3, 4, 5, 8, 16):
        idx = [0] if n_out == 1 else [int(np.floor(i * 7 / (n_out - 1) + 0.5)) for i in range(n_out)]
        expected = x[..., idx, :][..., idx]
        assert torch.equal(resize_nearest_tf(x, (n_out, n_out)), expected)
    # 64 -> 32 is not a plain stride-2 subsampling (this is why the official mask resizing matters).
    y = torch.arange(64.0).view(1, 1, 64, 1)
    rows = resize_nearest_tf(y, (32, 1)).flatten().long().tolist()
    assert rows[:16] == list(range(0, 32, 2)) and rows[16] == 33 and rows[-1] == 63
    # x2 upsampling with align_corners equals PyTorch's nearest (what GatedUpConv2d uses).
    z = torch.randn(2, 3, 7, 5)
    assert torch.equal(resize_nearest_tf(z, (14, 10)), F.interpolate(z, scale_factor=2.0, mode="nearest"))


def test_tf_same_pad_hand_computed_cases():
    x = torch.ones(1, 1, 8, 7)
    # 3x3 stride 2: even size pads 0 before / 1 after, odd size 1 / 1; output ceil(n / 2).
    assert tf_same_pad(x, 3, 2).shape[-2:] == (9, 9)
    assert tf_same_pad(x, 3, 2)[0, 0, 0].sum() == 7 and tf_same_pad(x, 3, 2)[0, 0, -1].sum() == 0
    assert tf_same_pad(x, 3, 2)[0, 0, :, 0].sum() == 0  # odd width: one zero column before
    # dilated 3x3 (rate 4), stride 1: symmetric 4 on each side.
    assert tf_same_pad(x, 3, 1, 4).shape[-2:] == (16, 15)
    # 4x4 stride 2 (the pasted patches): 1 before, 1 after.
    assert tf_same_pad(x[..., :8, :6], 4, 2).shape[-2:] == (10, 8)


# ------------------------------------------------------------------ contextual attention


def _reference_attention(f, b, mask, fuse, ksize=3, rate=2, scale=10.0):
    """One sample at a time, written the way the official op is (conv with normalised patches as
    filters, explicit diagonal fusion, conv_transpose pasting)."""
    outs, atts = [], []
    for i in range(f.shape[0]):
        fi, bi = f[i : i + 1], b[i : i + 1]
        C, H, W = bi.shape[1:]
        h, w = H // rate, W // rate
        rows = [int(math.floor(r * (H - 1) / (h - 1) + 0.5)) for r in range(h)]
        cols = [int(math.floor(c * (W - 1) / (w - 1) + 0.5)) for c in range(w)]
        fs, bs = fi[..., rows, :][..., cols], bi[..., rows, :][..., cols]
        padded = F.pad(bs, (1, 1, 1, 1))
        filters = torch.stack([padded[0, :, y : y + ksize, x : x + ksize] for y in range(h) for x in range(w)])
        norms = filters.flatten(1).norm(dim=1).clamp_min(1e-4)
        filters = filters / norms.view(-1, 1, 1, 1)
        s = F.conv2d(F.pad(fs, (1, 1, 1, 1)), filters)[0]  # (L, h, w)
        L = h * w
        if fuse:
            m = s.reshape(L, h * w)

            def diag(mat):
                p = F.pad(mat, (1, 1, 1, 1))
                return p[:-2, :-2] + p[1:-1, 1:-1] + p[2:, 2:]

            m = diag(m)
            # column-major flattening of keys and queries
            perm = torch.tensor([y * w + x for x in range(w) for y in range(h)])
            m = diag(m[perm][:, perm])
            inv = torch.empty_like(perm)
            inv[perm] = torch.arange(L)
            s = m[inv][:, inv].reshape(L, h, w)
        valid = torch.ones(L)
        if mask is not None:
            mi = mask[min(i, mask.shape[0] - 1), 0][rows][:, cols]
            mp = F.pad(mi, (1, 1, 1, 1))
            for y in range(h):
                for x in range(w):
                    valid[y * w + x] = float(mp[y : y + 3, x : x + 3].sum() == 0)
        v = valid.view(L, 1, 1)
        a = torch.softmax(s * v * scale, dim=0) * v
        raw = F.pad(bi, (1, 1, 1, 1))
        k2 = 2 * rate
        raw_filters = torch.stack(
            [raw[0, :, y * rate : y * rate + k2, x * rate : x * rate + k2] for y in range(h) for x in range(w)]
        )
        outs.append(F.conv_transpose2d(a[None], raw_filters, stride=rate, padding=1) / 4.0)
        atts.append(a)
    return torch.cat(outs), torch.stack(atts)


@pytest.mark.parametrize("fuse", [True, False])
def test_batched_attention_equals_per_sample_loop(fuse):
    torch.manual_seed(0)
    f = torch.randn(3, 6, 16, 16, dtype=torch.float64)
    mask = _box_masks(3, 16, [(2, 3, 6, 5), None, (8, 0, 8, 16)]).double()
    ca = ContextualAttention(fuse=fuse)
    captured = []
    ca.affinity.register_forward_hook(lambda m, i, o: captured.append(o))
    y = ca(f, f, mask)
    ref_y, ref_att = _reference_attention(f, f, mask, fuse)
    assert y.shape == f.shape
    torch.testing.assert_close(y, ref_y, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(captured[0], ref_att, rtol=1e-9, atol=1e-9)
    # Per-sample masks differ from the official "mask of sample 0 for all": sample 2 sees other keys.
    official_y, _ = _reference_attention(f, f, mask[:1].expand(3, -1, -1, -1), fuse)
    assert not torch.allclose(y[2], official_y[2])
    torch.testing.assert_close(ca(f, f, mask[:1]), official_y, rtol=1e-9, atol=1e-9)


def test_affinity_hook_layout_and_row_sums():
    torch.manual_seed(0)
    model = GatedConvInpaint(cnum=8).eval()
    image = torch.rand(2, 3, 64, 64) * 2 - 1
    mask = _box_masks(2, 64, [(16, 16, 24, 24), None])
    seen: dict[str, torch.Tensor] = {}
    model.contextual_attention.softmax.register_forward_hook(lambda m, i, o: seen.__setitem__("logits", i[0]))
    model.contextual_attention.affinity.register_forward_hook(lambda m, i, o: seen.__setitem__("att", o))
    with torch.no_grad():
        model(image, mask)
    att, logits = seen["att"], seen["logits"]
    assert att.shape == (2, 64, 8, 8)  # B x keys (8*8 patches) x H/8 x W/8
    rows = att.sum(1)
    # A sample without holes: every key valid, each row is a softmax and sums to 1.
    torch.testing.assert_close(rows[1], torch.ones(8, 8))
    # With holes: invalid keys are exactly 0 everywhere and had logit 0 before the softmax.
    invalid = (att[0] == 0).all(dim=(1, 2))
    assert 0 < int(invalid.sum()) < 64
    assert torch.equal(logits[0][invalid], torch.zeros_like(logits[0][invalid]))
    # Over the valid keys the affinity is a softmax of their logits, scaled by Z_v / (Z_v + n_invalid).
    lv = logits[0][~invalid].double()
    z_valid = lv.exp().sum(0)
    torch.testing.assert_close(att[0][~invalid].double(), lv.exp() / (z_valid + invalid.sum()), rtol=1e-5, atol=1e-7)


def test_teacher_validity_mask_matches_student_keys():
    torch.manual_seed(0)
    model = GatedConvInpaint(cnum=8).eval()
    gt = torch.rand(1, 3, 64, 64) * 2 - 1
    mask = _box_masks(1, 64, [(8, 24, 32, 16)])
    atts = []
    model.contextual_attention.affinity.register_forward_hook(lambda m, i, o: atts.append(o))
    with torch.no_grad():
        model(gt, mask)  # student
        model(gt, torch.zeros_like(mask), validity_mask=mask)  # teacher: ground truth, same valid patches
        model(gt, torch.zeros_like(mask))  # no validity mask: every key usable
    student_invalid = (atts[0] == 0).flatten(2).all(-1)
    teacher_invalid = (atts[1] == 0).flatten(2).all(-1)
    assert atts[0].shape == atts[1].shape and student_invalid.any()
    assert torch.equal(student_invalid, teacher_invalid)
    assert not (atts[2] == 0).flatten(2).all(-1).any()


# ------------------------------------------------------------------ conventions


def test_conventions_round_trip_and_padding():
    torch.manual_seed(0)
    image = torch.rand(2, 3, 30, 45) * 2 - 1
    mask = _box_masks(2, 30, [(4, 4, 10, 10), None])
    mask = torch.cat([mask, torch.zeros(2, 1, 30, 15)], dim=-1)
    x_bgr, mask_p, size = to_network_input(image, mask, "bgr")
    x_rgb, _, _ = to_network_input(image, mask, "rgb")
    assert x_bgr.shape == (2, 5, 32, 48) and mask_p.shape == (2, 1, 32, 48) and size == (30, 45)
    assert torch.equal(x_bgr[:, :3], x_rgb[:, :3].flip(1))
    assert torch.equal(x_bgr[:, 3:4], torch.ones_like(mask_p)) and torch.equal(x_bgr[:, 4:5], mask_p)
    assert torch.equal(mask_p[..., :30, :45], mask) and mask_p[..., 30:, :].sum() == 0 and mask_p[..., 45:].sum() == 0
    for order, x in (("bgr", x_bgr), ("rgb", x_rgb)):
        assert torch.equal(from_network_output(x[:, :3], size, order), masked(image, mask))
    # Reflection padding continues the image at the bottom/right.
    assert torch.equal(x_rgb[:, :3, 30, :45], image[:, :, 28])


def test_forward_uses_conventions_and_ignores_hole_pixels():
    torch.manual_seed(0)
    model = GatedConvInpaint(cnum=8, channel_order="bgr").eval()
    image = torch.rand(1, 3, 40, 36) * 2 - 1
    mask = torch.zeros(1, 1, 40, 36)
    mask[..., 10:25, 5:20] = 1
    with torch.no_grad():
        refined, coarse = model(image, mask, return_coarse=True)
        x, mask_p, size = to_network_input(image, mask, "bgr")
        c_net, r_net = model.forward_network(x, mask_p)
        assert refined.shape == coarse.shape == image.shape
        assert torch.equal(refined, r_net[..., :40, :36].flip(1))
        assert torch.equal(coarse, c_net[..., :40, :36].flip(1))
        # What lies under the hole never reaches the network.
        other = image.clone()
        other[..., 10:25, 5:20] = torch.rand(1, 3, 15, 15)
        assert torch.equal(model(other, mask), refined)


def test_bad_inputs_are_refused():
    model = GatedConvInpaint(cnum=8)
    image = torch.zeros(1, 3, 16, 16)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.zeros(1, 4, 16, 16), torch.zeros(1, 1, 16, 16))
    with pytest.raises(ValueError, match="0/255"):
        model(image, torch.full((1, 1, 16, 16), 255.0))
    with pytest.raises(ValueError, match=r"\[-1, 1\].*x / 127.5 - 1"):
        model(torch.full((1, 3, 16, 16), 200.0), torch.zeros(1, 1, 16, 16))
    with pytest.raises(ValueError, match="validity_mask is \\(8, 16\\)"):
        model(image, torch.zeros(1, 1, 16, 16), validity_mask=torch.zeros(1, 1, 8, 16))
    with pytest.raises(ValueError, match="multiples of 8"):
        model.forward_network(torch.zeros(1, 5, 20, 16), torch.zeros(1, 1, 20, 16))
    with pytest.raises(ValueError, match="channel_order"):
        GatedConvInpaint(cnum=8, channel_order="bgra")
    with pytest.raises(ValueError, match="act_layer"):
        GatedConvInpaint(cnum=8, act_layer="swishy")


# ------------------------------------------------------------------ discriminator and training step


def test_spectral_norm_converges_to_unit_norm_and_keeps_weight():
    torch.manual_seed(0)
    conv = SNConv2d(4, 6, 3)
    before = conv.weight.detach().clone()
    x = torch.randn(1, 4, 8, 8)
    for _ in range(50):
        conv(x)
    assert torch.equal(conv.weight, before)  # the stored weight is never rescaled in place
    sigma = torch.linalg.matrix_norm(conv.normalized_weight().detach().view(6, -1), ord=2)
    torch.testing.assert_close(sigma, torch.tensor(1.0), rtol=1e-4, atol=1e-4)
    conv.eval()
    u = conv.weight_u.clone()
    conv(x)
    assert torch.equal(conv.weight_u, u)  # no power-iteration update in eval mode


def test_forward_backward_finite_official_width():
    torch.manual_seed(0)
    g, d = GatedConvInpaint(), SNPatchGANDiscriminator(cnum=16)
    image = torch.rand(1, 3, 64, 64) * 2 - 1
    mask = _box_masks(1, 64, [(16, 12, 32, 28)])
    refined, coarse = g(image, mask, return_coarse=True)
    fake = refined * mask + image * (1 - mask)
    loss = (image - coarse).abs().mean() + (image - refined).abs().mean() - d(fake, mask).mean()
    loss.backward()
    assert torch.isfinite(loss)
    for name in ("conv1", "pmconv1", "pmconv6", "xconv1", "allconv17"):
        grad = getattr(g, name).conv.weight.grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    assert all(torch.isfinite(p.grad).all() for p in d.parameters())
    assert d(image, mask).shape == (1, 64 * 1 * 1)

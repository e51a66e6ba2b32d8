"""StructureFlow adapter: official keys, checkpoint loading, boundary conventions, RTV, tiny forward/backward."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from kdinpaint_adapters.structureflow import (
    MultiScaleDiscriminator,
    StructureFlow,
    StructureFlowTexture,
    StructureReconstructor,
    TextureGenerator,
    checkpoint_filter_fn,
    identify_state_dict,
    load_official,
    rtv_structure,
)
from tiny import randomised

FIXTURE = json.loads((Path(__file__).parent / "structureflow_keys.json").read_text())["networks"]


def _shapes(module):
    return [[k, list(v.shape)] for k, v in module.state_dict().items()]


@pytest.mark.parametrize(
    "name,cls", [("s_gen", StructureReconstructor), ("f_gen", TextureGenerator), ("s_dis", MultiScaleDiscriminator)]
)
def test_state_dict_keys_and_shapes_equal_official(name, cls):
    with torch.device("meta"):  # full width, no memory, no init cost
        model = cls()
    assert _shapes(model) == FIXTURE[name]["state_dict"]
    assert sum(p.numel() for p in model.parameters()) == FIXTURE[name]["num_parameters"]



def _assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_official_layout_round_trip(tmp_path):
    # official files are plain state_dicts; DataParallel ones carry "module."
    tex = randomised(TextureGenerator(dim=8))
    torch.save({"module." + k: v for k, v in tex.state_dict().items()}, tmp_path / "latest_net_f_gen.pth")
    loaded = load_official(tmp_path / "latest_net_f_gen.pth", "texture", model=TextureGenerator(dim=8))
    _assert_same_state(loaded, tex)

    sharp = load_official(tmp_path / "latest_net_f_gen.pth", model=StructureFlowTexture(dim=8))
    _assert_same_state(sharp.texture, tex)

    st = randomised(StructureReconstructor(dim=8), seed=1)
    torch.save(st.state_dict(), tmp_path / "latest_net_s_gen.pth")
    full = StructureFlow(dim=8)
    load_official(tmp_path / "latest_net_s_gen.pth", "structure", model=full)
    load_official(tmp_path / "latest_net_f_gen.pth", "texture", model=full)
    _assert_same_state(full.structure, st)
    _assert_same_state(full.texture, tex)
    # the two files together through checkpoint_filter_fn, and the model's own state_dict
    both = {"structure": st.state_dict(), "texture": tex.state_dict()}
    fresh = StructureFlow(dim=8)
    fresh.load_state_dict(checkpoint_filter_fn(both, fresh), strict=True)
    fresh.load_state_dict(checkpoint_filter_fn(full.state_dict(), fresh), strict=True)
    _assert_same_state(fresh, full)

    # the discriminator at the official width: which is inferred from the keys
    dis = randomised(MultiScaleDiscriminator(), seed=2)
    torch.save(dis.state_dict(), tmp_path / "latest_net_f_dis.pth")
    _assert_same_state(load_official(tmp_path / "latest_net_f_dis.pth"), dis)


def test_new_style_spectral_norm_keys_are_mapped():
    st = randomised(StructureReconstructor(dim=8))
    renamed = {}
    for k, v in st.state_dict().items():
        k = k.replace(".weight_orig", ".parametrizations.weight.original")
        k = k.replace(".weight_u", ".parametrizations.weight.0._u").replace(".weight_v", ".parametrizations.weight.0._v")
        renamed[k] = v
    target = StructureReconstructor(dim=8)
    target.load_state_dict(checkpoint_filter_fn(renamed, target), strict=True)
    _assert_same_state(target, st)


def test_wrong_file_and_missing_keys_are_named(tmp_path):
    st = StructureReconstructor(dim=8)
    torch.save(st.state_dict(), tmp_path / "latest_net_s_gen.pth")
    assert identify_state_dict(st.state_dict()) == "structure"
    with pytest.raises(ValueError, match=r"structure reconstructor.*latest_net_s_gen\.pth.*pass the latest_net_f_gen\.pth"):
        load_official(tmp_path / "latest_net_s_gen.pth", "texture", model=TextureGenerator(dim=8))
    with pytest.raises(ValueError, match="latest_net_s_gen.pth"):
        load_official(tmp_path / "latest_net_s_gen.pth", model=StructureFlowTexture(dim=8))

    sd = TextureGenerator(dim=8).state_dict()
    sd.pop("flow_column.location.1.conv.weight")
    sd["conv_column.extra.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match=r"missing keys \(1\): flow_column\.location\.1\.conv\.weight.*unexpected keys \(1\): conv_column\.extra\.weight"):
        load_official(tmp_path / "broken.pth", "texture", model=TextureGenerator(dim=8))
    with pytest.raises(ValueError, match="shape mismatches"):  # a width-8 file into a width-16 network
        torch.save(TextureGenerator(dim=8).state_dict(), tmp_path / "narrow.pth")
        load_official(tmp_path / "narrow.pth", "texture", model=TextureGenerator(dim=16))
    torch.save({"x": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not a StructureFlow checkpoint"):
        load_official(tmp_path / "other.pth")
    with pytest.raises(FileNotFoundError):
        load_official(tmp_path / "absent.pth")


def _tiny_inputs(H=50, W=37, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(2, 3, H, W, generator=g) * 2 - 1
    mask = torch.zeros(2, 1, H, W)
    mask[0, :, 10:30, 5:20] = 1
    mask[1, :, 30:45, 20:35] = 1
    structure = torch.rand(2, 3, H, W, generator=g) * 2 - 1
    return image, mask, structure


def test_conventions_into_the_networks():
    """Inputs are [image*(1-m), structure*(1-m), m] for s_gen and [image*(1-m), raw s_gen output, m] for f_gen,
    padded at the bottom/right; output cropped back; hole content of the image does not leak in."""
    torch.manual_seed(0)
    model = StructureFlow(dim=8).eval()
    image, mask, structure = _tiny_inputs()
    seen = {}
    model.structure.register_forward_hook(lambda m, i, o: seen.update(s_in=i[0], s_out=o))
    model.texture.register_forward_hook(lambda m, i, o: seen.update(t_in=i[0]))
    with torch.no_grad():
        res = model(image, mask, structure, return_all=True)
    H, W = image.shape[-2:]
    s_in, t_in = seen["s_in"], seen["t_in"]
    assert s_in.shape == (2, 7, 64, 48)
    keep = 1 - mask
    torch.testing.assert_close(s_in[:, :3, :H, :W], image * keep)
    torch.testing.assert_close(s_in[:, 3:6, :H, :W], structure * keep)
    torch.testing.assert_close(s_in[:, 6:, :H, :W], mask)
    torch.testing.assert_close(t_in[:, 3:6], seen["s_out"])
    torch.testing.assert_close(t_in[:, :3], s_in[:, :3])
    assert res.image.shape == image.shape and res.structure.shape == image.shape
    assert res.flow.shape == (2, 2, math.ceil(H / 4), math.ceil(W / 4))
    assert torch.equal(res.structure_target, structure)
    assert float(res.image.abs().max()) <= 1

    scrambled = torch.where(mask.bool(), torch.rand_like(image) * 2 - 1, image)
    with torch.no_grad():
        torch.testing.assert_close(model(scrambled, mask, structure), res.image)


def test_texture_alone_conventions():
    model = StructureFlowTexture(dim=8).eval()
    image, mask, _ = _tiny_inputs(48, 48)
    seen = {}
    model.texture.register_forward_hook(lambda m, i, o: seen.update(t_in=i[0]))
    with torch.no_grad():
        out = model(image, mask)
    torch.testing.assert_close(seen["t_in"][:, :3], image * (1 - mask))
    torch.testing.assert_close(seen["t_in"][:, 3:6], image * (1 - mask))  # structure slot: the corrupted input
    torch.testing.assert_close(seen["t_in"][:, 6:], mask)
    assert out.shape == image.shape
    zeros = StructureFlowTexture(dim=8, structure_fill="zeros")
    zeros.texture.register_forward_hook(lambda m, i, o: seen.update(t_in=i[0]))
    with torch.no_grad():
        zeros(image, mask)
    assert torch.equal(seen["t_in"][:, 3:6], torch.zeros_like(image))


@pytest.mark.slow
def test_forward_backward_tiny_finite():
    torch.manual_seed(0)
    image, mask, structure = _tiny_inputs(48, 40)
    for model in (StructureFlow(dim=8), StructureFlowTexture(dim=8)):
        args = (image, mask, structure) if isinstance(model, StructureFlow) else (image, mask)
        out = model(*args)
        assert out.shape == image.shape and torch.isfinite(out).all()
        ((out - image).abs() * mask).mean().backward()
        for name, p in model.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        # the flow column learns through the resampler's flow gradient
        assert model.texture.flow_column.location[1].conv.weight.grad.abs().sum() > 0
    dis = MultiScaleDiscriminator(dim=8)
    logits = dis(image)
    assert [tuple(t.shape) for t in logits] == [(2, 1, 6, 5), (2, 1, 3, 2)]  # 48x40: 1/8, then 24x20 -> 1/8
    sum(t.mean() for t in logits).backward()
    assert all(torch.isfinite(p.grad).all() for p in dis.parameters())


def test_structure_computed_when_not_given():
    # default: the mask-aware RTV of the corrupted image, so the hole content is never read
    model = StructureFlow(dim=8).eval()
    image, mask, _ = _tiny_inputs(48, 48)
    with torch.no_grad():
        res = model(image, mask, return_all=True)
        res_masked_in = model(image * (1 - mask), mask, return_all=True)
    torch.testing.assert_close(res.structure_target, rtv_structure(image * (1 - mask), mask))
    torch.testing.assert_close(res_masked_in.image, res.image)
    gt_model = StructureFlow(dim=8, structure_from="ground_truth").eval()
    with torch.no_grad():
        res2 = gt_model(image, mask, return_all=True)
    torch.testing.assert_close(res2.structure_target, rtv_structure(image))


def test_bad_inputs():
    model = StructureFlowTexture(dim=8)
    image, mask, _ = _tiny_inputs(48, 48)
    with pytest.raises(ValueError, match="RGB"):
        model(image[:, :1], mask)
    with pytest.raises(ValueError, match="resize the mask"):
        model(image, mask[..., :40])
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        model(image * 3, mask)
    with pytest.raises(ValueError, match="structure must be"):
        StructureFlow(dim=8)(image, mask, image[:, :, :10])
    with pytest.raises(ValueError, match="structure_from"):
        StructureFlow(dim=8, structure_from="gt")  # type: ignore[arg-type]
    with pytest.warns(UserWarning, match="1 = hole"):
        with torch.no_grad():
            model(image, torch.ones_like(mask))


# --- RTV against an independent SciPy transcription of the official tsmooth (its direct-solve branch) ---


def _tsmooth_reference(I, lam=0.015, sigma=3.0, sharpness=0.001, iters=3, mask=None):
    """``I``: (H, W, C) in [0, 1]. MATLAB column-major system built with scipy.sparse, solved directly."""
    import scipy.sparse as sp
    import scipy.sparse.linalg as spl
    from scipy.signal import convolve2d

    r, c, ch = I.shape
    hole = np.zeros((r, c)) if mask is None else (mask > 0).astype(float)
    x, s, lam = I.copy(), sigma, lam / 2
    for _ in range(iters):
        fx = np.concatenate([np.diff(x, axis=1), np.zeros((r, 1, ch))], 1) * (1 - hole[..., None])
        fy = np.concatenate([np.diff(x, axis=0), np.zeros((1, c, ch))], 0) * (1 - hole[..., None])
        wto = 1 / np.maximum(np.sqrt(fx**2 + fy**2).sum(2) / ch, sharpness)
        n = int(math.floor(5 * s + 0.5)) | 1
        t = np.arange(n) - (n - 1) / 2
        g = np.exp(-(t**2) / (2 * s * s))
        g /= g.sum()
        fb = np.stack([convolve2d(convolve2d(x[..., i], g[None], "same"), g[:, None], "same") for i in range(ch)], 2)
        gfx = np.concatenate([np.diff(fb, axis=1), np.zeros((r, 1, ch))], 1)
        gfy = np.concatenate([np.diff(fb, axis=0), np.zeros((1, c, ch))], 0)
        wx = wto / np.maximum(np.abs(gfx).sum(2) / ch, 1e-3)
        wy = wto / np.maximum(np.abs(gfy).sum(2) / ch, 1e-3)
        wx[:, -1], wy[-1, :] = 0, 0
        k = r * c
        dx, dy = -lam * wx.flatten(order="F"), -lam * wy.flatten(order="F")
        A = sp.diags([dx[: k - r], dy[: k - 1]], [-r, -1], shape=(k, k))
        w_ = np.concatenate([np.zeros(r), dx[:-r]])
        n_ = np.concatenate([[0.0], dy[:-1]])
        A = (A + A.T + sp.diags(1 - (dx + w_ + dy + n_), 0)).tocsc()
        x = np.stack([spl.spsolve(A, I[..., i].flatten(order="F")).reshape((r, c), order="F") for i in range(ch)], 2)
        s = max(s / 2, 0.5)
    return x


@pytest.mark.parametrize("solver", ["direct", "cg"])
@pytest.mark.parametrize("with_mask", [False, True])
def test_rtv_matches_reference(solver, with_mask):
    g = torch.Generator().manual_seed(1)
    image = torch.rand(1, 3, 24, 30, generator=g, dtype=torch.float64) * 2 - 1
    image[..., 4:16, 3:14] = 0.4  # a flat patch with edges, as structure
    mask = torch.zeros(1, 1, 24, 30, dtype=torch.float64)
    mask[..., 6:12, 16:26] = 1
    m = mask if with_mask else None
    ours = rtv_structure(image, m, solver=solver, tol=1e-12)
    ref = _tsmooth_reference(((image[0].permute(1, 2, 0) + 1) / 2).numpy(), mask=None if m is None else mask[0, 0].numpy())
    np.testing.assert_allclose(ours[0].permute(1, 2, 0).numpy(), np.clip(ref, 0, 1) * 2 - 1, atol=1e-9)
    assert float((ours - image).abs().mean()) > 0.1  # it does smooth


def test_build_from_official_folder_and_init(tmp_path):
    from kdinpaint_adapters.structureflow import build_structureflow, build_structureflow_texture, init_weights

    st, tex = randomised(StructureReconstructor(dim=8), 3), randomised(TextureGenerator(dim=8), 4)
    torch.save(st.state_dict(), tmp_path / "latest_net_s_gen.pth")
    torch.save(tex.state_dict(), tmp_path / "latest_net_f_gen.pth")
    full = build_structureflow(tmp_path, dim=8)
    _assert_same_state(full.structure, st)
    _assert_same_state(full.texture, tex)
    _assert_same_state(build_structureflow_texture(tmp_path, dim=8).texture, tex)
    with pytest.raises(ValueError, match="folder"):
        build_structureflow(tmp_path / "latest_net_s_gen.pth", dim=8)

    # official init: xavier-normal (gain sqrt 2) on plain convs, zero biases, spectral-normed weight_orig untouched
    torch.manual_seed(0)
    net = StructureReconstructor(dim=8)
    before = net.input_layer.conv.weight_orig.clone()
    init_weights(net)
    assert torch.equal(net.input_layer.conv.weight_orig, before)
    assert all(not m.bias.detach().any() for m in net.modules() if isinstance(m, torch.nn.Conv2d))
    owner = TextureGenerator(dim=8)
    init_weights(owner)
    w = owner.conv_column.up_sample[0][2].conv.weight  # 5x5, 64 -> 32
    fan_in, fan_out = w.shape[1] * 25, w.shape[0] * 25
    assert float(w.detach().std()) == pytest.approx(math.sqrt(2) * math.sqrt(2 / (fan_in + fan_out)), rel=0.1)

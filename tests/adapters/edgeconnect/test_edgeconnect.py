"""EdgeConnect adapter: official keys, official checkpoint files, spectral norm, Canny, conventions, gradients."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage import color, data, feature, transform

from kdinpaint_adapters import edgeconnect as ec

FIXTURE = json.loads((Path(__file__).parent / "edgeconnect_keys.json").read_text())["networks"]
BUILDERS = {
    "EdgeGenerator": lambda: ec.EdgeGenerator(),
    "InpaintGenerator": lambda: ec.InpaintGenerator(),
    "Discriminator_edge": lambda: ec.Discriminator(in_channels=2),
    "Discriminator_inpaint": lambda: ec.Discriminator(in_channels=3),
}
WHICH = {"edge": "EdgeGenerator", "inpaint": "InpaintGenerator", "edge_dis": "Discriminator_edge",
         "inpaint_dis": "Discriminator_inpaint"}


def _randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights *and* random (unconverged) spectral-norm vectors, so a loader that drops u, v shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in model.state_dict().values():
            t.copy_(torch.randn(t.shape, generator=g) * 0.05)
    return model


def _photo(name: str, size: int) -> np.ndarray:
    """A skimage.data photograph as float64 RGB in [0, 1], resized to size x size."""
    im = getattr(data, name)()
    if im.ndim == 2:
        im = np.stack([im] * 3, -1)
    return transform.resize(im[..., :3], (size, size), anti_aliasing=True)


# ---------------------------------------------------------------- official module tree and keys


@pytest.mark.parametrize("name", list(BUILDERS))
def test_state_dict_keys_and_shapes_equal_official(name: str) -> None:
    model = BUILDERS[name]()
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert list(ours) == list(FIXTURE[name]["state_dict"])  # same keys in the same order
    assert ours == FIXTURE[name]["state_dict"]
    assert sum(p.numel() for p in model.parameters()) == FIXTURE[name]["num_parameters"]
    official_modules = FIXTURE[name]["modules"]
    assert {n: type(m).__name__ for n, m in model.named_modules() if n} == official_modules


def test_encoder_levels_are_the_documented_paths() -> None:
    model = ec.EdgeConnectInpaint(residual_blocks=1)
    x, m = torch.rand(1, 3, 32, 32) * 2 - 1, torch.zeros(1, 1, 32, 32)
    seen = {}
    handles = [
        model.get_submodule("inpaint." + info["module"]).register_forward_hook(
            lambda mod, inp, out, key=info["module"]: seen.__setitem__(key, out.shape)
        )
        for info in model.inpaint.feature_info
    ]
    model(x, m)
    for h in handles:
        h.remove()
    assert seen == {"encoder.3": (1, 64, 32, 32), "encoder.6": (1, 128, 16, 16), "encoder.9": (1, 256, 8, 8)}


# ---------------------------------------------------------------- official checkpoint files


@pytest.mark.parametrize("which", list(WHICH))
def test_official_file_layout_round_trips(tmp_path: Path, which: str) -> None:
    model = _randomize(BUILDERS[WHICH[which]](), seed=3)
    fname = ec.OFFICIAL_FILES[which][1]
    # the layout the official BaseModel.save() writes
    if which.endswith("_dis"):
        torch.save({"discriminator": model.state_dict()}, tmp_path / fname)
    else:
        torch.save({"iteration": 1234, "generator": model.state_dict()}, tmp_path / fname)
    for given in (None, which):
        loaded = ec.load_official(tmp_path / fname, given)
        assert type(loaded) is type(model)
        ref, got = model.state_dict(), loaded.state_dict()
        assert list(got) == list(ref) and all(torch.equal(got[k], ref[k]) for k in ref)

    # our writer produces the same layout
    ec.save_official(loaded, tmp_path / "again.pth", iteration=7)
    raw = torch.load(tmp_path / "again.pth", weights_only=True)
    assert set(raw) == ({"discriminator"} if which.endswith("_dis") else {"iteration", "generator"})


def test_dataparallel_prefix_and_discriminator_alias_are_handled(tmp_path: Path) -> None:
    d = _randomize(ec.Discriminator(in_channels=3), seed=1)
    sd = {"module." + k: v for k, v in d.state_dict().items() if not k.startswith("features.")}
    torch.save({"discriminator": sd}, tmp_path / "InpaintingModel_dis.pth")
    loaded = ec.load_official(tmp_path / "InpaintingModel_dis.pth", "inpaint_dis")
    assert torch.equal(loaded.features[0].weight_orig, d.conv1[0].weight_orig)
    assert loaded.features is loaded.conv1


def test_new_style_spectral_norm_keys_are_remapped() -> None:
    # a network written with torch.nn.utils.parametrizations.spectral_norm on the same convolutions
    legacy = ec.EdgeGenerator(residual_blocks=1)
    ref = ec.EdgeGenerator(residual_blocks=1, use_spectral_norm=False)
    for name, mod in legacy.named_modules():
        if hasattr(mod, "weight_orig"):
            conv = ref.get_submodule(name)
            if conv.bias is not None and mod.bias is None:
                conv.bias = None
            torch.nn.utils.parametrizations.spectral_norm(conv)
    x = torch.rand(1, 3, 16, 16)
    ref.train()
    ref(x), ref(x)  # a few power iterations so u, v are not their initial values
    ref.eval()
    sd = ref.state_dict()
    assert any(".parametrizations.weight.original" in k for k in sd)
    legacy.load_state_dict(ec.checkpoint_filter_fn(sd, legacy), strict=True)
    legacy.eval()
    with torch.no_grad():
        torch.testing.assert_close(legacy(x), ref(x), rtol=1e-5, atol=1e-6)


def test_toolkit_models_take_official_weights(tmp_path: Path) -> None:
    g1 = _randomize(ec.EdgeGenerator(residual_blocks=1), 1)
    g2 = _randomize(ec.InpaintGenerator(residual_blocks=1), 2)
    torch.save({"iteration": 1, "generator": g1.state_dict()}, tmp_path / "EdgeModel_gen.pth")
    torch.save({"iteration": 1, "generator": g2.state_dict()}, tmp_path / "InpaintingModel_gen.pth")
    both = ec.build_edgeconnect(pretrained=tmp_path, residual_blocks=1)
    assert torch.equal(both.edge.encoder[1].weight_u, g1.encoder[1].weight_u)
    assert torch.equal(both.inpaint.decoder[7].weight, g2.decoder[7].weight)
    hash_ = ec.build_edgeconnect_inpaint(pretrained=tmp_path / "InpaintingModel_gen.pth", residual_blocks=1)
    assert torch.equal(hash_.inpaint.encoder[1].weight, g2.encoder[1].weight)
    # the adapter-interface filter: per-stage official dicts for EC, the file contents for EC#
    sd = ec.checkpoint_filter_fn({"edge": {"generator": g1.state_dict()}, "inpaint": g2.state_dict()}, both)
    assert set(sd) == set(both.state_dict())
    assert set(ec.checkpoint_filter_fn({"generator": g2.state_dict()}, hash_)) == set(hash_.state_dict())


def test_wrong_file_errors_name_the_expected_file(tmp_path: Path) -> None:
    torch.save({"iteration": 1, "generator": ec.InpaintGenerator().state_dict()}, tmp_path / "g2.pth")
    with pytest.raises(ValueError, match=r"InpaintGenerator \(InpaintingModel_gen.pth\).*EdgeModel_gen.pth"):
        ec.load_official(tmp_path / "g2.pth", "edge")
    with pytest.raises(ValueError, match="InpaintingModel_dis.pth"):
        ec.load_official(tmp_path / "g2.pth", model=ec.Discriminator(in_channels=3))

    torch.save({"discriminator": ec.Discriminator(2).state_dict()}, tmp_path / "d1.pth")
    with pytest.raises(ValueError, match=r"EdgeModel_dis.pth.*InpaintingModel_dis.pth"):
        ec.load_official(tmp_path / "d1.pth", "inpaint_dis")

    # another network altogether (StructureFlow-like keys)
    torch.save({"model.0.conv.weight": torch.zeros(3, 3, 3, 3)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not an EdgeConnect checkpoint"):
        ec.load_official(tmp_path / "other.pth")
    with pytest.raises(ValueError, match="model.0.conv.weight"):
        ec.load_official(tmp_path / "other.pth", "inpaint")


def test_missing_and_unexpected_keys_are_reported_by_name(tmp_path: Path) -> None:
    sd = ec.EdgeGenerator().state_dict()
    del sd["middle.3.conv_block.5.weight_v"]
    sd["middle.9.conv_block.1.weight_orig"] = torch.zeros(1)
    torch.save({"iteration": 0, "generator": sd}, tmp_path / "EdgeModel_gen.pth")
    with pytest.raises(ValueError, match=r"missing keys \(1\): middle.3.conv_block.5.weight_v.*unexpected keys "
                                         r"\(1\): middle.9.conv_block.1.weight_orig"):
        ec.load_official(tmp_path / "EdgeModel_gen.pth")


def test_pickled_code_is_refused(tmp_path: Path) -> None:
    torch.save({"generator": ec.InpaintGenerator(residual_blocks=1)}, tmp_path / "whole_module.pth")
    with pytest.raises(ValueError, match="weights_only"):
        ec.load_official(tmp_path / "whole_module.pth")


# ---------------------------------------------------------------- spectral norm in eval mode


def test_eval_spectral_norm_uses_stored_u_v() -> None:
    g = _randomize(ec.EdgeGenerator(residual_blocks=1), seed=5).eval()
    cases = (  # a convolution (SN over dim 0) and a transposed convolution (SN over dim 1)
        (g.encoder[4], torch.randn(2, 64, 8, 8), lambda w: w.flatten(1), lambda x, w, b: F.conv2d(x, w, b, 2, 1)),
        (g.decoder[3], torch.randn(2, 128, 8, 8), lambda w: w.transpose(0, 1).flatten(1),
         lambda x, w, b: F.conv_transpose2d(x, w, b, 2, 1)),
    )
    for conv, x, flat, op in cases:
        with torch.no_grad():  # stored vectors of unit length, as power iteration leaves them, but not converged
            conv.weight_u.copy_(F.normalize(torch.randn_like(conv.weight_u), dim=0))
            conv.weight_v.copy_(F.normalize(torch.randn_like(conv.weight_v), dim=0))
        w, u, v = conv.weight_orig.detach().clone(), conv.weight_u.clone(), conv.weight_v.clone()
        sigma = u @ flat(w) @ v  # u^T W v with the stored, unconverged vectors
        assert not torch.isclose(sigma, torch.linalg.matrix_norm(flat(w), ord=2), rtol=1e-2)
        with torch.no_grad():
            y = conv(x)
            ref = op(x.double(), (w / sigma).double(), conv.bias.double()).float()
        torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))
        assert torch.equal(conv.weight_u, u) and torch.equal(conv.weight_v, v)  # eval leaves them alone
    g.train()  # training runs one power iteration per call and moves u
    u = g.encoder[4].weight_u.clone()
    g.encoder[4](cases[0][1])
    assert not torch.equal(g.encoder[4].weight_u, u)


# ---------------------------------------------------------------- conventions


@pytest.mark.parametrize("name", ["astronaut", "coffee", "camera"])
def test_canny_matches_skimage_on_photos(name: str) -> None:
    img = _photo(name, 128)
    gray = color.rgb2gray(img)
    hole = np.zeros(gray.shape, bool)
    hole[30:80, 40:100] = True
    ours_gray = ec.rgb_to_gray(torch.from_numpy(img).permute(2, 0, 1)[None])
    np.testing.assert_allclose(ours_gray[0, 0].numpy(), gray, atol=1e-12)
    for hm in (None, hole):
        ref = feature.canny(gray, sigma=2, mask=None if hm is None else ~hm)
        for dtype in (torch.float64, torch.float32):
            out = ec.canny(ours_gray.to(dtype), 2.0, hole=None if hm is None else torch.from_numpy(hm)[None, None])
            agree = (out[0, 0].numpy().astype(bool) == ref).mean()
            assert agree >= 0.999, (name, hm is not None, dtype, agree)
            assert out.sum() > 100  # real edges found, not an empty map agreeing with an empty map


def test_canny_is_batched_and_ignores_hole_content() -> None:
    imgs = torch.stack([torch.from_numpy(color.rgb2gray(_photo(n, 64))) for n in ("astronaut", "coffee")])[:, None]
    holes = torch.zeros(2, 1, 64, 64)
    holes[0, :, 10:30, 10:40] = 1
    holes[1, :, 30:60, 5:25] = 1
    batched = ec.canny(imgs, hole=holes)
    for i in range(2):
        assert torch.equal(batched[i : i + 1], ec.canny(imgs[i : i + 1], hole=holes[i : i + 1]))
    scribbled = torch.where(holes > 0, torch.rand_like(imgs), imgs)
    assert torch.equal(ec.canny(scribbled, hole=holes), batched)
    assert (batched * holes).sum() == 0


def test_unit_range_round_trip() -> None:
    y = torch.rand(3, 3, 5, 7)
    torch.testing.assert_close(ec.to_unit(ec.from_unit(y)), y)
    torch.testing.assert_close(ec.to_unit(torch.tensor([-1.0, 0.0, 1.0])), torch.tensor([0.0, 0.5, 1.0]))


def test_ec_hash_matches_manual_conventions() -> None:
    torch.manual_seed(0)
    model = ec.EdgeConnectInpaint(residual_blocks=1).eval()
    img, m = torch.rand(2, 3, 30, 26) * 2 - 1, (torch.rand(2, 1, 30, 26) > 0.7).float()
    with torch.no_grad():
        out = model(img, m)
        x01 = (img + 1) / 2
        net_in = torch.cat([x01 * (1 - m) + m, torch.zeros_like(m)], 1)  # white holes, zero edge channel
        net_in = F.pad(net_in, (0, 2, 0, 2), mode="reflect")
        ref = model.inpaint(net_in)[..., :30, :26] * 2 - 1
    assert out.shape == img.shape
    torch.testing.assert_close(out, ref)
    assert out.min() >= -1 and out.max() <= 1


def test_two_stage_matches_official_pipeline_with_skimage_edges() -> None:
    torch.manual_seed(0)
    model = ec.EdgeConnect(residual_blocks=1).eval()
    img = _photo("chelsea", 48)
    hole = np.zeros((48, 48))
    hole[10:30, 12:34] = 1
    gray = color.rgb2gray(img)
    edge = feature.canny(gray, sigma=2, mask=hole == 0).astype(np.float64)

    def t(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a).float()[None, None] if a.ndim == 2 else torch.from_numpy(a).float().permute(2, 0, 1)[None]

    images, grays, edges, masks = t(img), t(gray), t(edge), t(hole)
    with torch.no_grad():
        e = model.edge(torch.cat([grays * (1 - masks) + masks, edges * (1 - masks), masks], 1))
        e = e * masks + edges * (1 - masks)  # the official stage-3 edge map
        ref = model.inpaint(torch.cat([images * (1 - masks) + masks, e], 1))
        out, e_ours, c_ours = model(images * 2 - 1, masks, return_edges=True)
    assert torch.equal(c_ours, edges)
    torch.testing.assert_close(e_ours, e, atol=1e-5, rtol=0)
    torch.testing.assert_close((out + 1) / 2, ref, atol=1e-5, rtol=0)


def test_bad_inputs_get_clear_errors() -> None:
    model = ec.EdgeConnectInpaint(residual_blocks=1)
    img = torch.rand(1, 3, 16, 16) * 2 - 1
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        model(img * 127.5 + 127.5, torch.zeros(1, 1, 16, 16))
    with pytest.raises(ValueError, match="RGB"):
        model(img[:, :1], torch.zeros(1, 1, 16, 16))
    with pytest.raises(ValueError, match="0/255"):
        model(img, torch.full((1, 1, 16, 16), 255.0))
    with pytest.raises(ValueError, match="at least"):
        model(torch.zeros(1, 3, 8, 16), torch.zeros(1, 1, 8, 16))
    with pytest.warns(UserWarning, match="1 = hole"):
        model(img, torch.ones(1, 1, 16, 16))
    with pytest.raises(ValueError, match="which must be one of"):
        ec.load_official(__file__, "edges")


# ---------------------------------------------------------------- gradients


def test_forward_backward_is_finite_for_both_variants() -> None:
    torch.manual_seed(0)
    img = torch.rand(1, 3, 32, 32) * 2 - 1
    m = torch.zeros(1, 1, 32, 32)
    m[..., 8:20, 10:24] = 1
    both = ec.EdgeConnect(residual_blocks=1, detach_edges=False)
    hash_ = ec.EdgeConnectInpaint(residual_blocks=1)
    d = ec.Discriminator(in_channels=3)
    for model in (both, hash_):
        out = model(img, m)
        score, feats = d(out)
        loss = (out - img).abs().mean() + score.mean() + sum(f.abs().mean() for f in feats)
        loss.backward()
        grads = [p.grad for p in model.parameters()]
        assert all(gr is not None and torch.isfinite(gr).all() for gr in grads)
        assert model.inpaint.encoder[1].weight.grad.abs().sum() > 0
    assert both.edge.encoder[1].weight_orig.grad.abs().sum() > 0  # G1 trains when edges are not detached
    assert score.shape == (1, 1, 2, 2) and len(feats) == 5

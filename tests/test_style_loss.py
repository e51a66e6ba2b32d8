"""Style/perceptual losses and the timm VGG extractor. VGG weights are RANDOM here (allow_random=True):
no pip package ships VGG weights, so these tests check Gram algebra, layer wiring against torchvision,
loading and errors - never loss values of a trained network."""

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from kdinpaint.losses.style import STYLE_PRESETS, VGGStyleLoss, gram_matrix, perceptual_loss, style_loss
from kdinpaint.losses.vgg import VGGFeatures, vgg_layer_names


def test_gram_known_matrix():
    # F = [[1, 2], [3, 4]] (C=2, H=1, W=2): F Fᵀ = [[5, 11], [11, 25]], divided by C·H·W = 4.
    f = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 2, 1, 2)
    assert torch.equal(gram_matrix(f), torch.tensor([[[5.0, 11.0], [11.0, 25.0]]]) / 4)


def test_style_loss_hand_computed():
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 2, 1, 2)
    b = torch.zeros_like(a)
    b[0, 0, 0, 0] = 2.0  # Gram of b: [[4, 0], [0, 0]] / 4
    expected = (abs(5 - 4) + 11 + 11 + 25) / 4 / 4  # mean over the 4 Gram entries
    assert style_loss({"x": a}, {"x": b}).item() == pytest.approx(expected)
    assert style_loss([a, a], [b, b]).item() == pytest.approx(2 * expected)
    assert perceptual_loss([a], [b], [0.5]).item() == pytest.approx(0.5 * (1 + 2 + 3 + 4) / 4)
    with pytest.raises(ValueError, match="layers differ"):
        style_loss({"x": a}, {"y": b})
    with pytest.raises(ValueError, match="shapes differ"):
        style_loss([a], [b[..., :1]])


def test_vgg_needs_weights_or_explicit_permission():
    with pytest.raises(ValueError, match="allow_random=True"):
        VGGFeatures("vgg16", ("relu1_1",))
    with pytest.raises(ValueError, match="unknown VGG layer"):
        VGGFeatures("vgg16", ("relu3_4",), allow_random=True)  # VGG16 has 3 convs in block 3
    with pytest.raises(ValueError, match="unknown VGG architecture"):
        VGGFeatures("resnet50", ("relu1_1",), allow_random=True)


def test_layer_names_match_torchvision_indices():
    # EdgeConnect's slices of torchvision's VGG19 end at features[8] (relu2_2), [17] (relu3_4), [26]
    # (relu4_4), [31] (relu5_2); partial conv's pool1..3 in VGG16 are features[4], [9], [16].
    names19 = vgg_layer_names(_tv_features("vgg19"))
    assert [names19.index(n) for n in ("relu2_2", "relu3_4", "relu4_4", "relu5_2")] == [8, 17, 26, 31]
    names16 = vgg_layer_names(_tv_features("vgg16"))
    assert [names16.index(n) for n in ("pool1", "pool2", "pool3")] == [4, 9, 16]


def _tv_features(arch: str) -> torch.nn.Sequential:
    """torchvision's VGG ``features`` with random weights (built on meta to skip the big classifier)."""
    with torch.device("meta"):
        model = getattr(torchvision.models, arch)()
    features = model.features.to_empty(device="cpu")
    for m in features:
        if isinstance(m, torch.nn.Conv2d):
            m.reset_parameters()
    return features


def test_local_file_loads_and_matches_torchvision(tmp_path):
    tv = _tv_features("vgg11").eval()  # random torchvision weights, saved as a user would
    sd = {f"features.{k}": v.contiguous() for k, v in tv.state_dict().items()}
    save_file(sd, str(tmp_path / "vgg11.safetensors"))
    torch.save(sd, tmp_path / "vgg11.pth")
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    ref = tv[:10](((x + 1) / 2 - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
                          / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))
    for name in ("vgg11.safetensors", "vgg11.pth"):
        vgg = VGGFeatures("vgg11", ("relu3_2",), weights=tmp_path / name)
        out = vgg(x)["relu3_2"]  # torchvision VGG11: features[9] is the ReLU after conv3_2
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        assert not any(p.requires_grad for p in vgg.parameters())
        vgg.train()
        assert not vgg.training
    with pytest.raises(ValueError, match="does not match"):
        VGGFeatures("vgg13", ("relu1_1",), weights=tmp_path / "vgg11.safetensors")
    torch.save(tv, tmp_path / "module.pth")  # a pickled module, not a state_dict
    with pytest.raises(ValueError, match="weights_only=True"):
        VGGFeatures("vgg11", ("relu1_1",), weights=tmp_path / "module.pth")
    with pytest.raises(FileNotFoundError):
        VGGFeatures("vgg11", ("relu1_1",), weights=tmp_path / "missing.pth")


@pytest.mark.parametrize("preset", [pytest.param("edgeconnect", marks=pytest.mark.slow), "pconv"])
def test_preset_module_wiring(preset):
    torch.manual_seed(0)
    loss = VGGStyleLoss(preset, allow_random=True)
    p = STYLE_PRESETS[preset]
    assert loss.vgg.layers == tuple(dict.fromkeys(p.style_layers + p.perceptual_layers))
    gt = torch.rand(1, 3, 32, 32) * 2 - 1
    m = torch.zeros(1, 1, 32, 32)
    m[..., 8:24, 8:24] = 1
    if preset == "pconv":
        same = loss(gt.clone(), gt, m)
        assert same["style"].item() == pytest.approx(0.0, abs=1e-7)
        assert same["perceptual"].item() == pytest.approx(0.0, abs=1e-7)
    noisy = (gt + 0.3 * torch.randn_like(gt)).requires_grad_()
    out = loss(noisy, gt, m)
    (out["style"] + out["perceptual"]).backward()
    assert noisy.grad is not None and float(noisy.grad.abs().sum()) > 0
    if preset == "edgeconnect":
        # style sees the hole only: changing known pixels leaves it unchanged
        known_changed = noisy.detach() * m + (gt + 0.5) * (1 - m)
        again = loss(known_changed, gt, m)
        assert again["style"].item() == pytest.approx(out["style"].item(), rel=1e-5)
        # and equals style_loss on the hole-masked [0,1] images fed unnormalised
        f = loss.vgg
        to = lambda x: ((x + 1) / 2 * m) * 2 - 1  # noqa: E731
        fp, ft = f(to(noisy)), f(to(gt))
        ref = style_loss({k: fp[k] for k in p.style_layers}, {k: ft[k] for k in p.style_layers})
        assert out["style"].item() == pytest.approx(ref.item(), rel=1e-5)
    with pytest.raises(ValueError, match="unknown style preset"):
        VGGStyleLoss("lama", allow_random=True)


@pytest.mark.parametrize("preset", ["pconv", "edgeconnect"])
def test_precomputed_target_features_give_the_same_loss_and_gradient(preset):
    # random VGG weights (allow_random): only the equality of the two paths is checked
    torch.manual_seed(0)
    loss = VGGStyleLoss(preset, allow_random=True)
    gt = torch.rand(2, 3, 32, 32) * 2 - 1
    m = torch.zeros(2, 1, 32, 32)
    m[0, :, 4:20, 6:26] = 1
    m[1, :, 10:28, 2:14] = 1
    pred = (gt + 0.3 * torch.randn_like(gt)).requires_grad_()
    plain = loss(pred, gt, m)
    cached = loss(pred, gt, m, loss.target_features(gt, m))
    for k in ("style", "perceptual"):
        torch.testing.assert_close(cached[k], plain[k], rtol=1e-6, atol=0)
    g_plain = torch.autograd.grad(plain["style"] + plain["perceptual"], pred)[0]
    g_cached = torch.autograd.grad(cached["style"] + cached["perceptual"], pred)[0]
    torch.testing.assert_close(g_cached, g_plain)
    with pytest.raises(TypeError):
        loss(pred, gt, m, {"grams": None})

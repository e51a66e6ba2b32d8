"""LPIPS and FID (kdinpaint.evaluation.perceptual) run here with UNTRAINED backbones: a random AlexNet for LPIPS
and a small random convolutional network for FID, through exactly the code that runs with the ImageNet / Inception
weights (nothing can be downloaded on these machines). The numbers are checked against naive re-computations
(the LPIPS formula from the network's own layers, the Fréchet distance with scipy's sqrtm), and the weight files'
loading with files of the real architectures that the tests write themselves.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

pytest.importorskip("torchmetrics")
pytest.importorskip("torch_fidelity")

from kdinpaint.evaluation.metrics import MetricUnavailable  # noqa: E402
from kdinpaint.evaluation.perceptual import (  # noqa: E402
    ENV,
    FID,
    INCEPTION_FILES,
    LPIPS,
    LPIPS_BACKBONES,
    fid,
    perceptual_to_markdown,
    perceptual_unavailable,
    score_perceptual,
    weights_dir,
    weights_file,
)


class SmallFeatures(nn.Module):
    """A random 2-layer feature network: ``uint8`` images in, 16 pooled features out."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv1 = nn.Conv2d(3, 8, 3, stride=2)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() / 127.5 - 1
        return torch.tanh(self.conv2(torch.relu(self.conv1(x)))).mean((2, 3))  # (B, 16)


def _images(n: int = 24, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 3, 1, 1, generator=g) * 1.6 - 0.8  # one colour per image, plus texture
    return (base + 0.2 * torch.randn(n, 3, size, size, generator=g)).clamp(-1, 1)


def _noisy(x: torch.Tensor, sigma: float) -> torch.Tensor:
    return (x + sigma * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))).clamp(-1, 1)


def _frechet(a: np.ndarray, b: np.ndarray) -> float:
    """The Fréchet distance of two Gaussians fitted to feature rows, with scipy's matrix square root."""
    m1, m2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((m1 - m2) ** 2).sum() + np.trace(s1 + s2 - 2 * root))


def test_fid_of_a_set_against_itself_is_zero_and_grows_with_noise():
    x = _images()
    net = SmallFeatures()
    assert abs(fid(x, x, extractor=net)) < 1e-6
    scores = [fid(x, _noisy(x, s), extractor=net, batch_size=7) for s in (0.05, 0.2, 0.5)]
    assert 0 < scores[0] < scores[1] < scores[2], scores


def test_fid_is_the_frechet_distance_of_the_features_scipy_computes():
    x, y = _images(seed=0), _noisy(_images(seed=2), 0.1)
    net = SmallFeatures()
    to_u8 = lambda t: ((t + 1) * 127.5).clamp(0, 255).round().to(torch.uint8)  # noqa: E731
    with torch.no_grad():
        fa, fb = net(to_u8(x)).double().numpy(), net(to_u8(y)).double().numpy()
    assert fid(x, y, extractor=net, batch_size=5) == pytest.approx(_frechet(fa, fb), rel=1e-4, abs=1e-8)


def test_fid_needs_two_images_per_set():
    metric = FID(extractor=SmallFeatures())
    metric.update(real=_images(2), fake=_images(1))
    with pytest.raises(ValueError, match="at least 2 images"):
        metric.compute()


def _lpips_by_hand(model: LPIPS, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Eq. 1 of Zhang et al. 2018 from the network's own layers: per layer, unit-normalise the features over channels,
    square the difference, weight the channels by the linear head, average over space; sum the layers."""
    inner = model.model
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)  # LPIPS' scaling layer constants
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
    total = torch.zeros(a.shape[0])
    fa, fb = (a - shift) / scale, (b - shift) / scale
    for k, block in enumerate([inner.net.slice1, inner.net.slice2, inner.net.slice3, inner.net.slice4, inner.net.slice5]):
        fa, fb = block(fa), block(fb)
        na = fa / torch.sqrt((fa**2).sum(1, keepdim=True) + 1e-8)
        nb = fb / torch.sqrt((fb**2).sum(1, keepdim=True) + 1e-8)
        w = inner.lins[k].model[-1].weight.view(1, -1, 1, 1)
        total += ((na - nb) ** 2 * w).sum(1).mean((1, 2))
    return total


def test_lpips_with_a_random_backbone_is_zero_for_equal_images_grows_with_noise_and_is_the_formula():
    model = LPIPS("alex", random_backbone=True)
    assert model.backbone == "random (seed 0)"
    heads = [p for n, p in model.model.named_parameters() if n.startswith("lin")]
    assert heads and all((p >= 0).all() for p in heads)  # the bundled trained heads (random ones have negatives)
    x = _images(4, 64)
    assert torch.equal(model(x, x), torch.zeros(4))
    d = [model(x, _noisy(x, s)) for s in (0.05, 0.2, 0.5)]
    assert (d[0] > 0).all() and (d[0] < d[1]).all() and (d[1] < d[2]).all()
    with torch.no_grad():
        assert torch.allclose(d[1], _lpips_by_hand(model, x, _noisy(x, 0.2)), rtol=1e-4, atol=1e-7)


@pytest.mark.slow
def test_lpips_loads_the_backbone_from_a_torchvision_file(tmp_path):
    import torchvision

    torch.manual_seed(3)
    state = torchvision.models.alexnet(weights=None).state_dict()
    torch.save(state, tmp_path / LPIPS_BACKBONES["alex"][1])
    model = LPIPS("alex", weights=tmp_path)
    assert model.backbone == "ImageNet (alexnet-owt-7be5be79.pth)"
    assert torch.equal(getattr(model.model.net.slice1, "0").weight, state["features.0.weight"])
    assert torch.equal(getattr(model.model.net.slice5, "10").bias, state["features.10.bias"])
    # the file itself may be given too; a VGG file is refused for AlexNet, naming the key
    assert LPIPS("alex", weights=tmp_path / LPIPS_BACKBONES["alex"][1]).backbone == model.backbone
    torch.save(torchvision.models.squeezenet1_1(weights=None).state_dict(), tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not torchvision's alexnet state_dict: features.0.weight"):
        LPIPS("alex", weights=tmp_path / "other.pth")


def test_fid_loads_the_inception_from_a_file_of_its_architecture(tmp_path):
    """A file with the FID Inception's keys (random values the test makes) is what torch-fidelity's network holds."""
    from unittest import mock

    import torch_fidelity.feature_extractor_inceptionv3 as fe

    with mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None), \
            mock.patch.object(fe, "load_state_dict_from_url", lambda *a, **k: {}):
        torch.manual_seed(0)
        state = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"]).state_dict()
    torch.save(state, tmp_path / INCEPTION_FILES[1])  # pytorch-fid's name of the same file is accepted too
    metric = FID(weights=tmp_path)
    assert metric.backbone == f"Inception ({INCEPTION_FILES[1]})"
    held = metric.metric.inception.state_dict()
    assert torch.equal(held["Mixed_7c.branch_pool.conv.weight"], state["Mixed_7c.branch_pool.conv.weight"])


def test_a_missing_file_is_named_with_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV, str(tmp_path))
    with pytest.raises(MetricUnavailable, match=f"alexnet-owt-7be5be79.pth in {tmp_path}.*--perceptual-weights DIR"):
        weights_file("alex")
    with pytest.raises(MetricUnavailable, match=f"FID needs the weights file {INCEPTION_FILES[0]} in {tmp_path}"):
        FID()
    why = perceptual_unavailable("vgg", tmp_path / "elsewhere")
    assert "vgg16-397923af.pth" in why and "elsewhere" in why
    monkeypatch.delenv(ENV)
    assert weights_dir() == Path(torch.hub.get_dir()) / "checkpoints"  # default: where torchvision caches them
    with pytest.raises(ValueError, match="unknown backbone 'resnet'"):
        weights_file("resnet")


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch " + os.environ["KDINPAINT_TEST_MARK"],))


def test_a_weights_file_that_would_run_code_is_refused_and_nothing_runs(tmp_path, monkeypatch):
    mark = tmp_path / "ran"
    monkeypatch.setenv("KDINPAINT_TEST_MARK", str(mark))
    path = tmp_path / LPIPS_BACKBONES["alex"][1]
    with open(path, "wb") as f:
        pickle.dump({"features.0.weight": _Payload()}, f)
    with pytest.raises(ValueError, match="weights_only=True"):
        LPIPS("alex", weights=tmp_path)
    path2 = tmp_path / INCEPTION_FILES[0]
    path2.write_bytes(path.read_bytes())
    with pytest.raises(ValueError, match="weights_only=True"):
        FID(weights=tmp_path)
    assert not mark.exists()


def test_score_perceptual_scores_composites_per_bucket_and_says_the_backbone_is_random():
    images = _images(6, 64)
    masks = torch.zeros(6, 1, 64, 64)
    masks[:3, :, 8:30, 8:40] = 1  # 0.17 of the image: bucket 10-20 %
    masks[3:, :, 4:40, 4:44] = 1  # 0.35: bucket 30-40 %
    lp, net = LPIPS("alex", random_backbone=True), SmallFeatures()

    def keep(image, mask):  # a perfect fill: the composite is the original
        return image.clone()

    def grey(image, mask):
        return torch.zeros_like(image)

    perfect = score_perceptual(keep, images, masks, lpips=lp, fid=FID(extractor=net), batch_size=4)
    assert perfect["lpips"]["buckets"]["all"] == {"count": 6, "mean": 0.0}
    assert abs(perfect["fid"]) < 1e-6
    worse = score_perceptual(grey, images, masks, lpips=lp, fid=FID(extractor=net), batch_size=4)
    buckets = worse["lpips"]["buckets"]
    assert buckets["10-20%"]["count"] == 3 and buckets["30-40%"]["count"] == 3 and buckets["20-30%"]["count"] == 0
    assert 0 < buckets["10-20%"]["mean"] < buckets["30-40%"]["mean"]  # a larger grey hole is further away
    by_hand = lp(torch.where(masks.bool(), torch.zeros_like(images), images), images)
    assert np.allclose(worse["lpips_rows"], by_hand.numpy(), rtol=1e-5)
    assert worse["fid"] > 0
    table = perceptual_to_markdown({"grey": worse, "perfect": perfect})
    assert "| LPIPS-alex ↓ | grey |" in table and "| FID ↓ | perfect |" in table
    assert "UNTRAINED BACKBONE" in table and "random (seed 0)" in table and "custom (SmallFeatures)" in table


def test_evaluate_names_the_missing_weights_and_refuses_perceptual_before_running(tmp_path, capsys):
    from kdinpaint.cli import main

    args = ["evaluate", "--baseline", "mean", "--count", "2", "--size", "32", "--no-progress", "--perceptual-weights", str(tmp_path)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"LPIPS and FID not computed: LPIPS-alex needs the weights file alexnet-owt-7be5be79.pth in {tmp_path}" in out
    assert main([*args, "--perceptual"]) == 1
    err = capsys.readouterr()
    assert "--perceptual: LPIPS-alex needs the weights file" in err.err and "PSNR" not in err.out
    assert main([*args, "--no-perceptual"]) == 0
    assert "LPIPS" not in capsys.readouterr().out


@pytest.mark.slow
def test_evaluate_prints_and_writes_lpips_and_fid_when_the_weights_are_there(tmp_path, capsys, monkeypatch):
    """With the weight files present ``kdinpaint evaluate`` scores the network and biharmonic and writes the scores
    into --json: LPIPS with an AlexNet file of random values the test writes, FID with the small random feature
    network in place of the Inception (whose file-loading is tested above; its forward at 299 px is slow here)."""
    import json

    import torchvision

    from kdinpaint.cli import main
    from kdinpaint.evaluation import perceptual

    torch.manual_seed(0)
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), tmp_path / LPIPS_BACKBONES["alex"][1])
    (tmp_path / INCEPTION_FILES[0]).write_bytes(b"")  # present; the stand-in below does not read it
    monkeypatch.setattr(perceptual, "FID", lambda weights=None: FID(extractor=SmallFeatures()))
    out_json = tmp_path / "eval.json"
    assert main(["evaluate", "--baseline", "mean", "--floor", "biharmonic", "--count", "3", "--size", "32",
                 "--no-progress", "--perceptual-weights", str(tmp_path), "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert "| LPIPS-alex ↓ | mean |" in out and "| LPIPS-alex ↓ | biharmonic |" in out and "| FID ↓ | mean |" in out
    assert "ImageNet (alexnet-owt-7be5be79.pth)" in out and "UNTRAINED BACKBONE" in out
    saved = json.loads(out_json.read_text())["perceptual"]
    assert set(saved) == {"mean", "biharmonic"} and saved["mean"]["lpips"]["buckets"]["all"]["count"] == 3
    assert saved["mean"]["lpips"]["buckets"]["all"]["mean"] > 0 and saved["mean"]["fid"] > 0

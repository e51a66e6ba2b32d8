"""GMCNN confidence-driven reconstruction loss: hand-computed maps, scipy oracle, naive loops, edge cases."""

import numpy as np
import pytest
import scipy.stats
import torch

from kdinpaint.losses.reconstruction import (
    confidence_weight,
    gmcnn_kernel1d,
    masked_l1,
    spatially_varying_l1,
)


def _naive_weight(mask: np.ndarray, k: int, iters: int, pad_mode: str) -> np.ndarray:
    """Pixel-by-pixel re-computation with a k×k box filter (np.pad 'reflect' = torch 'reflect')."""
    hole = mask.astype(np.float64)
    known = 1 - hole
    conf = known.copy()
    r = k // 2
    for _ in range(iters):
        padded = np.pad(conf, r, mode=pad_mode)
        blur = np.zeros_like(conf)
        for i in range(conf.shape[0]):
            for j in range(conf.shape[1]):
                blur[i, j] = padded[i : i + k, j : j + k].mean()
        weight = blur * hole
        conf = weight + known
    return weight


def test_hand_computed_single_hole_pixel():
    # One hole pixel with 8 known neighbours, 3×3 box: 8/9 after one pass, (8 + 8/9)/9 = 80/81 after two.
    m = torch.zeros(1, 1, 5, 5)
    m[0, 0, 2, 2] = 1
    w1 = confidence_weight(m, kernel_size=3, iterations=1, kernel="box", padding="zeros")
    w2 = confidence_weight(m, kernel_size=3, iterations=2, kernel="box", padding="zeros")
    assert w1[0, 0, 2, 2].item() == pytest.approx(8 / 9, abs=1e-6)
    assert w2[0, 0, 2, 2].item() == pytest.approx(80 / 81, abs=1e-6)
    assert w2.sum().item() == pytest.approx(80 / 81, abs=1e-6)  # exactly 0 on known pixels


def test_hand_computed_two_pixel_hole():
    # Holes at (2,1) and (2,2): each 3×3 window holds both holes and 7 known pixels: 7/9 after one
    # pass, then (7 + 2 * 7/9) / 9 = 77/81.
    m = torch.zeros(1, 1, 5, 5)
    m[0, 0, 2, 1:3] = 1
    w = confidence_weight(m, kernel_size=3, iterations=2, kernel="box", padding="zeros")
    assert w[0, 0, 2, 1].item() == pytest.approx(77 / 81, abs=1e-6)
    assert w[0, 0, 2, 2].item() == pytest.approx(77 / 81, abs=1e-6)


@pytest.mark.parametrize("padding,np_mode", [("reflect", "reflect"), ("zeros", "constant")])
def test_matches_naive_loops(padding, np_mode):
    g = torch.Generator().manual_seed(0)
    m = (torch.rand(1, 1, 12, 10, generator=g) < 0.4).float()
    m[0, 0, 0, 0] = 0
    w = confidence_weight(m, kernel_size=5, iterations=3, kernel="box", padding=padding)
    ref = _naive_weight(m[0, 0].numpy(), 5, 3, np_mode)
    np.testing.assert_allclose(w[0, 0].numpy(), ref, atol=1e-6)


def test_gmcnn_kernel_against_scipy_construction():
    size, sigma = 65, 1 / 40
    interval = (2 * sigma + 1.0) / size
    x = np.linspace(-sigma - interval / 2, sigma + interval / 2, size + 1)
    d = np.diff(scipy.stats.norm.cdf(x))
    k2 = np.sqrt(np.outer(d, d))
    k2 /= k2.sum()
    k1 = gmcnn_kernel1d(size, sigma).numpy()
    np.testing.assert_allclose(np.outer(k1, k1), k2, rtol=1e-9)
    assert k2.max() / k2.min() == pytest.approx(1.0005, abs=2e-4)  # nearly a box filter


def test_gmcnn_default_values_on_square_hole():
    # 128² centred hole in 256²: the centre weight after 7 passes of the 65×65 kernel (measured on
    # GMCNN's own construction: 0.495), the edge about 0.85, exact zeros outside.
    m = torch.zeros(1, 1, 256, 256)
    m[..., 64:192, 64:192] = 1
    w = confidence_weight(m)
    assert w[0, 0, 128, 128].item() == pytest.approx(0.495, abs=2e-3)
    assert w[0, 0, 64, 128].item() == pytest.approx(0.851, abs=2e-3)
    assert float(w[m == 0].abs().max()) == 0.0
    assert 0 <= float(w.min()) and float(w.max()) <= 1
    box = confidence_weight(m, kernel="box")
    assert float((box - w).abs().max()) < 2e-3


def test_loss_equals_gmcnn_formula_and_gradient_is_hole_only():
    g = torch.Generator().manual_seed(1)
    pred = (torch.rand(2, 3, 40, 40, generator=g) * 2 - 1).requires_grad_()
    gt = torch.rand(2, 3, 40, 40, generator=g) * 2 - 1
    m = torch.zeros(2, 1, 40, 40)
    m[0, :, 10:30, 5:25] = 1
    m[1, :, 0:8, 0:40] = 1
    w = confidence_weight(m, kernel_size=15)
    loss = spatially_varying_l1(pred, gt, m, kernel_size=15)
    completed = pred * m + gt * (1 - m)
    ref = (w * (completed - gt)).abs().mean() / m.mean()  # GMCNN's L1Loss(completed*W, gt*W)/mean(M)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    loss.backward()
    assert float(pred.grad[(m == 0).expand_as(pred)].abs().max()) == 0.0
    assert float(pred.grad.abs().sum()) > 0


def test_loss_zero_without_hole_and_errors():
    pred = torch.rand(1, 3, 40, 40, requires_grad=True)
    gt = torch.rand(1, 3, 40, 40)
    empty = torch.zeros(1, 1, 40, 40)
    loss = spatially_varying_l1(pred, gt, empty)
    assert loss.item() == 0.0 and not torch.isnan(loss)
    loss.backward()
    with pytest.raises(ValueError, match="all hole"):
        spatially_varying_l1(pred, gt, torch.ones(1, 1, 40, 40), kernel_size=7)
    with pytest.raises(ValueError, match="0/255"):
        spatially_varying_l1(pred, gt, empty + 255)
    with pytest.raises(ValueError, match="resize the mask"):
        spatially_varying_l1(pred, gt, torch.zeros(1, 1, 20, 20))
    with pytest.raises(ValueError, match="smaller kernel_size"):
        confidence_weight(torch.zeros(1, 1, 16, 16))
    with pytest.raises(ValueError, match="kernel must be"):
        confidence_weight(empty, kernel="gauss")


def test_masked_l1_regions():
    g = torch.Generator().manual_seed(2)
    pred, gt = torch.rand(2, 3, 8, 8, generator=g), torch.rand(2, 3, 8, 8, generator=g)
    m = (torch.rand(2, 1, 8, 8, generator=g) < 0.3).float()
    d = (pred - gt).abs()
    hole = d.permute(0, 2, 3, 1)[m[:, 0] == 1]
    known = d.permute(0, 2, 3, 1)[m[:, 0] == 0]
    assert masked_l1(pred, gt, m).item() == pytest.approx(hole.mean().item(), rel=1e-6)
    assert masked_l1(pred, gt, m, "known").item() == pytest.approx(known.mean().item(), rel=1e-6)
    assert masked_l1(pred, gt, m, "all").item() == pytest.approx(d.mean().item(), rel=1e-6)
    assert masked_l1(pred, gt, torch.zeros_like(m)).item() == 0.0
    with pytest.raises(ValueError, match="region"):
        masked_l1(pred, gt, m, "valid")

"""Weight-free baselines in toolkit conventions, against skimage and hand-computed fills."""

import importlib.util

import numpy as np
import pytest
import torch
from skimage.restoration import inpaint_biharmonic

from kdinpaint.evaluation.baselines import BASELINES, biharmonic, get_baseline, mean_fill, telea
from kdinpaint.data import sample_images


@pytest.fixture(scope="module")
def case():
    image = sample_images(32, 2, names=["chelsea", "rocket"])
    mask = torch.zeros(2, 1, 32, 32)
    mask[0, :, 8:16, 10:20] = 1
    mask[1, :, 20:28, 4:12] = 1
    return image, mask


def test_biharmonic_matches_skimage(case):
    image, mask = case
    out = biharmonic(image, mask)
    assert out.shape == image.shape and out.dtype == image.dtype
    ref = inpaint_biharmonic(((image[0] + 1) / 2).permute(1, 2, 0).numpy(), mask[0, 0].numpy() > 0, channel_axis=-1)
    np.testing.assert_allclose(((out[0] + 1) / 2).permute(1, 2, 0).numpy(), ref, atol=1e-5)
    known = (mask == 0).expand_as(image)
    assert torch.equal(out[known], image[known])
    # a smooth fill beats leaving the hole at zero
    hole = (mask == 1).expand_as(image)
    assert (out - image)[hole].abs().mean() < image[hole].abs().mean()


def test_mean_fill_hand_computed():
    image = torch.tensor([[[[-1.0, 0.0], [0.5, 1.0]]]]).expand(1, 3, 2, 2).clone()
    mask = torch.tensor([[[[0.0, 0.0], [0.0, 1.0]]]])
    out = mean_fill(image, mask)
    assert out[0, :, 1, 1].tolist() == pytest.approx([(-1 + 0 + 0.5) / 3] * 3)
    assert torch.equal(out[0, :, 0], image[0, :, 0])


@pytest.mark.skipif(importlib.util.find_spec("cv2") is None, reason="OpenCV is an optional extra (kdinpaint[cv])")
def test_telea_with_opencv(case):
    import cv2

    image, mask = case
    out = telea(image, mask)
    u8 = np.round(((image[0] + 1) / 2).permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    ref = cv2.inpaint(u8, mask[0, 0].numpy().astype(np.uint8) * 255, 3, cv2.INPAINT_TELEA) / 255.0
    hole = mask[0, 0].numpy() > 0
    np.testing.assert_allclose(((out[0] + 1) / 2).permute(1, 2, 0).numpy()[hole], ref[hole], atol=1e-6)


@pytest.mark.skipif(importlib.util.find_spec("cv2") is not None, reason="checks the message shown without OpenCV")
def test_telea_without_opencv_says_how_to_install(case):
    with pytest.raises(ImportError, match=r"kdinpaint\[cv\]"):
        telea(*case)


def test_registry_and_bad_inputs(case):
    image, mask = case
    assert set(BASELINES) == {"biharmonic", "telea", "ns", "mean", "pyramid"}
    assert get_baseline("mean") is mean_fill
    with pytest.raises(ValueError, match="unknown baseline"):
        get_baseline("lama")
    with pytest.raises(ValueError, match="all hole"):
        mean_fill(image, torch.ones_like(mask))
    with pytest.raises(ValueError, match="resize the mask"):
        biharmonic(image, mask[..., :16, :16])
    with pytest.raises(ValueError, match="0/255"):
        mean_fill(image, mask * 255)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        mean_fill(image[:, :1], mask)
    empty = biharmonic(image, torch.zeros_like(mask))
    assert torch.equal(empty, image)


def test_pyramid_baseline_is_the_prefill_of_the_reference_network():
    """``pyramid`` is exactly what ReferenceNet(prefill=True) starts from, composited: a fresh such network
    (its correction is zero) gives the same holes up to the atanh clamp."""
    from kdinpaint_adapters.reference import ReferenceNet

    from kdinpaint.ops.fill import harmonic_fill

    torch.manual_seed(0)
    image = torch.rand(2, 3, 32, 32) * 1.6 - 0.8
    mask = (torch.rand(2, 1, 32, 32) > 0.7).float()
    out = get_baseline("pyramid")(image, mask)
    assert torch.equal(out * (1 - mask), image * (1 - mask))
    assert torch.allclose(out * mask, harmonic_fill(image, mask, 64, 100).clamp(-1, 1) * mask)
    with torch.no_grad():
        fresh = ReferenceNet(width=4, prefill=True)(image * (1 - mask), mask)
    inside = (out.abs() < 0.999) & (mask > 0).expand_as(out)
    assert inside.any() and torch.allclose(fresh[inside], out[inside], atol=1e-5)


def test_biharmonic_solves_in_float64():
    # a quarter hole of a 128x128 image: scikit-image in float32 is off by about 6e-3 here, in float64 it is not
    from kdinpaint.evaluation.baselines import biharmonic

    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, 128, 128, generator=g) * 2 - 1
    mask = torch.zeros(1, 1, 128, 128)
    mask[..., 32:96, 32:96] = 1
    x = ((image[0].double() + 1) / 2).permute(1, 2, 0).numpy()
    expected = inpaint_biharmonic(x, mask[0, 0].numpy() > 0.5, channel_axis=-1)  # float64 reference
    got = ((biharmonic(image, mask)[0].double() + 1) / 2).permute(1, 2, 0).numpy()
    assert np.abs(got - expected).max() < 1e-6  # float32 rounding of the result only
    f32 = inpaint_biharmonic(x.astype(np.float32), mask[0, 0].numpy() > 0.5, channel_axis=-1)
    assert np.abs(f32 - expected).max() > 1e-3  # what float32 gave

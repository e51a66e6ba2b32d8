"""RN / EdgeConnect discriminator and nsgan loss against torch's BCE and hand-computed shapes."""

import pytest
import torch
import torch.nn.functional as F

from kdinpaint.losses.adversarial import (
    ADAM_BETAS,
    ADV_WEIGHT,
    D_LR_RATIO,
    PatchDiscriminator,
    discriminator_loss,
    discriminator_optimizer,
    generator_adv_loss,
)


def test_architecture_and_patch_map():
    d = PatchDiscriminator()
    convs = [m for m in d.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 128, 256, 512, 1]
    assert [c.stride[0] for c in convs] == [2, 2, 2, 1, 1]
    assert all(c.kernel_size == (4, 4) and c.bias is None for c in convs)
    assert all(hasattr(c, "parametrizations") for c in convs)  # spectral norm on every layer
    # 256 → 128 → 64 → 32 → 31 → 30, hand-computed with (n + 2 - 4) / s + 1
    with torch.no_grad():
        logits, feats = d(torch.zeros(1, 3, 256, 256))
    assert logits.shape == (1, 1, 30, 30) and len(feats) == 5
    with pytest.raises(ValueError, match="H, W >= 32"):
        d(torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        d(torch.zeros(1, 4, 64, 64))


def test_nsgan_equals_bce_on_sigmoid():
    g = torch.Generator().manual_seed(0)
    real, fake = torch.randn(2, 1, 5, 5, generator=g), torch.randn(2, 1, 5, 5, generator=g)
    pr, pf = torch.sigmoid(real), torch.sigmoid(fake)
    ref_d = 0.5 * (F.binary_cross_entropy(pr, torch.ones_like(pr)) + F.binary_cross_entropy(pf, torch.zeros_like(pf)))
    assert discriminator_loss(real, fake).item() == pytest.approx(ref_d.item(), rel=1e-5)
    ref_g = -torch.log(pf).mean()  # non-saturating: -log D(G(z))
    assert generator_adv_loss(fake).item() == pytest.approx(ref_g.item(), rel=1e-5)
    assert discriminator_loss(real, fake, "hinge").item() == pytest.approx(
        0.5 * (F.relu(1 - real).mean() + F.relu(1 + fake).mean()).item(), rel=1e-6
    )
    assert generator_adv_loss(fake, "hinge").item() == pytest.approx(-fake.mean().item(), rel=1e-6)
    with pytest.raises(ValueError, match="unknown adversarial loss"):
        generator_adv_loss(fake, "wgan")


def test_defaults_and_optimizer():
    assert (ADV_WEIGHT, D_LR_RATIO, ADAM_BETAS) == (0.1, 0.1, (0.0, 0.9))
    d = PatchDiscriminator(base_channels=8)
    opt = discriminator_optimizer(d, 1e-4)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-5)
    assert opt.param_groups[0]["betas"] == (0.0, 0.9)
    with pytest.raises(ValueError, match="positive"):
        discriminator_optimizer(d, 0.0)


def test_discriminator_learns_to_separate():
    torch.manual_seed(0)
    d = PatchDiscriminator(base_channels=8)
    opt = torch.optim.Adam(d.parameters(), lr=2e-3, betas=ADAM_BETAS)
    real = torch.rand(4, 3, 32, 32) * 0.5 + 0.5
    fake = -torch.rand(4, 3, 32, 32) * 0.5 - 0.5
    first = None
    for _ in range(12):
        loss = discriminator_loss(d(real)[0], d(fake)[0])
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first
    with torch.no_grad():
        assert float(d.probabilities(real).mean()) > float(d.probabilities(fake).mean())

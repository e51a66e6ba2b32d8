"""Eq. (11) as a TrainingObjective (``eq11``): its terms against the loss functions called directly and the
adversarial terms written out (softplus of the logits), the registered-loss-function form, the registry.

The VGG has random weights (``allow_random_vgg``): only the arithmetic of the style term is checked.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from kdinpaint import plugins
from kdinpaint.losses.reconstruction import confidence_weight, spatially_varying_l1
from kdinpaint.train.objective import BatchMemo, Eq11Objective, is_training_objective, total_of
from tiny import loss_case



def test_eq11_is_registered_and_is_the_recipe_default():
    from kdinpaint.train.recipe import Recipe

    assert plugins.get_loss("eq11") is Eq11Objective and is_training_objective(Eq11Objective)
    assert Recipe().losses.objective == "eq11"
    assert set(Eq11Objective.recipe_keys) <= set(vars(Recipe().losses))  # every key it reads exists in the recipe


def test_generator_and_discriminator_losses_recomputed():
    torch.manual_seed(0)
    obj = Eq11Objective(lambda_r=1.3, lambda_s=7.0, vgg=None, allow_random_vgg=True, adversarial=0.2, recon_padding="zeros")
    pred, target, mask = loss_case()
    twin = copy.deepcopy(obj)  # the discriminator's power iteration moves in training mode: the reference gets its own
    terms = obj.generator_loss(pred, target, mask)

    composite = pred * mask + target * (1 - mask)
    recon = spatially_varying_l1(pred, target, mask, weight=confidence_weight(mask, padding="zeros"))
    style = twin.style(pred, target, mask)["style"]
    logits = twin.discriminators["patch"](composite)[0]
    adversarial = F.softplus(-logits).mean()  # nsgan generator: -log sigmoid(D(fake))
    torch.testing.assert_close(terms["recon"], 1.3 * recon)
    torch.testing.assert_close(terms["style"], 7.0 * style)
    torch.testing.assert_close(terms["adversarial"], 0.2 * adversarial)
    torch.testing.assert_close(total_of(terms, "eq11"), 1.3 * recon + 7.0 * style + 0.2 * adversarial)

    d = obj.discriminator_loss(pred.detach(), target, mask)
    disc = twin.discriminators["patch"]
    real, fake = disc(target)[0], disc(composite.detach())[0]
    expected = 0.5 * (F.softplus(-real).mean() + F.softplus(fake).mean())  # BCE with 1 for real, 0 for fake
    torch.testing.assert_close(total_of(d, "eq11.discriminator_loss"), expected)


def test_switched_off_terms_build_nothing():
    obj = Eq11Objective(lambda_s=0.0, adversarial=0.0, recon_padding="zeros")
    assert obj.style is None and len(obj.discriminators) == 0 and obj.discriminator_parameters() == []
    pred, target, mask = loss_case()
    terms = obj.generator_loss(pred, target, mask)
    assert set(terms) == {"recon", "total"}
    assert obj.discriminator_loss(pred.detach(), target, mask) is None


def test_ssim_term_is_one_minus_skimage_ssim_of_the_composite():
    from skimage.metrics import structural_similarity

    obj = Eq11Objective(lambda_r=1.0, lambda_s=0.0, adversarial=0.0, recon_padding="zeros", ssim=2.5)
    pred, target, mask = loss_case()
    terms = obj.generator_loss(pred, target, mask)
    composite = ((pred * mask + target * (1 - mask)).detach() + 1) / 2
    reference = [  # the metric's convention: 11x11 Gaussian (sigma 1.5), population covariance, per channel
        structural_similarity(
            c.permute(1, 2, 0).double().numpy(), t.permute(1, 2, 0).double().numpy(), channel_axis=2,
            data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
        )
        for c, t in zip(composite, (target + 1) / 2)
    ]
    expected = 2.5 * (1 - torch.tensor(reference).mean())
    torch.testing.assert_close(terms["ssim"].double(), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(terms["total"], terms["recon"] + terms["ssim"])
    terms["total"].backward()
    assert terms["ssim"].dtype == pred.dtype and torch.isfinite(pred.grad).all()
    assert pred.grad[mask.expand_as(pred) == 0].abs().max() == 0  # known pixels are the target's: no gradient
    with pytest.raises(ValueError, match="ssim .* >= 0"):
        Eq11Objective(lambda_s=0.0, adversarial=0.0, ssim=-1.0)


def test_a_registered_loss_function_replaces_recon_and_style():
    calls = []

    def with_vgg(pred, target, mask, vgg=None):
        calls.append(vgg)
        return (pred - target).abs().mean()

    obj = Eq11Objective(lambda_r=2.0, lambda_s=5.0, vgg=None, allow_random_vgg=True, adversarial=0.0, loss=with_vgg)
    pred, target, mask = loss_case()
    terms = obj.generator_loss(pred, target, mask)
    assert set(terms) == {"loss", "total"} and calls == [obj.style] and obj.style is not None
    torch.testing.assert_close(terms["total"], 2.0 * (pred - target).abs().mean())
    plain = Eq11Objective(lambda_s=5.0, adversarial=0.0, loss=lambda p, t, m: (p - t).pow(2).mean())
    assert plain.style is None  # a loss without vgg= gets no VGG (none is built)
    with pytest.raises(TypeError, match="loss function"):
        Eq11Objective(adversarial=0.0, lambda_s=0.0, loss=Eq11Objective)


def test_batch_memo_computes_each_value_once_per_batch():
    memo, calls = BatchMemo(), []
    target, mask = torch.zeros(1, 3, 4, 4), torch.zeros(1, 1, 4, 4)
    for _ in range(5):  # the 2T + 1 loss calls of one Algorithm-1 block, two values each
        assert memo.get("a", (target, mask), lambda: calls.append("a") or 1) == 1
        assert memo.get("b", (target, mask), lambda: calls.append("b") or 2) == 2
    assert calls == ["a", "b"]
    memo.get("a", (target.clone(), mask), lambda: calls.append("a") or 1)  # the next batch: new tensors
    assert calls == ["a", "b", "a"]

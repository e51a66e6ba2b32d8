"""EdgeConnect's own objective (EdgeConnectObjective): its generator and discriminator losses against the
formulas of ``InpaintingModel.process`` re-computed here, and the Trainer (recipes/train.py) training EC# with it.

The VGG19 of these tests has random weights (``allow_random_vgg``): the style and perceptual values carry no
perceptual meaning, only their arithmetic is checked.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from kdinpaint.plugins import get_loss
from kdinpaint.train.objective import is_training_objective
from kdinpaint.train.recipe import load_recipe
from kdinpaint_adapters.edgeconnect import EC_LOSS_WEIGHTS, EdgeConnectObjective
from tiny import loss_case

ROOT = Path(__file__).resolve().parents[3]



def _objective(**kwargs) -> EdgeConnectObjective:
    torch.manual_seed(0)
    return EdgeConnectObjective(vgg=None, allow_random_vgg=True, **kwargs)


def _logit(objective: EdgeConnectObjective, image_pm1: torch.Tensor) -> torch.Tensor:
    """The pre-sigmoid map of EdgeConnect's discriminator on a [-1, 1] image fed in [0, 1]."""
    _, feats = objective.discriminators["inpaint"]((image_pm1 + 1) / 2)
    return feats[-1]


def test_registered_as_an_objective_class():
    assert is_training_objective(get_loss("edgeconnect-gan"))


def test_generator_loss_is_edgeconnect_recomputed_and_changes_no_state():
    objective = _objective()
    pred, gt, mask = loss_case()
    before = {k: v.clone() for k, v in objective.state_dict().items()}
    terms = objective.generator_loss(pred, gt, mask)
    after = objective.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # spectral-norm u vectors stay put

    with torch.no_grad():
        l1 = (((pred + 1) / 2) - ((gt + 1) / 2)).abs().mean() / mask.mean()  # EC's [0, 1] L1 / mean(M)
        objective.discriminators.eval()
        logits = _logit(objective, pred)
        adversarial = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))  # nsgan, "real"
        vgg = objective.vgg(pred, gt, mask)
    expected = {
        "l1": EC_LOSS_WEIGHTS["l1"] * l1,
        "adversarial": EC_LOSS_WEIGHTS["adversarial"] * adversarial,
        "perceptual": EC_LOSS_WEIGHTS["perceptual"] * vgg["perceptual"],
        "style": EC_LOSS_WEIGHTS["style"] * vgg["style"],
    }
    assert set(terms) == {*expected, "total"}
    for k, v in expected.items():
        torch.testing.assert_close(terms[k].detach(), v, rtol=1e-5, atol=1e-7, msg=lambda m: f"{k}: {m}")
    torch.testing.assert_close(terms["total"].detach(), sum(expected.values()), rtol=1e-5, atol=1e-7)
    (grad,) = torch.autograd.grad(terms["total"], pred)
    assert grad.abs().sum() > 0


def test_discriminator_loss_is_bce_on_raw_images_recomputed():
    objective = _objective()
    pred, gt, mask = loss_case()
    objective.discriminators.eval()  # no power iteration, so both computations see the same weights
    d_terms = objective.discriminator_loss(pred.detach(), gt, mask)
    real, fake = _logit(objective, gt), _logit(objective, pred.detach())  # the raw prediction, not composited
    expected = 0.5 * (
        F.binary_cross_entropy_with_logits(real, torch.ones_like(real))
        + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake))
    )
    assert set(d_terms) == {"inpaint", "total"}
    torch.testing.assert_close(d_terms["total"], expected, rtol=1e-5, atol=1e-7)


def test_spectral_norms_are_settled_at_construction():
    # the weight the eval-mode discriminator uses has spectral norm ~1 (torch.linalg's largest singular value),
    # not the random initial u, v's estimate; before settling the logits the generator reads explode
    objective = _objective()
    objective.discriminators.eval()
    convs = [m for m in objective.discriminators.modules() if hasattr(m, "weight_orig")]
    assert len(convs) == 5
    with torch.no_grad():
        objective.discriminators["inpaint"](torch.zeros(1, 3, 32, 32))  # eval forward: sets .weight, no iteration
    for conv in convs:
        sigma = torch.linalg.matrix_norm(conv.weight.detach().flatten(1), ord=2)
        assert sigma == pytest.approx(1.0, rel=0.05)


def test_switched_off_terms_and_bad_keys():
    objective = _objective(weights={"style": 0.0, "perceptual": 0.0, "adversarial": 0.0})
    assert objective.vgg is None
    pred, gt, mask = loss_case()
    terms = objective.generator_loss(pred, gt, mask)
    assert set(terms) == {"l1", "total"}
    with pytest.raises(ValueError, match="unknown EdgeConnect loss term"):
        _objective(weights={"content": 1.0})
    with pytest.raises(TypeError, match="G2's prediction"):
        objective.generator_loss((pred, pred), gt, mask)


@pytest.mark.slow
def test_train_py_trains_ec_hash_with_its_objective(train, tiny_run, tmp_path):
    config = ROOT / "recipes" / "edgeconnect-hash.yaml"
    assert load_recipe(config).losses.objective == "edgeconnect-gan"
    run = tmp_path / "run"
    train(["--config", str(config), *tiny_run, "model.kwargs={residual_blocks: 1}", "train.steps=2", "meta.steps=1",
           f"checkpoint.dir={run}"])
    log = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in log] == [1, 2]
    assert all(x["d/inpaint"] > 0 and 0 < x["loss_inp"] < 1e4 and x.get("meta_skipped", 0) == 0 for x in log)
    first, second = (run / "checkpoints" / f"step_{i:07d}" for i in (1, 2))
    d1, d2 = load_file(str(first / "model_1.safetensors")), load_file(str(second / "model_1.safetensors"))
    assert any(not torch.equal(d1[k], d2[k]) for k in d1 if k.endswith("weight_orig"))  # the D step trained it
    g1, g2 = load_file(str(first / "model.safetensors")), load_file(str(second / "model.safetensors"))
    assert any(not torch.equal(g1[k], g2[k]) for k in g1 if k.startswith("student.inpaint.encoder"))
    assert (run / "student.safetensors").is_file()

"""DeepFill v2's own objective (GatedConvObjective): its generator and discriminator losses against
gatedconv_loss and the hinge loss re-computed here, and recipes/train.py training GC / GC* / GC† with it."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from kdinpaint import plugins
from kdinpaint.train.recipe import load_recipe
from kdinpaint_adapters.gatedconv import GatedConvObjective, gatedconv_loss

ROOT = Path(__file__).resolve().parents[3]


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def _gc_batch(size: int = 32, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    gt = torch.rand(2, 3, size, size, generator=g) * 2 - 1
    refined = (torch.rand(2, 3, size, size, generator=g) * 2 - 1).requires_grad_()
    coarse = (torch.rand(2, 3, size, size, generator=g) * 2 - 1).requires_grad_()
    mask = torch.zeros(2, 1, size, size)
    mask[0, :, 4:20, 6:26] = 1
    mask[1, :, 10:30, 2:14] = 1
    return (refined, coarse), gt, mask


def test_gatedconv_objective_is_deepfill_v2_recomputed():
    assert plugins.get_loss("gatedconv-gan") is GatedConvObjective
    torch.manual_seed(0)
    objective = GatedConvObjective(cnum=4)
    (refined, coarse), gt, mask = _gc_batch()
    twin = copy.deepcopy(objective.discriminators["patchgan"])
    before = _state(objective.discriminators)
    terms = objective.generator_loss((refined, coarse), gt, mask)
    assert all(torch.equal(before[k], v) for k, v in _state(objective.discriminators).items())  # pure
    fake = torch.where(mask.bool().expand_as(gt), refined, gt)  # the composite, by hand
    expected = {
        "l1": (gt - refined).abs().mean(),
        "coarse_l1": (gt - coarse).abs().mean(),
        "adv": -copy.deepcopy(twin).eval()(fake, mask).mean(),
    }
    assert set(terms) == {*expected, "total"}
    for key, value in expected.items():
        torch.testing.assert_close(terms[key], value, msg=key)
    torch.testing.assert_close(terms["total"], gatedconv_loss(refined, gt, mask, coarse=coarse, discriminator=twin.eval()))
    terms["total"].backward()
    assert float(coarse.grad.abs().sum()) > 0 and float(refined.grad.abs().sum()) > 0

    # hinge on real and composited fake, each from the same spectral-norm state (one power iteration)
    real_twin, fake_twin = copy.deepcopy(twin).train(), copy.deepcopy(twin).train()
    d_terms = objective.discriminator_loss((refined, coarse), gt, mask)
    hinge = 0.5 * torch.relu(1 - real_twin(gt, mask)).mean() + 0.5 * torch.relu(1 + fake_twin(fake.detach(), mask)).mean()
    torch.testing.assert_close(d_terms["patchgan"], hinge)
    assert set(d_terms) == {"patchgan", "total"}
    with pytest.raises(TypeError, match="return_coarse=True"):
        objective.generator_loss(refined, gt, mask)
    with pytest.raises(ValueError, match="unknown DeepFill v2 loss term"):
        GatedConvObjective(weights={"gan": 1.0})


@pytest.mark.parametrize("recipe", ["gatedconv", "gatedconv-star", "gatedconv-dagger"])
def test_train_py_trains_gatedconv_with_its_objective(train, tiny_run, tmp_path, recipe):
    run = tmp_path / "run"
    assert load_recipe(ROOT / "recipes" / f"{recipe}.yaml").losses.objective == "gatedconv-gan"
    train(["--config", str(ROOT / "recipes" / f"{recipe}.yaml"), *tiny_run, "model.kwargs={cnum: 8}",
           "train.steps=2", "meta.steps=1", "losses.objective_kwargs={cnum: 4}", f"checkpoint.dir={run}"])
    log = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in log] == [1, 2] and all(x["d/patchgan"] > 0 and x["loss_inp"] > 0 for x in log)
    first, second = (run / "checkpoints" / f"step_{i:07d}" for i in (1, 2))
    d1, d2 = load_file(str(first / "model_1.safetensors")), load_file(str(second / "model_1.safetensors"))
    assert any(not torch.equal(d1[k], d2[k]) for k in d1 if k.endswith("conv_sn.weight"))
    g1, g2 = load_file(str(first / "model.safetensors")), load_file(str(second / "model.safetensors"))
    assert any(not torch.equal(g1[k], g2[k]) for k in g1 if k.startswith("student.conv1"))  # the coarse stage trains

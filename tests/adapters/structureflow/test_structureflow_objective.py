"""StructureFlow's own objective (StructureFlowObjective): its generator and discriminator losses against the
formulas re-computed here, and recipes/train.py training SF / SF* / SF# with it.

The VGG19 of these tests has random weights (``allow_random_vgg``): the style, perceptual and correctness
values carry no perceptual meaning, only their arithmetic is checked.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from kdinpaint.train.recipe import load_recipe
from kdinpaint_adapters.structureflow import (
    SF_PERCEPTUAL_LAYERS,
    SF_STYLE_LAYERS,
    StructureFlowObjective,
    StructureFlowOutput,
    sampling_correctness_loss,
)

ROOT = Path(__file__).resolve().parents[3]
D_DIM = 8


def _objective(**kwargs) -> StructureFlowObjective:
    torch.manual_seed(0)
    return StructureFlowObjective(vgg=None, allow_random_vgg=True, discriminator_dim=D_DIM, **kwargs)


def _output(size: int = 32, structure: bool = True, seed: int = 1) -> tuple[StructureFlowOutput, torch.Tensor, torch.Tensor]:
    """A hand-made SF output (image, structure, structure target, flow), ground truth and mask."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.rand(*shape, generator=g) * 2 - 1  # noqa: E731
    gt = rand(2, 3, size, size)
    mask = torch.zeros(2, 1, size, size)
    mask[0, :, 4:20, 6:26] = 1
    mask[1, :, 10:30, 2:14] = 1
    image, s = rand(2, 3, size, size).requires_grad_(), rand(2, 3, size, size).requires_grad_()
    flow = (torch.randn(2, 2, size // 4, size // 4, generator=g) * 2).requires_grad_()
    return StructureFlowOutput(image, s, rand(2, 3, size, size) if structure else None, flow), gt, mask


def _gram(f: torch.Tensor) -> torch.Tensor:
    b, c, h, w = f.shape
    return torch.einsum("bchw,bdhw->bcd", f, f) / (c * h * w)


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


# ---- the objective against the formulas ---------------------------------------------------------------------


def test_generator_loss_is_sf_objective_recomputed_and_changes_no_state():
    objective = _objective()
    out, gt, mask = _output()
    before = _state(objective.discriminators)
    terms = objective.generator_loss(out, gt, mask)
    after = _state(objective.discriminators)
    assert all(torch.equal(before[k], after[k]) for k in before)  # no power iteration: a pure function
    assert all(m.training for m in objective.discriminators.modules())  # modes restored

    d_tex, d_s = copy.deepcopy(objective.discriminators["texture"]).eval(), copy.deepcopy(objective.discriminators["structure"]).eval()
    vgg = objective.vgg
    fo, fg = vgg(out.image), vgg(gt)
    foh, fgh = vgg(out.image * mask), vgg(gt * mask)
    lsgan_g = lambda logits: sum(((t - 1) ** 2).mean() for t in logits) / len(logits)  # noqa: E731
    expected = {
        "l1": 5 * (out.image - gt).abs().mean(),
        "structure_l1": 4 * (out.structure - out.structure_target).abs().mean(),
        "adv": lsgan_g(d_tex(out.image)),
        "structure_adv": lsgan_g(d_s(out.structure)),
        "correctness": 0.25 * sampling_correctness_loss(fg["relu3_1"], vgg(gt * (1 - mask))["relu3_1"], out.flow, mask),
        "style": 250 * sum((_gram(foh[k]) - _gram(fgh[k])).abs().mean() for k in SF_STYLE_LAYERS),
        "perceptual": 0.1 * sum((fo[k] - fg[k]).abs().mean() for k in SF_PERCEPTUAL_LAYERS),
    }
    assert set(terms) == {*expected, "total"}
    for key, value in expected.items():
        torch.testing.assert_close(terms[key], value, msg=key)
        assert float(value.detach()) > 0
    torch.testing.assert_close(terms["total"], sum(expected.values()))
    assert 1e-3 < float(terms["adv"].detach()) < 10  # spectral norms settled at construction: no exploding logits

    terms["total"].backward()
    for t in (out.image, out.structure, out.flow):  # every output of the model receives a gradient
        assert t.grad is not None and float(t.grad.abs().sum()) > 0
    assert not any(p.requires_grad for p in vgg.parameters())
    assert {id(p) for p in objective.discriminator_parameters()} == {id(p) for p in objective.discriminators.parameters()}


def test_discriminator_loss_is_lsgan_recomputed():
    objective = _objective()
    out, gt, mask = _output()
    twin = copy.deepcopy(objective.discriminators)  # same u, v: the same power iterations, call for call
    terms = objective.discriminator_loss(out, gt, mask)

    def lsgan_d(d: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        fake_logits = d(fake)  # the fake batch first, as the official step
        real_logits = d(real)
        per_scale = [((r - 1) ** 2).mean() / 2 + (f**2).mean() / 2 for r, f in zip(real_logits, fake_logits)]
        assert len(per_scale) == 2
        return sum(per_scale) / 2

    expected = {
        "texture": lsgan_d(twin["texture"], gt, out.image.detach()),
        "structure": lsgan_d(twin["structure"], out.structure_target, out.structure.detach()),
    }
    assert set(terms) == {*expected, "total"}
    for key, value in expected.items():
        torch.testing.assert_close(terms[key], value, msg=key)
    torch.testing.assert_close(terms["total"], expected["texture"] + expected["structure"])
    terms["total"].backward()
    assert out.image.grad is None and out.structure.grad is None  # the generator's outputs are detached
    grads = [p.grad for p in objective.discriminator_parameters()]
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0


def test_sf_hash_output_and_wrong_inputs_are_named():
    out, gt, mask = _output(structure=False)  # SF#: no structure stage
    with pytest.raises(ValueError, match="structure_discriminator: false"):
        _objective().generator_loss(out, gt, mask)
    objective = _objective(structure_discriminator=False, weights={"style": 0, "perceptual": 0, "correctness": 0})
    assert objective.vgg is None and list(objective.discriminators) == ["texture"]
    terms = objective.generator_loss(out, gt, mask)
    assert set(terms) == {"l1", "adv", "total"}
    assert set(objective.discriminator_loss(out, gt, mask)) == {"texture", "total"}
    with pytest.raises(TypeError, match="return_all=True"):
        objective.generator_loss(out.image, gt, mask)
    with pytest.raises(ValueError, match="unknown StructureFlow loss term"):
        _objective(weights={"styel": 1.0})


# ---- recipes/train.py ------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "recipe, extra",
    [
        ("structureflow", ["train.steps=2", "meta.steps=1"]),
        ("structureflow-star", ["train.steps=2", "meta.steps=1", "meta.mode=reverse_hg"]),
        ("structureflow-hash", ["train.steps=2", "meta.steps=1", "meta.mode=first_order"]),
    ],
)
def test_train_py_trains_structureflow_with_its_objective(train, tiny_run, tmp_path, recipe, extra):
    run = tmp_path / "run"
    r = load_recipe(ROOT / "recipes" / f"{recipe}.yaml")
    assert r.losses.objective == "structureflow" and r.losses.lambda_r == 1.0
    kwargs = {**r.losses.objective_kwargs, "discriminator_dim": D_DIM}
    train(["--config", str(ROOT / "recipes" / f"{recipe}.yaml"), *tiny_run, "model.kwargs={dim: 8}", *extra,
           f"checkpoint.dir={run}", f"losses.objective_kwargs={json.dumps(kwargs)}"])

    log = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in log] == [1, 2]
    with_structure = recipe != "structureflow-hash"
    for x in log:
        assert x["loss_d"] > 0 and x["d/texture"] > 0 and ("d/structure" in x) == with_structure
        assert 0 < x["loss_inp"] < 1e3  # SF's terms at their official weights, finite
        assert x.get("meta_skipped", 0) == 0  # SF*, SF#: the hypergradient through the objective is finite
        if with_structure:
            assert x["loss_d"] == pytest.approx(x["d/texture"] + x["d/structure"], rel=1e-5)
    first, second = (run / "checkpoints" / f"step_{i:07d}" for i in (1, 2))
    d1, d2 = load_file(str(first / "model_1.safetensors")), load_file(str(second / "model_1.safetensors"))
    assert {k.split(".")[0] for k in d1} == ({"texture", "structure"} if with_structure else {"texture"})
    assert any(not torch.equal(d1[k], d2[k]) for k in d1 if k.endswith("weight_orig"))  # the D step trained them
    g1, g2 = load_file(str(first / "model.safetensors")), load_file(str(second / "model.safetensors"))
    student = [k for k in g1 if k.startswith("student.texture.")]
    assert student and any(not torch.equal(g1[k], g2[k]) for k in student)  # the generator trained too
    assert (run / "student.safetensors").is_file() and (run / "report.md").is_file()

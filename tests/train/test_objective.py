"""kdinpaint.train.objective and StructureFlow's own objective: its generator and discriminator losses against the
formulas re-computed here, and recipes/train.py training SF / SF* / SF# with it.

The VGG19 of these tests has random weights (``allow_random_vgg``): the style, perceptual and correctness
values carry no perceptual meaning, only their arithmetic is checked.
"""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from kdinpaint import plugins
from kdinpaint.hookspecs import hookimpl
from kdinpaint.train.objective import TrainingObjective, build_objective, is_training_objective, total_of
from kdinpaint.train.recipe import load_recipe
from kdinpaint_adapters.structureflow import (
    SF_PERCEPTUAL_LAYERS,
    SF_STYLE_LAYERS,
    StructureFlowObjective,
    StructureFlowOutput,
    sampling_correctness_loss,
)

ROOT = Path(__file__).resolve().parents[2]
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


# ---- (a) the SF objective against the formulas --------------------------------------------------------------


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


# ---- (c) the protocol ------------------------------------------------------------------------------------------


class _NoTotal(TrainingObjective):
    """Returns its terms without the 'total' key: a protocol error train.py must name."""

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.scale = scale

    def generator_loss(self, output, target, mask):
        return {"l1": self.scale * (output - target).abs().mean()}


def test_build_objective_and_total_of_name_the_problem():
    assert is_training_objective(StructureFlowObjective) and not is_training_objective(total_of)
    assert not is_training_objective(_objective())  # an instance is not a registered class
    built = build_objective(_NoTotal, {"scale": 2.0}, {"vgg": "ignored: _NoTotal takes no vgg"})
    assert built.scale == 2.0 and list(built.discriminators) == [] and built.discriminator_parameters() == []
    with pytest.raises(TypeError, match=r"losses.objective_kwargs: _NoTotal takes no key\(s\) \['scael'\].*'scale'"):
        build_objective(_NoTotal, {"scael": 2.0})
    with pytest.raises(TypeError, match="not a TrainingObjective"):
        build_objective(nn.Module)
    with pytest.raises(ValueError, match=r"without 'total'.*terms\['total'\]"):
        total_of({"l1": torch.tensor(1.0)}, "X.generator_loss")
    with pytest.raises(TypeError, match="dict of tensors"):
        total_of(torch.tensor(1.0), "X.generator_loss")
    with pytest.raises(ValueError, match="must be a scalar"):
        total_of({"total": torch.ones(2)}, "X.generator_loss")
    with pytest.raises(ValueError, match="objective_kwargs applies to a registered objective"):
        load_recipe(None, ["losses.objective_kwargs={a: 1}"])


# ---- (b) the Trainer ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def train():
    """The Trainer's command line in this process; an input error raises (``--debug``)."""
    from kdinpaint.train.trainer import main

    def run(argv):
        assert main(["--debug", *argv], prog="train.py", default_recipe=ROOT / "recipes" / "demo.yaml") == 0

    return run


TINY_SF = [
    "model.kwargs={dim: 8}", "model.init=null", "teacher.steps=1", "data.images=sample", "data.eval_images=sample",
    "data.size=32", "data.sample_count=2", "data.eval_count=1", "data.workers=0", "masks.train=freeform",
    "masks.eval=freeform", "optim.batch_size=1", "losses.vgg=null", "losses.allow_random_vgg=true",
    "log.every=1", "log.sample_every=0", "log.tensorboard=false", "checkpoint.every=1", "checkpoint.keep=2",
]


@pytest.mark.parametrize(
    "recipe, extra",
    [
        ("structureflow", ["train.steps=2", "meta.steps=1"]),
        ("structureflow-star", ["train.steps=2", "meta.steps=1", "meta.mode=reverse_hg"]),
        ("structureflow-hash", ["train.steps=2", "meta.steps=1", "meta.mode=first_order"]),
    ],
)
def test_train_py_trains_structureflow_with_its_objective(train, tmp_path, recipe, extra):
    run = tmp_path / "run"
    r = load_recipe(ROOT / "recipes" / f"{recipe}.yaml")
    assert r.losses.objective == "structureflow" and r.losses.lambda_r == 1.0
    kwargs = {**r.losses.objective_kwargs, "discriminator_dim": D_DIM}
    train(["--config", str(ROOT / "recipes" / f"{recipe}.yaml"), *TINY_SF, *extra, f"checkpoint.dir={run}",
           f"losses.objective_kwargs={json.dumps(kwargs)}"])

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


def test_train_py_names_a_broken_objective(train, tmp_path):
    class Plugin:
        __name__ = "broken-objective-test"

        @hookimpl
        def register_losses(self, register):
            register("no-total-test", _NoTotal)

    plugins.load_plugins()
    plugins.pm.register(Plugin(), name="broken-objective-test")
    try:
        common = ["model.kwargs={width: 4}", "data.size=32", "data.sample_count=2", "data.workers=0",
                  "optim.batch_size=1", "teacher.steps=1", "train.steps=2", "log.tensorboard=false",
                  "losses.lambda_s=0", "losses.objective=no-total-test", f"checkpoint.dir={tmp_path / 'run'}"]
        with pytest.raises(ValueError, match=r"_NoTotal.generator_loss returned terms \['l1'\] without 'total'"):
            train(common)
        with pytest.raises(TypeError, match=r"_NoTotal takes no key\(s\) \['scael'\]"):
            train([*common, "losses.objective_kwargs={scael: 2}"])
        with pytest.raises(ValueError, match="is a loss function, not an objective class"):
            train([*common[:-2], "losses.objective=edgeconnect", "losses.objective_kwargs={scale: 2}", f"checkpoint.dir={tmp_path / 'ec'}"])
    finally:
        plugins.pm.unregister(name="broken-objective-test")


@pytest.mark.slow
def test_killed_run_with_an_objective_resumes_to_the_same_weights(tmp_path):
    """The discriminators and their optimiser are in the checkpoints: resuming gives the uninterrupted run."""
    from training_helpers import train_child

    def run(folder: Path, *extra: str):
        return train_child(*TINY_SF, "train.steps=4", "meta.steps=1", "meta.mode=first_order", "checkpoint.every=2",
                           f"losses.objective_kwargs={{structure_discriminator: false, discriminator_dim: {D_DIM}}}",
                           f"checkpoint.dir={folder}", *extra, config=ROOT / "recipes" / "structureflow-hash.yaml",
                           check=False)

    whole = run(tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed = run(tmp_path / "resumed", "--stop-after", "3")
    assert killed.returncode == 3, killed.stderr[-3000:]
    resumed = run(tmp_path / "resumed")
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout + resumed.stderr, resumed.stderr[-3000:]
    for name in ("student.safetensors", "checkpoints/step_0000004/model_1.safetensors"):
        a, b = load_file(str(tmp_path / "whole" / name)), load_file(str(tmp_path / "resumed" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


# ---- DeepFill v2 (gated convolution) ----------------------------------------------------------------------


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
    from kdinpaint_adapters.gatedconv import GatedConvObjective, gatedconv_loss

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
def test_train_py_trains_gatedconv_with_its_objective(train, tmp_path, recipe):
    run = tmp_path / "run"
    assert load_recipe(ROOT / "recipes" / f"{recipe}.yaml").losses.objective == "gatedconv-gan"
    train(["--config", str(ROOT / "recipes" / f"{recipe}.yaml"), *TINY_SF, "model.kwargs={cnum: 8}",
           "train.steps=2", "meta.steps=1", "losses.objective_kwargs={cnum: 4}", f"checkpoint.dir={run}"])
    log = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in log] == [1, 2] and all(x["d/patchgan"] > 0 and x["loss_inp"] > 0 for x in log)
    first, second = (run / "checkpoints" / f"step_{i:07d}" for i in (1, 2))
    d1, d2 = load_file(str(first / "model_1.safetensors")), load_file(str(second / "model_1.safetensors"))
    assert any(not torch.equal(d1[k], d2[k]) for k in d1 if k.endswith("conv_sn.weight"))
    g1, g2 = load_file(str(first / "model.safetensors")), load_file(str(second / "model.safetensors"))
    assert any(not torch.equal(g1[k], g2[k]) for k in g1 if k.startswith("student.conv1"))  # the coarse stage trains

"""kdinpaint.train.objective: the objective protocol (build_objective, total_of), a broken objective named by the
Trainer, and a killed run with an objective resuming to the same weights.

The adapters' own objectives are tested beside them: tests/adapters/<name>/test_<name>_objective.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from kdinpaint import plugins
from kdinpaint.hookspecs import hookimpl
from kdinpaint.train.objective import TrainingObjective, build_objective, is_training_objective, total_of
from kdinpaint.train.recipe import load_recipe
from kdinpaint_adapters.structureflow import StructureFlowObjective

ROOT = Path(__file__).resolve().parents[2]
D_DIM = 8


def _objective(**kwargs) -> StructureFlowObjective:
    torch.manual_seed(0)
    return StructureFlowObjective(vgg=None, allow_random_vgg=True, discriminator_dim=D_DIM, **kwargs)


# ---- the protocol ----------------------------------------------------------------------------------------------


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


# ---- the Trainer --------------------------------------------------------------------------------------------------


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


@pytest.mark.slow
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
            train([*common[:-1], "losses.objective_kwargs={scael: 2}", f"checkpoint.dir={tmp_path / 'typo'}"])  # a new folder: the first run's holds its teacher
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

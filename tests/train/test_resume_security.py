"""Resume reads no pickle that can run code: the trainer's own states are JSON and safetensors, accelerate's
pickled files load with ``weights_only=True``, and a checkpoint holding pickled trainer states is refused."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from training_helpers import TINY, train_here

from kdinpaint.train.runs import load_trainer_state


class _Payload:
    """Unpickling this creates ``path``: a stand-in for code that a crafted checkpoint would run."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _run(folder, *extra):
    return train_here(*TINY, f"checkpoint.dir={folder}", "train.steps=4", "meta.steps=2", "checkpoint.every=2", *extra)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    folder = tmp_path_factory.mktemp("run")
    assert _run(folder) == 0
    return folder


@pytest.mark.slow
def test_checkpoints_hold_the_trainer_state_as_json_and_safetensors(finished):
    last = finished / "checkpoints" / "step_0000004"
    assert not list(last.glob("custom_checkpoint_*"))
    state = json.loads((last / "trainer_state.json").read_text())
    assert set(state) == {"schedule", "average", "guard"}
    assert state["schedule"]["last_epoch"] == 4  # one schedule step per theta step
    assert state["average"]["shadow"][0] == {"tensor": "average.shadow.0"}

    class Sink:  # load_trainer_state hands every object its state_dict back
        def load_state_dict(self, s):
            self.state = s

    sinks = {k: Sink() for k in state}
    load_trainer_state(last, sinks)
    assert sinks["schedule"].state == state["schedule"]
    assert isinstance(sinks["average"].state["shadow"][0], torch.Tensor)


@pytest.mark.slow
def test_a_pickled_trainer_state_is_refused_and_never_unpickled(finished, tmp_path):
    import shutil

    folder = tmp_path / "run"
    shutil.copytree(finished, folder)
    shutil.rmtree(folder / "checkpoints" / "step_0000004")  # resume from step 2, where the payload lies
    marker = tmp_path / "code-ran"
    (folder / "checkpoints" / "step_0000002" / "custom_checkpoint_0.pkl").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(ValueError, match=r"holds pickled training states \(custom_checkpoint_0.pkl\).*can run code"):
        _run(folder, "--debug")
    assert not marker.exists()


@pytest.mark.slow
def test_a_crafted_random_state_file_runs_no_code(finished, tmp_path, caplog):
    import shutil

    folder = tmp_path / "run"
    shutil.copytree(finished, folder)
    shutil.rmtree(folder / "checkpoints" / "step_0000004")
    marker = tmp_path / "code-ran"
    (folder / "checkpoints" / "step_0000002" / "random_states_0.pkl").write_bytes(pickle.dumps(_Payload(marker)))
    assert _run(folder) == 0  # accelerate's weights_only load refuses the payload; the run goes on with fresh states
    assert not marker.exists()
    assert "random_states_0.pkl cannot be loaded" in caplog.text  # ... and says which file it could not load

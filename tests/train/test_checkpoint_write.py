"""A checkpoint write that fails (a full disk) keeps the last complete checkpoint, leaves no partial folder, and
says which disk, how much is free and which checkpoint a resume starts from."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import torch

from kdinpaint.train import runs


class _Accelerator:
    """What save_checkpoint asks of accelerate, one process: save_state writes a file, then fails when told to."""

    is_main_process = True

    def __init__(self) -> None:
        self.fail = False

    def wait_for_everyone(self) -> None:
        pass

    def save_state(self, folder: str) -> None:
        Path(folder).mkdir(parents=True)
        (Path(folder) / "model.safetensors").write_bytes(b"half a model" if self.fail else b"a whole model")
        if self.fail:
            raise OSError(errno.ENOSPC, "No space left on device")


class _Counter:
    def __init__(self, n: int) -> None:
        self.n = n

    def state_dict(self) -> dict:
        return {"n": self.n, "t": torch.tensor([float(self.n)])}


def _contents(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("where", ["accelerate", "trainer_state"])
def test_a_full_disk_keeps_the_last_checkpoint_and_names_the_disk(tmp_path, monkeypatch, where):
    accelerator = _Accelerator()
    first = runs.save_checkpoint(accelerator, tmp_path, 1, keep=2, states={"count": _Counter(1)})
    kept = _contents(first)
    assert set(kept) == {"model.safetensors", "trainer_state.json", "trainer_state.safetensors"}
    if where == "accelerate":
        accelerator.fail = True
    else:  # the trainer's own state files fail after accelerate's
        def full(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(runs, "save_file", full)
    with pytest.raises(OSError) as err:
        runs.save_checkpoint(accelerator, tmp_path, 2, keep=2, states={"count": _Counter(2)})
    message = str(err.value)
    assert "writing the checkpoint of step 2" in message and "No space left on device" in message
    assert f"is the disk full? (the disk holding {tmp_path}: " in message and " MiB free)" in message
    assert f"the last complete checkpoint, {first}, is kept" in message and "resume the run" in message
    assert runs.checkpoints_in(tmp_path) == [first] and _contents(first) == kept  # the good one, untouched
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [first.name]  # no partial folder left


def test_a_failed_first_checkpoint_says_none_is_kept(tmp_path):
    accelerator = _Accelerator()
    accelerator.fail = True
    with pytest.raises(OSError, match="no earlier checkpoint exists"):
        runs.save_checkpoint(accelerator, tmp_path, 1, keep=2)
    assert runs.checkpoints_in(tmp_path) == [] and list((tmp_path / "checkpoints").iterdir()) == []

"""A crafted ``.pt2`` runs no code: kdinpaint.deploy.load_program refuses what torch.export.load would unpickle."""

from __future__ import annotations

import io
import json
import pickle
import zipfile

import pytest
import torch

from kdinpaint.deploy import check_program_archive, load_program


class _Payload:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 3, 3, padding=1)

    def forward(self, image, mask):
        return self.conv(torch.cat([image, mask], 1))


@pytest.fixture(scope="module")
def program(tmp_path_factory):
    path = tmp_path_factory.mktemp("pt2") / "net.pt2"
    args = (torch.zeros(1, 3, 8, 8), torch.zeros(1, 1, 8, 8))
    torch.export.save(torch.export.export(_Net(), args), str(path))
    return path


def _rewrite(src, dst, replace):
    """Copy the zip ``src`` to ``dst``, with ``replace(name, data) -> data`` applied to every entry."""
    with zipfile.ZipFile(src) as a, zipfile.ZipFile(dst, "w") as b:
        for name in a.namelist():
            b.writestr(name, replace(name, a.read(name)))


def test_a_clean_program_loads_and_runs(program):
    check_program_archive(program)
    out = load_program(program)(torch.zeros(1, 3, 8, 8), torch.zeros(1, 1, 8, 8))
    assert out.shape == (1, 3, 8, 8)


def test_a_pickled_weight_is_refused_before_it_is_unpickled(program, tmp_path):
    marker = tmp_path / "code-ran"
    crafted = tmp_path / "crafted.pt2"

    def replace(name, data):
        if name.endswith("_weights_config.json"):
            config = json.loads(data)
            first = next(iter(config["config"]))
            config["config"][first]["use_pickle"] = True
            return json.dumps(config).encode()
        if name.endswith("/data/weights/weight_0"):
            buf = io.BytesIO()
            torch.save(_Payload(marker), buf)
            return buf.getvalue()
        return data

    _rewrite(program, crafted, replace)
    with pytest.raises(ValueError, match="marks .* as pickled"):
        load_program(crafted)
    assert not marker.exists()
    with pytest.raises(Exception):  # torch itself would have run the payload: the check is what stops it
        torch.export.load(str(crafted))
    assert marker.exists()


def test_a_crafted_sample_input_is_refused(program, tmp_path):
    """torch retries a sample-input pickle that weights_only refuses with weights_only=False."""
    marker = tmp_path / "code-ran"
    crafted = tmp_path / "crafted.pt2"
    _rewrite(program, crafted, lambda name, data: pickle.dumps(_Payload(marker)) if name.endswith("sample_inputs/model.pt") else data)
    with pytest.raises(ValueError, match="sample_inputs/model.pt.*does not load as tensors only"):
        load_program(crafted)
    assert not marker.exists()


def test_a_file_that_is_not_an_archive_is_named(tmp_path):
    bad = tmp_path / "bad.pt2"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a .pt2 archive"):
        load_program(bad)

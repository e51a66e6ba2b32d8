"""A network class that is not in the package, named by import path: trained with ``kdinpaint train``, then
evaluated, inpainted with and exported from the CLI, without a plugin."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from training_helpers import ROOT, TINY

from kdinpaint.cli import main as cli_main
from kdinpaint.train.trainer import main as train_main

SPEC = "{encoder_levels: [down1, down2, down3]}"


@pytest.mark.slow
def test_own_network_trains_evaluates_inpaints_and_exports(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "tests"))  # tiny.py: the network's module, importable as tiny
    run = tmp_path / "run"
    code = train_main([str(ROOT / "recipes" / "demo.yaml"), *TINY, "model.adapter=null", "model.target=tiny:TinyUNet",
                       "model.kwargs={width: 4}", f"model.spec={SPEC}", "model.stride=8", "train.steps=2",
                       f"checkpoint.dir={run}"])
    assert code == 0
    student = run / "student.safetensors"
    from safetensors import safe_open

    with safe_open(str(student), "pt") as f:
        meta = f.metadata()
    assert meta["kdinpaint.target"] == "tiny:TinyUNet" and meta["kdinpaint.stride"] == "8"

    assert cli_main(["evaluate", "--checkpoint", str(student), "--count", "2", "--size", "32", "--no-floor",
                     "--no-progress", "--json", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["buckets"]["all"]["count"] == 2

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (36, 44, 3), dtype=np.uint8)).save(tmp_path / "photo.png")
    hole = np.zeros((36, 44), np.uint8)
    hole[10:20, 12:30] = 255
    Image.fromarray(hole).save(tmp_path / "mask.png")
    assert cli_main(["inpaint", str(tmp_path / "photo.png"), str(tmp_path / "mask.png"), str(tmp_path / "out.png"),
                     "--checkpoint", str(student)]) == 0
    out = np.asarray(Image.open(tmp_path / "out.png"))
    src = np.asarray(Image.open(tmp_path / "photo.png"))
    assert out.shape == src.shape and (out[hole == 0] == src[hole == 0]).all()  # known pixels kept (36x44: padded to 8)

    assert cli_main(["export", str(tmp_path / "net.pt2"), "--checkpoint", str(student), "--size", "32"]) == 0
    assert (tmp_path / "net.pt2").is_file()

"""recipes/compress-lama.yaml: a LaMa of random weights, as a TorchScript black box (IOPaint's call) or read by the
lama adapter as a white box, compressed into a tiny reference network with its control twin, end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kdinpaint.train.recipe import load_recipe
from kdinpaint_adapters.lama import LaMa
from kdinpaint_adapters.lama.export import export_iopaint

ROOT = Path(__file__).resolve().parents[3]
RECIPE = ROOT / "recipes" / "compress-lama.yaml"
TINY_LAMA = {"ngf": 8, "n_blocks": 2}
TINY = [  # the recipe header's offline overrides, smaller still
    "model.kwargs={width: 4}", "data.images=sample", "data.eval_images=sample", "data.size=32", "data.sample_count=4",
    "data.eval_count=4", "data.workers=0", "masks.train=freeform", "masks.eval=freeform", "losses.lambda_s=0",
    "losses.adversarial=0", "losses.vgg=null", "losses.recon_padding=zeros", "optim.batch_size=2", "train.steps=4",
    "checkpoint.every=0", "log.every=2", "log.sample_every=0", "log.tensorboard=false",
]
WHITE_BOX = ["teacher.file=null", "teacher.adapter=lama:star", "teacher.kwargs={ngf: 8, n_blocks: 2}"]


def test_the_recipe_loads_in_both_forms():
    recipe = load_recipe(RECIPE)
    assert recipe.teacher.file and recipe.teacher.trained and recipe.train.control
    assert recipe.teacher.range == [0, 1] and recipe.teacher.output_scales == 4
    white = load_recipe(RECIPE, WHITE_BOX)
    assert white.teacher.file is None and white.teacher.adapter == "lama:star" and white.teacher.trained


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["teacher.adapter=lama:star"], "teacher.file .* and teacher.adapter .* both name the teacher"),
        (["teacher.weights=t.safetensors"], "remove teacher.weights"),
        (["teacher.range=[0, 2]"], r"teacher.range must be one of \[0, 1\], \[-1, 1\], \[0, 255\]"),
        (["teacher.channels=rbg"], r"teacher.channels='rbg' is not one of \['rgb', 'bgr'\]"),
        (["teacher.output_distillation=0"], "teaches only through its prediction"),
        (["teacher.file=null", "teacher.kwargs={ngf: 8}"], "set teacher.adapter"),
    ],
)
def test_teacher_keys_are_checked_when_the_recipe_loads(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_recipe(RECIPE, overrides)


def _train(tmp_path: Path, *overrides: str) -> Path:
    from kdinpaint.train.trainer import main

    run = tmp_path / "run"
    status = main([str(RECIPE), *TINY, f"checkpoint.dir={run}", *overrides], prog="kdinpaint train")
    assert status == 0
    return run


def _check_run(run: Path) -> dict:
    assert not (run / "teacher.safetensors").exists()  # a trained teacher: no teacher stage
    assert (run / "student.safetensors").is_file() and (run / "control.safetensors").is_file()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in records if "kd/output" in r]
    assert trained and all(r["kd/output"] > 0 for r in trained)  # the teacher's fill taught the student
    assert all(r.get("control/kd/total", 0.0) == 0 for r in trained)  # the twin distils nothing
    report = json.loads((run / "report.json").read_text())
    assert "control" in json.dumps(report)
    assert "did distillation help" in (run / "report.md").read_text().lower()  # the paired gap student - twin
    return trained[-1]


@pytest.mark.slow
def test_compress_a_torchscript_lama(tmp_path):
    torch.manual_seed(0)
    export_iopaint(LaMa(**TINY_LAMA).eval(), tmp_path / "big-lama.pt", 32, 32, check_sizes=((16, 24),))
    run = _train(tmp_path, f"teacher.file={tmp_path / 'big-lama.pt'}")
    last = _check_run(run)
    assert last["kd/cross"] == 0.0  # nothing inside a black box to tap


@pytest.mark.slow
def test_compress_a_lama_read_by_the_adapter(tmp_path):
    run = _train(tmp_path, *WHITE_BOX)
    last = _check_run(run)
    assert last["kd/cross"] > 0  # LaMa's encoder levels taught the student's


@pytest.mark.slow
def test_an_onnx_lama_of_this_project_is_a_black_box_of_range_minus_one_one(tmp_path):
    """``python -m kdinpaint_adapters.lama.export OUT.onnx`` writes inputs image [-1, 1] and mask (1 = hole) and the
    prediction in [-1, 1]: loaded with range [-1, 1], the black box gives LaMa's own prediction."""
    pytest.importorskip("onnxruntime")
    from kdinpaint.blackbox import load_blackbox
    from kdinpaint_adapters.lama.export import export_onnx

    torch.manual_seed(0)
    lama = LaMa(**TINY_LAMA).eval()
    export_onnx(lama, tmp_path / "lama.onnx", 32, 32, check=False)
    teacher = load_blackbox(tmp_path / "lama.onnx", range=[-1, 1])
    g = torch.Generator().manual_seed(1)
    image = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 8:20, 10:24] = 1
    with torch.no_grad():
        want = lama(torch.cat([image * (1 - mask), mask], 1))
    torch.testing.assert_close(teacher(image * (1 - mask), mask), want, rtol=0, atol=1e-4)

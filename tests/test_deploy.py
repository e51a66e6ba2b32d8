"""Deployable graphs of the exported student (kdinpaint.deploy, ``kdinpaint export``): torch.compile, torch.export
reloaded in a fresh process, ONNX under onnxruntime; each against eager PyTorch on the same inputs."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import torch

from kdinpaint import deploy
from kdinpaint.cli import main
from kdinpaint.inference import deployed_model
from kdinpaint.ops import attention

HAS_ONNX = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxscript", "onnxruntime"))


@pytest.fixture(scope="module")
def net8():
    """Net8 of the reference adapter at width 4, every weight moved off its initialisation (the attention gates
    and the zero-initialised heads included, so that every branch shows in the output)."""
    torch.manual_seed(0)
    model, stride = deployed_model("reference", {"width": 4})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval(), stride


def _eager(model, image, mask):
    with torch.inference_mode():
        return deploy.Deployable(model)(image, mask)


def test_deployable_is_the_completed_model(net8):
    # the traced function is the exported model's forward on the blanked image, nothing else
    model, _ = net8
    image, mask = deploy.example_inputs(32, 40)
    with torch.inference_mode():
        expected = model(image * (1 - mask), mask)
    torch.testing.assert_close(_eager(model, image, mask), expected, rtol=0, atol=0)


@pytest.mark.slow
def test_a_biharmonic_prefill_is_traced_as_the_torch_solve_of_the_same_system():
    # eager, the prefill is scikit-image's fill (NumPy, float64); traced, kdinpaint.ops.fill.biharmonic_fill solves
    # the same system in torch, so the main job's network exports and the program matches the eager network
    model, stride = deployed_model("reference", {"width": 4, "prefill": "biharmonic", "prefill_ramp": 2})
    image, mask = deploy.example_inputs(24, 32, seed=2)
    program = deploy.export_program(model.eval(), 24, 32, stride)
    with torch.no_grad():
        traced = program.module()(image, mask)
    assert (traced - _eager(model, image, mask)).abs().max() < 1e-3


@pytest.mark.slow
def test_torch_compile_matches_eager(net8):
    model, _ = net8
    image, mask = deploy.example_inputs(32, 32)
    compiled = deploy.compile_model(model, backend="aot_eager", fullgraph=True)  # traced whole, no graph break
    with torch.no_grad():
        torch.testing.assert_close(compiled(image, mask), _eager(model, image, mask), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_torch_export_records_fused_attention_and_onnx_blocks(net8, monkeypatch):
    # a program torch runs keeps scaled_dot_product_attention (torch picks its memory-bounded kernel when it runs);
    # for ONNX (blocked_export) the attention is the blocked product, its blocks one scan, never a fused node that
    # onnxruntime would turn into an N×N product
    model, stride = net8

    def targets(program):
        return [str(n.target) for n in program.graph.nodes if n.op == "call_function"]

    fused = targets(deploy.export_program(model, 32, 32, stride))
    assert sum("scaled_dot_product_attention" in t for t in fused) >= 1 and not any("bmm" in t for t in fused)
    monkeypatch.setattr(attention, "FORWARD_BLOCK_ELEMENTS", 0)  # 32-row blocks
    with attention.blocked_export():
        blocked = targets(deploy.export_program(model, 32, 32, stride))
    assert not any("scaled_dot_product_attention" in t or "sdp" in t for t in blocked)
    assert any("scan" in t for t in blocked)


@pytest.mark.slow
@pytest.mark.parametrize("blocked", [False, True])
def test_torch_export_reloads_in_a_fresh_process(net8, tmp_path, monkeypatch, blocked):
    model, stride = net8
    monkeypatch.setattr(attention, "FORWARD_BLOCK_ELEMENTS", 0)  # 32-row attention blocks (a scan) when blocked
    image, mask = deploy.example_inputs(40, 32, seed=3)
    if blocked:
        with attention.blocked_export():
            program = deploy.export_program(model, 40, 32, stride)
    else:
        program = deploy.export_program(model, 40, 32, stride)
    deploy.save_program(program, tmp_path / "net8.pt2")
    torch.save({"image": image, "mask": mask, "eager": _eager(model, image, mask)}, tmp_path / "io.pt")
    code = (
        "import sys, torch\n"
        f"io = torch.load({str(tmp_path / 'io.pt')!r})\n"
        f"run = torch.export.load({str(tmp_path / 'net8.pt2')!r}).module()\n"
        "with torch.no_grad():\n"
        "    diff = (run(io['image'], io['mask']) - io['eager']).abs().max().item()\n"
        "print(diff)\n"
        "assert 'kdinpaint' not in sys.modules, 'the program needed kdinpaint'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout.strip().splitlines()[-1]) <= 1e-5


@pytest.mark.slow
@pytest.mark.skipif(not HAS_ONNX, reason="needs the onnx extra: pip install 'kdinpaint[onnx]'")
@pytest.mark.parametrize("size", [(32, 32), (48, 40)])
def test_onnx_matches_eager_under_onnxruntime(net8, tmp_path, monkeypatch, size):
    model, stride = net8
    H, W = size
    if size == (48, 40):
        monkeypatch.setattr(attention, "FORWARD_BLOCK_ELEMENTS", 0)  # 32-row attention blocks: a Scan in the graph
    path = deploy.export_onnx(model, tmp_path / "net8.onnx", H, W, stride)
    image, mask = deploy.example_inputs(H, W, seed=5)
    mask[..., : H // 3, :] = 1  # another mask than the traced one
    got = deploy.run_onnx(path, image, mask)
    torch.testing.assert_close(got, _eager(model, image, mask), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_ONNX, reason="needs the onnx extra: pip install 'kdinpaint[onnx]'")
def test_folding_keeps_the_unfolded_graphs_output(net8, tmp_path):
    # the reference: the same exported graph without any optimisation, under onnxruntime
    import onnx

    model, stride = net8
    program = deploy.export_program(model, 32, 24, stride)
    unfolded = torch.onnx.export(program, f=None, input_names=["image", "mask"], output_names=["prediction"],
                                 opset_version=18, dynamo=True, external_data=False, optimize=False)
    unfolded.save(str(tmp_path / "unfolded.onnx"))
    deploy.fold_onnx(unfolded.model)
    unfolded.save(str(tmp_path / "folded.onnx"))
    image, mask = deploy.example_inputs(32, 24, seed=4)
    want = deploy.run_onnx(tmp_path / "unfolded.onnx", image, mask)
    torch.testing.assert_close(deploy.run_onnx(tmp_path / "folded.onnx", image, mask), want, rtol=1e-6, atol=1e-6)
    nodes = [len(onnx.load(str(tmp_path / f"{n}.onnx")).graph.node) for n in ("unfolded", "folded")]
    assert nodes[1] < nodes[0] / 2, nodes


@pytest.mark.slow
def test_export_command(tmp_path, capsys):
    code = main(["export", str(tmp_path / "tiny.pt2"), "--adapter", "tiny-unet", "--size", "32", "24"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "wrote" in out and "1x3x32x24" in out and "max |pt2 - eager|" in out
    # the file is an ordinary torch.export program: same output as the adapter's model built again
    run = torch.export.load(str(tmp_path / "tiny.pt2")).module()
    assert run(*deploy.example_inputs(32, 24)).shape == (1, 3, 32, 24)
    assert main(["export", str(tmp_path / "tiny.bin"), "--adapter", "tiny-unet"]) == 1
    assert "name it .pt2 or .onnx" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "t.pt2"), "--adapter", "tiny-unet", "--size", "30"]) == 1
    assert "multiple of the network's stride 8" in capsys.readouterr().err

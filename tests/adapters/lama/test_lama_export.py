"""LaMa as files other programs run: ONNX through onnxruntime (the FFT as ONNX's DFT, or as matrix products) and
TorchScript called the way IOPaint calls its big-lama.pt, checked from a separate interpreter that imports only
torch and numpy."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import kdinpaint
from kdinpaint_adapters.lama import LaMa
from kdinpaint_adapters.lama.export import IOPaintCall, export_iopaint, export_onnx, iopaint_inputs

TINY = {"ngf": 8, "n_blocks": 2}


def tiny_lama(seed: int = 0) -> LaMa:
    torch.manual_seed(seed)
    model = LaMa(**TINY)
    with torch.no_grad():  # batch-norm statistics that are not the identity, as in a trained network
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


@pytest.mark.slow
@pytest.mark.parametrize("dft", ["fft", "matmul"])
def test_onnx_matches_eager(tmp_path, dft):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    model = tiny_lama()
    path = tmp_path / "lama.onnx"
    diff = export_onnx(model, path, 48, 64, dft=dft)
    assert diff < 1e-4
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert ("DFT" in ops) == (dft == "fft")  # matmul: no DFT operator at all
    assert all(m.dft == "fft" for m in model.modules() if hasattr(m, "dft"))  # the model is given back as it was


def test_iopaint_call_convention():
    model = tiny_lama()
    call = IOPaintCall(model).eval()
    image, mask = iopaint_inputs(40, 56)
    with torch.no_grad():
        out = call(image, mask)  # int64 mask, as IOPaint passes it
        same = call(image, mask.float())
        pred = model(torch.cat([image * 2 - 1, mask.float()], 1))
    known = mask.expand_as(image) == 0
    assert out.shape == image.shape and out.dtype == torch.float32
    assert torch.equal(out, same)
    assert torch.equal(out[known], image[known])  # LaMa's "inpainted": the known pixels are the input's
    assert torch.allclose(out[~known], ((pred + 1) / 2)[~known], atol=1e-6)


IOPAINT_SCRIPT = textwrap.dedent(
    """
    # What IOPaint's LaMa does (iopaint/model/lama.py, helper.norm_img / load_jit_model), nothing of kdinpaint
    import sys
    import numpy as np
    import torch

    def norm_img(np_img):
        if len(np_img.shape) == 2:
            np_img = np_img[:, :, np.newaxis]
        np_img = np.transpose(np_img, (2, 0, 1))
        return np_img.astype("float32") / 255

    model = torch.jit.load(sys.argv[1], map_location="cpu").to("cpu").eval()
    for name in sys.argv[2:]:
        data = np.load(name + ".npz")
        image, mask = norm_img(data["image"]), norm_img(data["mask"])
        mask = (mask > 0) * 1
        image = torch.from_numpy(image).unsqueeze(0)
        mask = torch.from_numpy(mask).unsqueeze(0)
        with torch.no_grad():
            inpainted = model(image, mask)
        res = inpainted[0].permute(1, 2, 0).detach().cpu().numpy()
        res = np.clip(res * 255, 0, 255).astype("uint8")
        np.save(name + ".out.npy", res[:, :, ::-1])  # cv2.cvtColor(res, cv2.COLOR_RGB2BGR)
    print("kdinpaint" in sys.modules)
    """
)


@pytest.mark.slow
def test_torchscript_runs_as_iopaint_runs_big_lama(tmp_path):
    model = tiny_lama()
    path = tmp_path / "big-lama.pt"
    diffs = export_iopaint(model, path, 64, 64, check_sizes=[(40, 56)])
    assert set(diffs) == {"64x64", "40x56"} and max(diffs.values()) < 1e-5

    rng = np.random.default_rng(0)
    names, expected = [], []
    for h, w in [(64, 64), (48, 80)]:  # the traced size and another multiple of 8 (IOPaint pads to 8)
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)  # RGB, HWC
        mask = np.zeros((h, w), dtype=np.uint8)
        mask[h // 4 : h // 2 + 5, w // 3 : w - 9] = 255
        name = str(tmp_path / f"case{h}x{w}")
        np.savez(name + ".npz", image=image, mask=mask)
        names.append(name)
        # the same by hand: LaMa's inpainted = mask * prediction + (1 - mask) * image, in [0, 1]
        x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
        m = torch.from_numpy(mask > 0)[None, None].float()
        with torch.no_grad():
            pred = (model(torch.cat([x * 2 - 1, m], 1)) + 1) / 2
        inpainted = (m * pred + (1 - m) * x)[0].permute(1, 2, 0).numpy()
        expected.append(np.clip(inpainted * 255, 0, 255).astype("uint8")[:, :, ::-1])

    run = subprocess.run([sys.executable, "-I", "-c", IOPAINT_SCRIPT, str(path), *names], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "False"  # the file ran without kdinpaint's code
    for name, want in zip(names, expected):
        got = np.load(name + ".out.npy")
        assert got.shape == want.shape and got.dtype == np.uint8
        # uint8 rounding of values a float32 ulp apart may differ by one grey level
        assert np.abs(got.astype(int) - want.astype(int)).max() <= 1


def test_torchscript_of_a_student_with_completion_blocks_is_refused(tmp_path):
    adapter = kdinpaint.get_adapter("lama")
    kd = kdinpaint.attach(adapter.student("star", **TINY), adapter.teacher("star", **TINY), spec="lama:star")
    exported = kd.export()
    kd.detach()
    with pytest.raises(ValueError, match=r"completion blocks / PGL at \['generator\.model\.2'.*IOPaint calls its model at every size"):
        export_iopaint(exported, tmp_path / "star.pt", 64, 64)
    assert not (tmp_path / "star.pt").exists()
    with pytest.raises(ValueError, match="multiple of the model's stride 8"):
        export_iopaint(tiny_lama(), tmp_path / "x.pt", 60, 64)

"""The README's Python snippets run as written, in order, in one namespace.

What a snippet leaves to the reader (``MyInpaintingNet``, ``loader``, ``recon``, an optimiser) is supplied
by the stand-ins below: tiny models (kdinpaint's own three-level U-Net at width 4), two 32×32 batches of
random images with rectangular holes, L1. The only edit of a snippet's text is the step count of the
teacher's pre-training (``SUBSTITUTIONS``). A new snippet that needs another stand-in fails here until one
is given in ``BEFORE``. Snippets in recipes/decisions.md and recipes/results/ are records, not run here.
"""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import kdinpaint
from kdinpaint import plugins
from kdinpaint_adapters.tiny import TinyInpaintUNet

README = Path(__file__).resolve().parents[1] / "README.md"

SUBSTITUTIONS = {"steps=10_000": "steps=2"}  # the teacher's pre-training: two steps, not ten thousand


class MyInpaintingNet(TinyInpaintUNet):
    """Called as ``model(masked_image, mask)``; levels ``enc1``, ``enc2``, ``enc3``."""

    def __init__(self, width: int = 4):
        super().__init__(width=width)


def _loader() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    batches = []
    for i in range(2):
        gt = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
        mask = torch.zeros(2, 1, 32, 32)
        mask[..., 4 + 4 * i : 16 + 4 * i, 8:20] = 1
        batches.append((gt, mask))
    return batches


def _attached(ns: dict) -> None:
    student = MyInpaintingNet()
    ns["kd"] = kdinpaint.attach(student, kdinpaint.build_teacher(student), {"encoder_levels": ["enc1", "enc2", "enc3"]})
    ns["theta_optimizer"] = torch.optim.Adam([*student.parameters(), *ns["kd"].student_parameters()], lr=1e-4)
    ns["inpaint_loss"] = lambda pred, target, mask: (pred - target).abs().mean()


def _my_package(ns: dict) -> None:
    module = types.ModuleType("my_package")
    module.MyNet = MyInpaintingNet
    sys.modules["my_package"] = module


class MyOneTensorNet(MyInpaintingNet):
    """Called as ``model(torch.cat([masked_image, mask], 1))``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(x[:, :3], x[:, 3:])


def _one_tensor_student(ns: dict) -> None:
    ns["student"] = MyOneTensorNet()


def _photo_and_mask(ns: dict) -> None:
    """``photo.png`` (random, 40x48: the inpainter pads it to the stride) and ``mask.png`` (white = hole)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save("photo.png")
    hole = np.zeros((40, 48), np.uint8)
    hole[10:25, 12:30] = 255
    Image.fromarray(hole).save("mask.png")


# run before a snippet that contains the key
BEFORE = {
    "MetaLearner(kd,": _attached,
    "from my_package import MyNet": _my_package,
    '"input": "concat"}': _one_tensor_student,
    'load_image("photo.png")': _photo_and_mask,
}


def _snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_readme_has_the_snippets_this_test_prepares_for():
    text = "\n".join(_snippets())
    for key in [*BEFORE, *SUBSTITUTIONS]:
        assert key in text, f"README no longer has {key!r}: update tests/test_readme.py"


@pytest.mark.slow
def test_readme_python_snippets_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # snippets write files such as student.safetensors
    torch.manual_seed(0)
    ns: dict = {"MyInpaintingNet": MyInpaintingNet, "loader": _loader(),
                "recon": lambda pred, gt: (pred - gt).abs().mean(), "__name__": "readme"}
    try:
        for i, code in enumerate(_snippets()):
            for old, new in SUBSTITUTIONS.items():
                code = code.replace(old, new)
            for key, prepare in BEFORE.items():
                if key in code:
                    prepare(ns)
            try:
                exec(compile(code, f"README.md python snippet {i}", "exec"), ns)
            except Exception as e:  # name the snippet: the traceback shows its line
                raise AssertionError(f"README python snippet {i} failed: {type(e).__name__}: {e}\n{code}") from e
            kd = ns.get("kd")
            if kd is not None and "MetaLearner" in code:
                kd.detach()
        # the plugin snippet's hook, registered as its entry point would be, gives a working adapter
        plugin = types.SimpleNamespace(__name__="readme_plugin", register_adapters=ns["register_adapters"])
        plugins.load_plugins()
        plugins.pm.register(plugin, name="readme-plugin")
        adapter = plugins.get_adapter("my-net")
        assert adapter.distribution == "readme-plugin"  # the provider it was registered under
        assert "no-cb" in adapter.variants
        net = adapter.student()
        assert isinstance(net, MyInpaintingNet)
        image, mask = ns["loader"][0]
        assert net(image * (1 - mask), mask).shape == image.shape
        # the README's suggest_spec call on it: the draft names the U-Net's three encoder levels
        from kdinpaint.suggest import suggest_spec

        draft = suggest_spec(net, (image, mask))
        assert list(draft.encoder_levels) == ["enc1", "enc2", "enc3"], draft.encoder_levels
    finally:
        if plugins.pm.has_plugin("readme-plugin"):
            plugins.pm.unregister(name="readme-plugin")
        sys.modules.pop("my_package", None)
    # what the first snippet promises: an exported file that loads back into a fresh instance
    assert isinstance(ns["model"], kdinpaint.export.CompletedModel)
    assert (tmp_path / "student.safetensors").is_file()
    # the running snippet: the photo's known pixels kept, and the saved program computes the model's prediction
    from PIL import Image

    photo, out = (np.asarray(Image.open(tmp_path / f"{n}.png")) for n in ("photo", "out"))
    known = np.asarray(Image.open(tmp_path / "mask.png")) == 0
    assert out.shape == photo.shape and (out[known] == photo[known]).all()
    image, mask = kdinpaint.deploy.example_inputs(64, 64, seed=3)
    with torch.no_grad():
        eager = ns["model"](image * (1 - mask), mask)
        torch.testing.assert_close(kdinpaint.deploy.load_program(tmp_path / "student.pt2")(image, mask), eager,
                                   atol=1e-5, rtol=1e-5)
    # the one-tensor snippet: the teacher was pre-trained through its one-tensor call and attached
    assert isinstance(ns["teacher"], MyOneTensorNet) and ns["spec"]["input"] == "concat"

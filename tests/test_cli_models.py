"""``kdinpaint inpaint / evaluate / export`` with your own network (``--model``, a plain state dict or an exported
file without the import-path record) and with each adapter's official weights (``--adapter NAME --weights PATH``),
checked against the network run by hand on the same pixels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import kdinpaint
from kdinpaint import deploy
from kdinpaint.cli import main
from tiny import LEVELS, TinyUNet, randomised


def run(capsys, *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _photo_and_mask(folder: Path, h: int = 32, w: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    """A random photo and a rectangular hole written as PNGs; returned as the network sees them."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    hole = np.zeros((h, w), np.uint8)
    hole[8:20, 10:30] = 255
    Image.fromarray(pixels).save(folder / "photo.png")
    Image.fromarray(hole).save(folder / "mask.png")
    image = torch.from_numpy(pixels).permute(2, 0, 1)[None].double() / 127.5 - 1  # (1, 3, H, W)
    return image, torch.from_numpy(hole > 0)[None, None].double()  # (1, 1, H, W)


def _by_hand(pred: torch.Tensor, image: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    """The composite the CLI should write, as uint8 (H, W, 3)."""
    out = torch.where(mask.bool(), pred.double().clamp(-1, 1), image)[0].permute(1, 2, 0).numpy()
    return np.clip(np.round((out + 1) * 127.5), 0, 255).astype(np.uint8)


def _written(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture
def tests_importable(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))  # tiny.py, importable as tiny


def test_own_model_from_a_plain_state_dict_inpaints_and_exports(capsys, tmp_path, tests_importable):
    net = randomised(TinyUNet(width=4), seed=3).eval()
    for p in net.parameters():
        p.data *= 0.3  # keep the output off the tanh's saturation, so the pixels say something
    torch.save(net.state_dict(), tmp_path / "net.pth")
    image, mask = _photo_and_mask(tmp_path)
    code, out, err = run(capsys, "inpaint", tmp_path / "photo.png", tmp_path / "mask.png", tmp_path / "out.png",
                         "--model", "tiny:TinyUNet", "--model-kwargs", "{width: 4}", "--checkpoint", tmp_path / "net.pth",
                         "--stride", 8, "--no-progress")
    assert code == 0, err
    with torch.no_grad():
        pred = net((image * (1 - mask)).float(), mask.float())
    got, want = _written(tmp_path / "out.png").astype(int), _by_hand(pred, image, mask).astype(int)
    assert np.abs(got - want).max() <= 1  # float32 against float64 rounding
    assert (got[~mask[0, 0].bool().numpy()] == _written(tmp_path / "photo.png")[~mask[0, 0].bool().numpy()]).all()

    # the same file exported as a graph: the program computes the network's prediction
    code, out, err = run(capsys, "export", tmp_path / "net.pt2", "--model", "tiny:TinyUNet", "--model-kwargs",
                         '{"width": 4}', "--checkpoint", tmp_path / "net.pth", "--stride", 8, "--size", 32)
    assert code == 0, err
    x, m = deploy.example_inputs(32, 32, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(deploy.load_program(tmp_path / "net.pt2")(x, m), net(x * (1 - m), m),
                                   atol=1e-5, rtol=1e-5)


def test_own_model_from_an_exported_file_without_its_record(capsys, tmp_path, tests_importable):
    """save_exported without target=: --model rebuilds it and scores exactly as the file with the record."""
    student = TinyUNet(width=4)
    kd = kdinpaint.attach(student, kdinpaint.build_teacher(student), {"encoder_levels": LEVELS})
    for p in kd.student_parameters():  # completion blocks away from their zero start, so they count
        p.data.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    exported = kd.export()
    kd.detach()
    kdinpaint.save_exported(exported, tmp_path / "bare.safetensors")
    kdinpaint.save_exported(exported, tmp_path / "recorded.safetensors", target="tiny:TinyUNet",
                            builder_kwargs={"width": 4}, stride=8)
    common = ["--count", 2, "--size", 32, "--no-floor", "--no-progress", "--no-perceptual"]
    code, _, err = run(capsys, "evaluate", "--checkpoint", tmp_path / "bare.safetensors", *common)
    assert code == 1 and "does not say which adapter" in err  # without the record the file alone is not enough
    code, _, err = run(capsys, "evaluate", "--model", "tiny:TinyUNet", "--model-kwargs", "{width: 4}", "--stride", 8,
                       "--checkpoint", tmp_path / "bare.safetensors", "--json", tmp_path / "bare.json", *common)
    assert code == 0, err
    code, _, err = run(capsys, "evaluate", "--checkpoint", tmp_path / "recorded.safetensors",
                       "--json", tmp_path / "recorded.json", *common)
    assert code == 0, err
    bare, recorded = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("bare", "recorded"))
    assert [r["psnr"] for r in bare["rows"]] == [r["psnr"] for r in recorded["rows"]]
    assert bare["buckets"]["all"]["count"] == 2


@pytest.mark.parametrize("argv, message", [
    (["--model", "tiny:NoSuchNet"], "has no 'NoSuchNet'"),
    (["--model", "tiny:TinyUNet", "--checkpoint", "missing.pth"], "does not exist"),
    (["--model", "tiny:TinyUNet", "--checkpoint", "{net}"], r"shape mismatches .* --model-kwargs \{\}"),
    (["--model", "tiny:TinyUNet", "--model-kwargs", "[4]", "--checkpoint", "{net}"], "must be a mapping"),
    (["--model", "tiny:TinyUNet", "--model-kwargs", "{depth: 4}"], "could not be built.*depth"),
    (["--model", "tiny:TinyUNet", "--spec", "{input: concat}"], "forward"),
    (["--model", "tiny:TinyUNet", "--adapter", "tiny-unet"], "without --adapter"),
    (["--checkpoint", "{net}", "--spec", "{input: concat}"], "go with --model"),
    (["--weights", "{net}"], "name the adapter.*--perceptual-weights"),
    (["--adapter", "edgeconnect:star", "--weights", "{net}"], "adds completion blocks"),
    (["--adapter", "edgeconnect", "--weights", "nowhere/"], "does not exist.*nothing is downloaded"),
])
def test_bad_model_choices_are_named(capsys, tmp_path, tests_importable, argv, message):
    torch.save(TinyUNet(width=4).state_dict(), tmp_path / "net.pth")
    _photo_and_mask(tmp_path)
    argv = [a.replace("{net}", str(tmp_path / "net.pth")) for a in argv]
    code, _, err = run(capsys, "inpaint", tmp_path / "photo.png", tmp_path / "mask.png", tmp_path / "out.png",
                       "--no-progress", *argv)
    assert code == 1
    assert __import__("re").search(message, err), err
    assert not (tmp_path / "out.png").exists()


# ---- official weights: random tensors in each release's file layout, read by the adapter's own loader ------------
# (freshly initialised networks under a seed: random, and not saturated as N(0, 1) weights would be)
def _edgeconnect(folder: Path) -> tuple[Path, list[str], torch.nn.Module]:
    from kdinpaint_adapters import edgeconnect as ec

    torch.manual_seed(1)
    g1, g2 = ec.EdgeGenerator(residual_blocks=1), ec.InpaintGenerator(residual_blocks=1)
    ec.save_official(g1, folder / "EdgeModel_gen.pth")
    ec.save_official(g2, folder / "InpaintingModel_gen.pth")
    return folder, ["--model-kwargs", "{residual_blocks: 1}"], ec.build_edgeconnect(folder, residual_blocks=1)


def _gatedconv(folder: Path) -> tuple[Path, list[str], torch.nn.Module]:
    from kdinpaint_adapters import gatedconv as gc

    path = folder / "states_tf_places2.pth"
    torch.manual_seed(1)
    torch.save({"G": gc.GatedConvInpaint(cnum=8).state_dict()}, path)
    model = gc.GatedConvInpaint(cnum=8, compat=gc.OFFICIAL_COMPAT)
    return path, ["--model-kwargs", "{cnum: 8}"], gc.load_official(path, model=model)


def _structureflow(folder: Path) -> tuple[Path, list[str], torch.nn.Module]:
    from kdinpaint_adapters import structureflow as sf
    from kdinpaint_adapters.structureflow.networks import StructureReconstructor, TextureGenerator

    torch.manual_seed(1)
    torch.save(StructureReconstructor(dim=8).state_dict(), folder / "latest_net_s_gen.pth")
    torch.save(TextureGenerator(dim=8).state_dict(), folder / "latest_net_f_gen.pth")
    return folder, ["--model-kwargs", "{dim: 8}"], sf.build_structureflow(folder, dim=8)


def _lama(folder: Path) -> tuple[Path, list[str], torch.nn.Module]:
    from kdinpaint_adapters import lama

    torch.manual_seed(1)
    path = lama.save_official(lama.LaMa("big-lama", ngf=8, n_blocks=2), folder / "best.ckpt")
    return path, [], lama.load_official(path)  # the config is read from the file: no --model-kwargs needed


@pytest.mark.parametrize("release", [_edgeconnect, _gatedconv, _structureflow, _lama], ids=lambda f: f.__name__[1:])
def test_official_weights_inpaint_as_the_loaded_network(capsys, tmp_path, release):
    name = release.__name__[1:]
    (tmp_path / "release").mkdir()
    path, extra, reference = release(tmp_path / "release")
    image, mask = _photo_and_mask(tmp_path, 32, 48)  # a multiple of every stride: nothing padded
    code, _, err = run(capsys, "inpaint", tmp_path / "photo.png", tmp_path / "mask.png", tmp_path / "out.png",
                       "--adapter", name, "--weights", path, *extra, "--no-progress")
    assert code == 0, err
    spec = kdinpaint.get_adapter(name).spec
    call = kdinpaint.calling.convention(reference, spec)
    with torch.no_grad():
        args, kwargs = call.build((image * (1 - mask)).float(), mask.float())
        pred = kdinpaint.calling.select_output(reference.eval()(*args, **kwargs), spec.output)
    got, want = _written(tmp_path / "out.png").astype(int), _by_hand(pred, image, mask).astype(int)
    assert np.abs(got - want).max() <= 1


def test_inpaint_mask_hole_auto_the_inverted_mask_flag_and_what_was_written(capsys, tmp_path, tests_importable):
    net = TinyUNet(width=4)
    torch.save(net.state_dict(), tmp_path / "net.pth")
    model = ["--model", "tiny:TinyUNet", "--model-kwargs", "{width: 4}", "--checkpoint", tmp_path / "net.pth",
             "--stride", 8, "--no-progress"]
    _photo_and_mask(tmp_path)
    hole = np.asarray(Image.open(tmp_path / "mask.png")) > 0
    Image.fromarray(np.where(hole, 0, 255).astype(np.uint8)).save(tmp_path / "black.png")  # black = hole
    code, out, err = run(capsys, "inpaint", tmp_path / "photo.png", tmp_path / "black.png", tmp_path / "auto.png",
                         "--mask-hole", "auto", *model)
    assert code == 0, err
    assert out.strip() == f"wrote {tmp_path / 'auto.png'}"
    code, _, err = run(capsys, "inpaint", tmp_path / "photo.png", tmp_path / "black.png", tmp_path / "black_.png",
                       "--mask-hole", "black", *model)
    assert code == 0, err
    assert (_written(tmp_path / "auto.png") == _written(tmp_path / "black_.png")).all()
    # read as white holes, the black-hole mask is 81 % hole: the warning names the flag that reads it right
    with pytest.warns(UserWarning, match="81% hole.*run again with --mask-hole black"):
        code, _, _ = run(capsys, "inpaint", tmp_path / "photo.png", tmp_path / "black.png", tmp_path / "w.png", *model)
    assert code == 0
    # a folder: one summary line
    (tmp_path / "in").mkdir()
    for name in ("a", "b"):
        Image.open(tmp_path / "photo.png").save(tmp_path / "in" / f"{name}.png")
    code, out, err = run(capsys, "inpaint", tmp_path / "in", tmp_path / "mask.png", tmp_path / "out", *model)
    assert code == 0, err
    assert out.startswith(f"wrote 2 image(s) under {tmp_path / 'out'}")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png", "b.png"]


def test_inpaint_shows_progress_within_a_slow_image(capsys, tmp_path, monkeypatch):
    import kdinpaint.cli as cli

    monkeypatch.setattr(cli, "QUICK_SECONDS", -1.0)  # every image counts as slow: the bar within the forward shows
    _photo_and_mask(tmp_path)
    code, out, err = run(capsys, "inpaint", tmp_path / "photo.png", tmp_path / "mask.png", tmp_path / "out.png",
                         "--baseline", "biharmonic")
    assert code == 0 and "layer" not in err  # a weight-free baseline has no layers to count
    code, out, err = run(capsys, "inpaint", tmp_path / "photo.png", tmp_path / "mask.png", tmp_path / "out2.png",
                         "--adapter", "tiny-unet")
    assert code == 0 and "1 image(s) of 32x40" in err and "layer" in err

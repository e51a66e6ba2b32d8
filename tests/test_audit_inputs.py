"""Bad inputs of other kinds than the hardening rounds' (recipes/results/2026-12-07-hardening.md, acceptance audit):
image and mask files on another scale, drawn in alpha or with several frames, empty paths, YAML merge keys,
weight files of another dtype or with NaN, builder kwargs and targets named by a file, programs that are not
programs, a run folder without its recipe. Each test checks the value read against NumPy, or that the refusal
names the file or key and the fix."""

from __future__ import annotations

import json
import os
import sys
import warnings

import numpy as np
import pytest
import yaml
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import kdinpaint
from kdinpaint.data.images import ImageFolder, list_images
from kdinpaint.inference.io import load_image, load_mask
from kdinpaint.train.recipe import load_recipe


# ---- image and mask files -----------------------------------------------------------------------------------
def test_a_32_bit_integer_tiff_is_read_on_the_scale_its_values_show(tmp_path):
    values = np.arange(32 * 32, dtype=np.int32).reshape(32, 32) % 256  # an 8-bit image stored as 32-bit integers
    Image.fromarray(values).save(tmp_path / "i.tif")
    got = load_image(tmp_path / "i.tif")[0, 0].numpy()
    np.testing.assert_allclose(got, values / 255 * 2 - 1, atol=1e-6)  # before: values / 65535, nearly black
    hole = np.zeros((32, 32), np.int32)
    hole[8:20, 4:12] = 255
    Image.fromarray(hole).save(tmp_path / "m.tif")
    assert torch.equal(load_mask(tmp_path / "m.tif")[0, 0], torch.from_numpy(hole > 127).float())  # before: no hole
    Image.fromarray(np.full((4, 4), 200_000, np.int32)).save(tmp_path / "big.tif")
    with pytest.raises(ValueError, match=r"big.tif.*values up to 200000.*scale it to \[0, 1\]"):
        load_image(tmp_path / "big.tif")


def test_a_float_image_with_negative_values_is_refused_not_clipped(tmp_path):
    signed = np.linspace(-1, 1, 64, dtype=np.float32).reshape(8, 8)  # the toolkit's own [-1, 1], saved as is
    Image.fromarray(signed, mode="F").save(tmp_path / "signed.tif")
    with pytest.raises(ValueError, match=r"signed.tif.*values down to -1.*\(x \+ 1\) / 2"):
        load_image(tmp_path / "signed.tif")  # before: the dark half clipped to black
    Image.fromarray((signed + 1) / 2, mode="F").save(tmp_path / "unit.tif")
    np.testing.assert_allclose(load_image(tmp_path / "unit.tif")[0, 0].numpy(), signed, atol=1e-6)


def test_a_mask_drawn_only_in_its_alpha_channel_is_refused_naming_it(tmp_path):
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[4:10, 4:10, 3] = 255  # black everywhere, the hole opaque: read as brightness it had no hole
    Image.fromarray(rgba).save(tmp_path / "alpha.png")
    with pytest.raises(ValueError, match=r"alpha.png.*only in its alpha channel.*hole white on black"):
        load_mask(tmp_path / "alpha.png", (16, 16))
    rgba[..., :3] = rgba[..., 3:]  # the same hole drawn in colour too: read as before
    Image.fromarray(rgba).save(tmp_path / "drawn.png")
    assert float(load_mask(tmp_path / "drawn.png", (16, 16)).sum()) == 36


def test_only_the_first_frame_of_an_animation_is_read_with_a_warning(tmp_path):
    frames = [np.full((8, 8, 3), v, np.uint8) for v in (0, 255)]
    Image.fromarray(frames[0]).save(tmp_path / "a.gif", save_all=True, append_images=[Image.fromarray(frames[1])])
    with pytest.warns(UserWarning, match=r"a.gif' holds 2 frames.*only the first is read"):
        image = load_image(tmp_path / "a.gif")
    assert float(image.max()) == -1.0  # the first (black) frame
    Image.fromarray(frames[1]).save(tmp_path / "still.gif")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_image(tmp_path / "still.gif")


def test_an_empty_image_source_is_refused_not_read_as_the_working_directory(tmp_path, monkeypatch):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "stray.png")
    monkeypatch.chdir(tmp_path)  # before: "" listed every image below the working directory
    for source in ("", "  "):
        with pytest.raises(ValueError, match="empty path .*unset variable"):
            list_images(source)
        with pytest.raises(ValueError, match="empty path"):
            ImageFolder(source, size=8)
    assert list_images(".") == ["stray.png"]


# ---- recipes ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("override", ["checkpoint.dir=''", "data.images=''", "masks.train=' '", "model.init=''"])
def test_an_empty_string_in_a_recipe_is_refused_naming_the_key(override):
    key = override.partition("=")[0]
    with pytest.raises(ValueError, match=rf"{key} is an empty string \(an unset variable"):
        load_recipe(None, [override])


def test_yaml_merge_keys_work_in_a_recipe_and_own_keys_win(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("optim: &o {lr: 0.5, batch_size: 3}\nmeta:\n  lr: 0.25\n  <<: {lr: 0.1, steps: 3}\n"
                    "teacher:\n  <<: *o\n")
    with pytest.raises(ValueError, match="unknown key"):  # the merged keys are checked like any other
        load_recipe(path)
    path.write_text("optim: {lr: 0.5, batch_size: 3}\nmeta:\n  lr: 0.25\n  <<: {lr: 0.1, steps: 3}\ntrain: {steps: 3}\n")
    recipe = load_recipe(path)  # before: "could not determine a constructor for the tag ...merge"
    assert (recipe.meta.lr, recipe.meta.steps) == (0.25, 3)
    path.write_text("meta:\n  <<: {steps: 3}\n  lr: 0.25\n  lr: 0.5\n")
    with pytest.raises(ValueError, match="'lr' appears twice"):
        load_recipe(path)


# ---- weight files -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    adapter = kdinpaint.get_adapter("tiny-unet")
    torch.manual_seed(0)
    student = adapter.student("no-cb", width=8)
    kd = kdinpaint.attach(student, adapter.teacher("no-cb", width=8), adapter.spec.variant("no-cb"))
    path = tmp_path_factory.mktemp("exported") / "good.safetensors"
    kdinpaint.save_exported(kd.export(), path, adapter="tiny-unet:no-cb", builder_kwargs={"width": 8})
    kd.detach()
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    return path, load_file(str(path)), meta


def _rewritten(path, tensors, meta, name, change=None, **metadata):
    tensors = {k: v.clone() for k, v in tensors.items()}
    if change is not None:
        change(tensors)
    out = path.with_name(name)
    save_file(tensors, str(out), metadata={**meta, **metadata})
    return out


KEY = "model.dec1.0.weight"


@pytest.mark.parametrize("name, change, match", [
    ("int8", lambda t: t.__setitem__(KEY, (t[KEY] * 100).to(torch.int8)), r"'model.dec1.0.weight' is int8 \(integer\)"),
    ("bool", lambda t: t.__setitem__(KEY, t[KEY] > 0), r"'model.dec1.0.weight' is bool"),
    ("nan", lambda t: t[KEY].view(-1).__setitem__(3, float("nan")), r"'model.dec1.0.weight' holds 1 NaN/inf"),
    ("inf", lambda t: t[KEY].view(-1).__setitem__(0, float("-inf")), r"holds 1 NaN/inf value\(s\).*earlier checkpoint"),
])
def test_weights_of_another_kind_or_not_finite_are_refused_naming_the_tensor(exported, name, change, match):
    path, tensors, meta = exported
    bad = _rewritten(path, tensors, meta, f"{name}.safetensors", change)
    with pytest.raises(ValueError, match=rf"{name}.safetensors: .*{match}"):  # before: loaded, cast silently
        kdinpaint.load_checkpoint(bad)
    model = kdinpaint.get_adapter("tiny-unet").student("no-cb", width=8)
    state = {k.removeprefix("model."): v for k, v in load_file(str(bad)).items() if k.startswith("model.")}
    torch.save(state, bad.with_suffix(".pth"))  # the plain state-dict path alike
    with pytest.raises(ValueError, match=match.replace("model.dec1", "dec1")):
        kdinpaint.weights.load_weights(model, bad.with_suffix(".pth"), "tiny-unet student")


def test_float16_weights_load_as_their_float32_values(exported):
    path, tensors, meta = exported
    half = _rewritten(path, tensors, meta, "half.safetensors", lambda t: t.__setitem__(KEY, t[KEY].half()))
    model, _ = kdinpaint.load_checkpoint(half)
    assert torch.equal(model.state_dict()[KEY], tensors[KEY].half().float())


def test_builder_kwargs_a_builder_refuses_name_the_file(exported):
    path, tensors, meta = exported
    bad = _rewritten(path, tensors, meta, "kw.safetensors", **{"kdinpaint.builder_kwargs": json.dumps({"width": 8, "depth": 3})})
    with pytest.raises(ValueError, match=r"kw.safetensors: the builder of 'tiny-unet' refuses the file's "
                                         r"kdinpaint.builder_kwargs .*unexpected keyword argument 'depth'.*export it again"):
        kdinpaint.load_checkpoint(bad)  # before: a bare TypeError naming no file


def test_a_file_naming_a_standard_library_module_never_imports_it(exported, tmp_path, monkeypatch):
    path, tensors, meta = exported
    meta = {k: v for k, v in meta.items() if k != "kdinpaint.adapter"}
    (tmp_path / "marker_mod.py").write_text(f"open({str(tmp_path / 'IMPORTED')!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "stdlib_module_names", frozenset({*sys.stdlib_module_names, "marker_mod"}))
    bad = _rewritten(path, tensors, meta, "std.safetensors", **{"kdinpaint.target": "marker_mod:Net"})
    with pytest.raises(ValueError, match=r"std.safetensors names 'marker_mod:Net'.*standard library"):
        kdinpaint.load_checkpoint(bad)
    assert not (tmp_path / "IMPORTED").exists() and "marker_mod" not in sys.modules
    bad = _rewritten(path, tensors, meta, "anti.safetensors", **{"kdinpaint.target": "antigravity:Net"})
    with pytest.raises(ValueError, match="standard library"):
        kdinpaint.load_checkpoint(bad)  # before: imported (it opens a web browser), then "has no 'Net'"
    assert "antigravity" not in sys.modules


def test_a_file_that_is_not_a_program_is_named(tmp_path):
    from kdinpaint.deploy import load_program

    torch.save({"weight": torch.zeros(2)}, tmp_path / "state.pt2")  # torch.save writes a zip too
    with pytest.raises(ValueError, match=r"state.pt2' cannot be read as a torch.export program.*kdinpaint export"):
        load_program(tmp_path / "state.pt2")


# ---- run folders --------------------------------------------------------------------------------------------
def test_checkpoints_without_their_recipe_are_not_resumed_silently(tmp_path):
    from kdinpaint.train.runs import check_run_folder

    run = tmp_path / "run"
    (run / "checkpoints" / "step_0000004").mkdir(parents=True)
    recipe = load_recipe(None, ["data.size=32"])
    with pytest.raises(ValueError, match=r"holds checkpoints \(up to step_0000004\) but no recipe.yaml.*--resume-changed"):
        check_run_folder(run, recipe)  # before: resumed with whatever recipe was given
    assert check_run_folder(run, recipe, allow_changed=True) == []


def test_a_run_folders_recipe_with_a_key_twice_is_refused_on_resume(tmp_path):
    # a hand-edited recipe.yaml is read as recipes are: plain YAML would keep the second `size` silently
    from kdinpaint.train.runs import check_run_folder

    run = tmp_path / "run"
    (run / "checkpoints" / "step_0000004").mkdir(parents=True)
    recipe = load_recipe(None, ["data.size=32"])
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe.to_dict()).replace("  size: 32\n", "  size: 32\n  size: 48\n"))
    assert yaml.safe_load((run / "recipe.yaml").read_text())["data"]["size"] == 48  # what plain YAML would resume
    with pytest.raises(ValueError, match=r"recipe.yaml \(the recipe of the run to resume\) cannot be read .*'size' appears twice"):
        check_run_folder(run, recipe)

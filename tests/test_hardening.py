"""Bad input gets a clear error (issue 14): non-finite values, dtype and shape edges, inverted masks, recipe ranges.

Each refusal is checked for the words that name the problem and the fix; each thing that is handled instead of
refused (a float64 image into a float32 model, a mask at another resolution) is checked against an independent
reference. Hypothesis properties: ``mask_at`` never loses a hole (100 examples) and matches the cell
definition of its docstring; recipe values out of range are refused naming the key (100 examples) while
values in range are accepted (50 examples); ``Inpainter`` over batch sizes, odd sizes, strides, image and
model dtypes keeps known pixels bit for bit and fills holes with the model's output (80 examples), and refuses
any NaN/inf in the image or mask (60) and any image outside [-1, 1] (60). Files and runs: unreadable mask
files skipped and counted, wrong hole colour, corrupt caches, oversized images, damaged or foreign weight
files, export after detach, the run folder, random-state files, ``recipes/train.py``'s one-line errors.
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from kdinpaint.inference import Inpainter, NonFiniteOutput
from kdinpaint.masking import check_mask, check_rgb_image, mask_at, masked
from kdinpaint.evaluation.metrics import evaluate
from kdinpaint.train.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
PROPERTY = settings(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


def _image(b: int = 1, h: int = 8, w: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _mask(b: int = 1, h: int = 8, w: int = 8) -> torch.Tensor:
    mask = torch.zeros(b, 1, h, w)
    mask[..., 2:5, 3:6] = 1  # 9 of 64 pixels
    return mask


def _identity(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return image


# ---- non-finite values -------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_inpainter_refuses_a_non_finite_pixel_naming_the_fix(bad):
    image = _image()
    image[0, 1, 6, 7] = bad  # a known pixel: it would pass into the result unnoticed
    with pytest.raises(ValueError, match=r"image has 1 non-finite value.*index \(0, 1, 6, 7\).*nan_to_num"):
        Inpainter(_identity)(image, _mask())


def test_evaluate_never_returns_nan_and_names_the_tensor():
    target, mask = _image(), _mask()
    pred = target.clone()
    pred[0, 0, 3, 4] = float("nan")
    with pytest.raises(ValueError, match="pred has 1 non-finite"):
        evaluate(pred, target, mask)
    with pytest.raises(ValueError, match="target has 1 non-finite"):
        evaluate(target, pred, mask)
    nan_mask = mask.clone()
    nan_mask[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"mask has 1 non-finite value.*0 \(known\) or 1 \(hole\)"):
        evaluate(target, target, nan_mask)


def test_a_model_returning_nan_is_refused_naming_the_model_and_the_pixel_count():
    def diverged(image, mask):
        out = image.clone()
        out[0, 1, 2:4, 3] = float("nan")  # 2 pixels, one channel each
        out[0, :, 5, 5] = float("inf")  # 1 pixel, every channel
        return out

    with pytest.raises(NonFiniteOutput, match=r"^broken-net returned NaN/inf at 3 of 64 pixels \(image 0 of the batch\).*diverged run"):
        Inpainter(diverged, name="broken-net")(_image(), _mask())
    assert issubclass(NonFiniteOutput, ValueError)  # the CLI prints ValueErrors as one line


# ---- dtypes and shapes -------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_an_image_of_another_dtype_runs_in_the_models_dtype_and_comes_back_in_its_own(dtype):
    class Net(torch.nn.Module):  # a float32 network called as (image, mask)
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)

        def forward(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            seen.append((image.dtype, mask.dtype))
            return self.conv(image)

    seen: list = []
    net = Net()
    conv = net.conv
    torch.nn.init.normal_(conv.weight, std=0.2, generator=torch.Generator().manual_seed(3))
    image, mask = _image().to(dtype), _mask()
    out = Inpainter(net)(image, mask)
    assert out.dtype == dtype and seen == [(torch.float32, torch.float32)]
    hole = mask.expand_as(image).bool()
    assert torch.equal(out[~hole], image[~hole])  # known pixels are the input's, bit for bit
    with torch.no_grad():  # the reference: the float32 network on the image cast up, cast back
        ref = conv(masked(image.float(), mask)).clamp(-1, 1).to(dtype)
    assert torch.equal(out[hole], ref[hole])


def test_empty_batches_are_refused_clearly():
    with pytest.raises(ValueError, match=r"image is empty, shape \(0, 3, 8, 8\).*at least one image"):
        Inpainter(_identity)(torch.zeros(0, 3, 8, 8), torch.zeros(0, 1, 8, 8))
    with pytest.raises(ValueError, match=r"pred is empty"):
        evaluate(torch.zeros(0, 3, 8, 8), torch.zeros(0, 3, 8, 8), torch.zeros(0, 1, 8, 8))
    with pytest.raises(ValueError, match=r"image is empty, shape \(1, 3, 0, 8\)"):
        check_rgb_image(torch.zeros(1, 3, 0, 8))


def test_a_single_image_without_batch_axis_is_refused_naming_the_fix():
    image = _image()[0]  # (3, 8, 8): before, the mask's batch was compared with the 3 channels
    with pytest.raises(ValueError, match=r"image\[None\]"):
        check_mask(torch.zeros(3, 1, 8, 8), image)
    with pytest.raises(ValueError, match=r"one image \(3, 8, 8\).*image\[None\]"):
        Inpainter(_identity)(image, torch.zeros(1, 1, 8, 8))


def test_mask_at_keeps_a_hole_when_one_side_grows_and_the_other_shrinks():
    mask = torch.tensor([[0.0], [1.0]])[None, None]  # (1, 1, 2, 1): the hole is in the second row
    assert torch.equal(mask_at(mask, (1, 2)), torch.ones(1, 1, 1, 2))
    for size in [(0, 0), (4, 0), (2,)]:
        with pytest.raises(ValueError, match="at least 1x1"):
            mask_at(mask, size)
    with pytest.raises(ValueError, match="empty mask"):
        mask_at(torch.zeros(1, 1, 0, 4), (2, 2))


def _cells(n_in: int, n_out: int) -> list[tuple[int, int]]:
    """The docstring's cells: cell i of n_out covers pixels floor(i n_in / n_out) .. ceil((i + 1) n_in / n_out) - 1."""
    return [((i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)) for i in range(n_out)]


@settings(PROPERTY, max_examples=100)
@given(
    b=st.integers(1, 2), H=st.integers(1, 20), W=st.integers(1, 20), h=st.integers(1, 20), w=st.integers(1, 20),
    density=st.floats(0.0, 0.3), seed=st.integers(0, 2**31 - 1),
)
def test_mask_at_never_loses_a_hole(b, H, W, h, w, density, seed):
    mask = (torch.rand(b, 1, H, W, generator=torch.Generator().manual_seed(seed)) < density).float()
    out = mask_at(mask, (h, w))
    assert out.shape == (b, 1, h, w)
    # every hole pixel maps, by its relative position, to a hole cell
    bs, _, ys, xs = (mask > 0).nonzero(as_tuple=True)
    assert bool((out[bs, 0, ys * h // H, xs * w // W] == 1).all())
    # and the output is exactly the max over each cell (no hole invented beyond the cells), in numpy loops
    m = mask.numpy()
    ref = np.array([[[[m[k, 0, y0:y1, x0:x1].max() for x0, x1 in _cells(W, w)] for y0, y1 in _cells(H, h)]]
                    for k in range(b)])
    assert np.array_equal(out.numpy(), ref)


# ---- inverted masks ----------------------------------------------------------------------------------
def test_inpainter_warns_once_per_call_on_a_mostly_hole_mask():
    image = _image(3)
    inverted = 1 - _mask(3)  # 86 % hole: 1 = known by mistake
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Inpainter(_identity)(image, inverted)
        Inpainter(_identity)(image, _mask(3))
    assert len(caught) == 1 and "86% hole" in str(caught[0].message) and "1 - mask" in str(caught[0].message)
    assert caught[0].filename == __file__  # it points at the caller's line


def test_bool_and_integer_masks_still_work_with_the_warning_check():
    image, mask = _image(), _mask()
    reference = Inpainter(lambda i, m: -i)(image, mask)
    for other in (mask.bool(), mask.to(torch.uint8)):
        assert torch.equal(Inpainter(lambda i, m: -i)(image, other), reference)


def test_cli_inpaint_warns_on_an_inverted_mask(tmp_path, capsys):
    from kdinpaint.cli import main

    Image.fromarray(np.full((16, 16, 3), 120, np.uint8)).save(tmp_path / "photo.png")
    hole = np.full((16, 16), 255, np.uint8)
    hole[4:8, 4:8] = 0  # white = hole: 94 % hole
    Image.fromarray(hole).save(tmp_path / "mask.png")
    with pytest.warns(UserWarning, match="94% hole"):
        code = main(["inpaint", str(tmp_path / "photo.png"), str(tmp_path / "mask.png"), str(tmp_path / "out.png"),
                     "--baseline", "mean", "--no-progress"])
    assert code == 0 and (tmp_path / "out.png").is_file()


# ---- recipe values -----------------------------------------------------------------------------------
BAD_RECIPE_VALUES = [
    ("optim.lr=-1", "optim.lr must be > 0, got -1.0"),
    ("optim.lr=0", "optim.lr must be > 0, got 0.0"),
    ("optim.lr=.nan", "optim.lr must be a finite number, got nan"),
    ("optim.betas=[0.9]", r"optim.betas must be two numbers in \[0, 1\), got \[0.9\]"),
    ("optim.betas=[0.9, 1.0]", r"optim.betas must be two numbers in \[0, 1\)"),
    ("optim.batch_size=0", "optim.batch_size must be >= 1, got 0"),
    ("meta.steps=0", "meta.steps must be >= 1, got 0"),
    ("meta.lr=0", "meta.lr must be > 0, got 0.0"),
    ("meta.inner_lr=-1", "meta.inner_lr must be > 0 or null, got -1.0"),
    ("meta.max_hypergrad_norm=0", "meta.max_hypergrad_norm must be > 0 or null, got 0.0"),
    ("log.every=0", "log.every must be >= 1, got 0"),
    ("log.sample_every=-1", "log.sample_every must be >= 0, got -1"),
    ("checkpoint.keep=0", "checkpoint.keep must be >= 1, got 0"),
    ("checkpoint.every=-5", "checkpoint.every must be >= 0, got -5"),
    ("teacher.steps=-1", "teacher.steps must be >= 0, got -1"),
    ("teacher.lr=-0.001", "teacher.lr must be > 0, got -0.001"),
    ("train.steps=1", "train.steps=1 is below meta.steps=2: .* 0 steps"),
    ("data.size=0", "data.size must be >= 8 and a multiple of 8, got 0"),
    ("data.size=12", "data.size must be >= 8 and a multiple of 8, got 12"),
    ("data.eval_count=0", "data.eval_count must be >= 1, got 0"),
    ("data.sample_count=0", "data.sample_count must be >= 1, got 0"),
    ("data.workers=-1", "data.workers must be >= 0, got -1"),
    ("data.augment=[flip, rotate]", r"data.augment must be a list of distinct names from \[flip, rot90, channels\], got \['flip', 'rotate'\]"),
    ("data.augment=[flip, flip]", r"data.augment must be a list of distinct names"),
    ("masks.train_ratio=table2", r"masks.train_ratio='table2' is not one of \['any', 'table1'\]"),
    ("losses.lambda_d=-20", "losses.lambda_d must be >= 0, got -20.0"),
    ("losses.adversarial=-0.1", "losses.adversarial must be >= 0, got -0.1"),
    ("train.threads=-1", r"train.threads must be >= 0 or null, got -1"),
    ("train.process_group_timeout=0", "train.process_group_timeout must be >= 1, got 0"),
    ("model.kwargs={width: 8", r"override 'model.kwargs=\{width: 8': the value .* is not a YAML value"),
]


@pytest.mark.parametrize("override, message", BAD_RECIPE_VALUES, ids=[o for o, _ in BAD_RECIPE_VALUES])
def test_recipe_values_out_of_range_are_refused_at_load(override, message):
    with pytest.raises(ValueError, match=message):
        load_recipe(ROOT / "recipes" / "demo.yaml", [override])


def test_recipe_nulls_are_accepted_where_documented():
    recipe = load_recipe(None, ["meta.inner_lr=null", "meta.max_hypergrad_norm=null", "checkpoint.every=0",
                                "log.sample_every=0", "teacher.steps=0", "losses.adversarial=0"])
    assert recipe.meta.inner_lr is None and recipe.checkpoint.every == 0


# (key, kind, lowest valid value, whether it is valid itself, highest valid value or None), written from the brief
RANGES = [
    ("optim.lr", float, 0, False, None), ("optim.batch_size", int, 1, True, None),
    ("meta.steps", int, 1, True, None), ("meta.lr", float, 0, False, None), ("meta.inner_lr", float, 0, False, None),
    ("meta.max_hypergrad_norm", float, 0, False, None), ("log.every", int, 1, True, None),
    ("log.sample_every", int, 0, True, None), ("checkpoint.keep", int, 1, True, None),
    ("checkpoint.every", int, 0, True, None), ("teacher.steps", int, 0, True, None),
    ("teacher.lr", float, 0, False, None), ("data.eval_count", int, 1, True, None),
    ("data.sample_count", int, 1, True, None), ("data.workers", int, 0, True, None),
    ("losses.lambda_r", float, 0, True, None), ("losses.lambda_d", float, 0, True, None),
    ("losses.lambda_s", float, 0, True, None), ("optim.min_lr_ratio", float, 0, True, 1),
]


@st.composite
def _out_of_range(draw):
    key, kind, lo, inclusive, hi = draw(st.sampled_from(RANGES))
    if kind is int:
        below = st.integers(-10**6, lo - 1 if inclusive else lo)
        value = draw(below if hi is None else st.one_of(below, st.integers(hi + 1, hi + 10**6)))
    else:
        below = st.floats(-1e6, lo, exclude_max=inclusive, allow_nan=False)
        bad = st.one_of(below, st.sampled_from([math.nan, math.inf, -math.inf]))
        value = draw(bad if hi is None else st.one_of(bad, st.floats(hi, 1e6, exclude_min=True)))
    return key, value


def _yaml(value: int | float) -> str:
    """``value`` as a YAML scalar that reads back exactly (PyYAML needs a dot and a signed exponent in floats)."""
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return ".nan"
    if math.isinf(value):
        return ".inf" if value > 0 else "-.inf"
    return f"{value:.17e}"


@settings(PROPERTY, max_examples=100)
@given(case=_out_of_range())
def test_random_out_of_range_recipe_values_are_refused_naming_the_key(case):
    key, value = case
    with pytest.raises(ValueError, match=rf"^{key.replace('.', '[.]')} must be"):
        load_recipe(None, [f"{key}={_yaml(value)}"])


@st.composite
def _in_range(draw):
    key, kind, lo, inclusive, hi = draw(st.sampled_from(RANGES))
    top = 10**6 if hi is None else hi
    if kind is int:
        return key, draw(st.integers(lo if inclusive else lo + 1, top))
    return key, draw(st.floats(lo, top, exclude_min=not inclusive, allow_nan=False, allow_infinity=False))


@settings(PROPERTY, max_examples=50)
@given(case=_in_range())
def test_random_in_range_recipe_values_are_accepted(case):
    key, value = case
    section, name = key.split(".")
    blocks = [f"train.steps={value}"] if key == "meta.steps" else []  # train.steps covers one block of meta.steps
    recipe = load_recipe(None, [f"{key}={_yaml(value)}", *blocks])
    assert getattr(getattr(recipe, section), name) == value


def test_a_model_kwargs_typo_names_the_valid_keywords():
    from kdinpaint.train.runs import build_models

    recipe = load_recipe(None, ["model.adapter=tiny-unet", "model.kwargs={widht: 4}"])
    with pytest.raises(ValueError, match=r"model.kwargs \['widht'\] .*valid keyword names: \['width', 'act_layer'\]"):
        build_models(recipe)
    recipe = load_recipe(None, ["model.adapter=gatedconv", "model.kwargs={cnun: 4}"])  # a builder forwarding **kwargs
    with pytest.raises(ValueError, match=r"model.kwargs \['cnun'\] .*valid keyword names: \[.*'cnum'"):
        build_models(recipe)



@pytest.mark.parametrize(("adapter", "kwargs", "message"), [
    ("reference", '{width: "8"}', r"model.kwargs.width of the reference builder must be an int \(its default is 64\), got '8' \(str\); write width: 8 without quotes"),
    ("reference", "{width: 2.5}", r"model.kwargs.width .* got 2.5 \(float\)"),
    ("tiny-unet", "{width: 0}", r"model.kwargs \{'width': 0\} do not build the tiny-unet network .*width must be a positive int"),
    ("gatedconv", '{cnum: "8"}', r"model.kwargs.cnum of the gatedconv builder must be an int"),
    ("structureflow", "{dim: 0}", r"model.kwargs \{'dim': 0\} do not build the structureflow network \(RuntimeError"),
])
def test_model_kwargs_of_the_wrong_type_or_size_name_the_recipe_key(adapter, kwargs, message):
    """A width written as a string used to fail deep in the builder (reference: 'not all arguments converted during
    string formatting'), and width 0 built a reference network of 51 parameters without a word."""
    from kdinpaint.train.runs import build_models

    recipe = load_recipe(None, [f"model.adapter={adapter}", f"model.kwargs={kwargs}"])
    with pytest.raises(ValueError, match=message):
        build_models(recipe)
    good = load_recipe(None, ["model.adapter=reference", "model.kwargs={width: 2, prefill: biharmonic}"])
    assert build_models(good)[3].prefill_mode == "biharmonic"  # a str where the default is a bool: the builder's to judge


def test_teacher_kwargs_errors_name_teacher_kwargs():
    from kdinpaint import get_adapter
    from kdinpaint.train.runs import build_network

    with pytest.raises(ValueError, match=r"teacher.kwargs.width of the tiny-unet builder must be an int"):
        build_network(get_adapter("tiny-unet"), None, {"width": "4"}, "teacher.kwargs")
    with pytest.raises(ValueError, match=r"teacher.kwargs \['widht'\] not accepted by the tiny-unet builder"):
        build_network(get_adapter("tiny-unet"), None, {"widht": 4}, "teacher.kwargs")


# ---- files: masks, images, weights, exported models -------------------------------------------------
def _mask_files(root: Path, holes: list[int], *, white_hole: bool = True, size: int = 16) -> list[Path]:
    """Square holes of side ``holes[k]`` at the top left, drawn in white (or black) on the other colour."""
    root.mkdir(exist_ok=True)
    paths = []
    for k, side in enumerate(holes):
        hole = np.zeros((size, size), bool)
        hole[:side, :side] = True
        Image.fromarray(((hole if white_hole else ~hole) * 255).astype(np.uint8)).save(root / f"{k:02d}.png")
        paths.append(root / f"{k:02d}.png")
    return paths


def _unreadable(root: Path) -> list[str]:
    """A truncated PNG and a text file named .png; their paths."""
    good = root / "00.png"
    (root / "05_truncated.png").write_bytes(good.read_bytes()[:40])
    (root / "06_text.png").write_text("not an image")
    return [str(root / "05_truncated.png"), str(root / "06_text.png")]


def test_mask_folder_skips_and_counts_unreadable_files_naming_them(tmp_path, caplog):
    from kdinpaint.data import MaskFolder

    _mask_files(tmp_path / "m", [4, 6, 8])
    bad = _unreadable(tmp_path / "m")
    with caplog.at_level("WARNING"):
        folder = MaskFolder(tmp_path / "m", size=16, hole="auto")  # the probe meets both bad files
        drawn = [folder.sample(np.random.default_rng(s), (16, 16)) for s in range(40)]
    assert sorted(folder.skipped) == bad
    assert all(any(b in r.getMessage() for r in caplog.records) for b in bad)
    assert {int(d.sum()) for d in drawn} == {16, 36, 64}  # only the readable masks, read the way they were drawn
    index = folder.paths.index(bad[0])
    with pytest.raises(ValueError, match=r"cannot read mask '.*05_truncated.png'"):
        folder[index]
    bucketed = MaskFolder(tmp_path / "m", size=16, hole="white", ratio=(0.0, 1.0))  # the ratio pass skips them too
    assert sorted(bucketed.skipped) == bad and len(bucketed) == 3


def test_mask_folder_with_the_wrong_hole_colour_is_refused_or_warned(tmp_path, caplog):
    from kdinpaint.data import MaskFolder

    _mask_files(tmp_path / "black", [0, 0, 0])  # all black
    with pytest.raises(ValueError, match=r"hole='white' every one of 3 probed masks .* is empty.*not masks with holes"):
        MaskFolder(tmp_path / "black", size=16, hole="white")
    _mask_files(tmp_path / "train", [4, 6, 8], white_hole=False)  # NVIDIA training style: black holes
    with caplog.at_level("WARNING"):
        folder = MaskFolder(tmp_path / "train", size=16, hole="white")
    assert "pass hole='black'" in caplog.text and "holes cover 86 %" in caplog.text  # 1 - 36/256 of the median mask
    assert folder.hole_colour == "white"


def test_a_corrupt_mask_ratio_cache_is_named_with_the_fix(tmp_path):
    from kdinpaint.data import MaskFolder

    _mask_files(tmp_path / "m", [4, 6, 8])
    cache = tmp_path / "ratios.json"
    cache.write_text('{"16x16:white:0.5": {"a": 0.1')  # a run killed while writing
    with pytest.raises(ValueError, match=r"mask ratio cache '.*ratios.json' is not valid JSON .*delete it"):
        MaskFolder(tmp_path / "m", size=16, hole="white", ratio=(0.0, 0.5), cache=cache)


def test_an_image_over_the_pixel_limit_is_a_clear_error_and_skipped_in_folders(tmp_path, monkeypatch):
    from kdinpaint.data import ImageFolder
    from kdinpaint.inference import load_image, load_mask

    Image.fromarray(np.zeros((24, 20, 3), np.uint8)).save(tmp_path / "big.png")  # 480 pixels
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "small.png")  # 64 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200)  # PIL refuses more than twice the limit: 400
    for load in (load_image, load_mask):
        with pytest.raises(ValueError, match=r"'.*big.png' is too large to decode safely .*MAX_IMAGE_PIXELS"):
            load(tmp_path / "big.png")
    folder = ImageFolder(tmp_path, 8)
    items = [folder[i] for i in range(len(folder))]
    assert folder.skipped == [str(tmp_path / "big.png")] and all(it["path"].endswith("small.png") for it in items)


def _exported(tmp_path: Path, width: int = 8) -> Path:
    import kdinpaint
    from tiny import LEVELS, TinyUNet

    torch.manual_seed(0)
    student = TinyUNet(width)
    kd = kdinpaint.attach(student, kdinpaint.build_teacher(student), {"encoder_levels": LEVELS})
    path = tmp_path / f"student{width}.safetensors"
    kdinpaint.save_exported(kd.export(), path, adapter="tiny-unet")
    kd.detach()
    return path


@pytest.mark.parametrize("damage", ["empty", "truncated", "text"])
def test_unreadable_safetensors_name_the_file_in_the_api_and_the_cli(tmp_path, damage, capsys):
    import kdinpaint
    from kdinpaint.cli import main
    from kdinpaint.weights import read_weights
    from tiny import TinyUNet

    good = _exported(tmp_path)
    bad = tmp_path / "bad.safetensors"
    data = good.read_bytes()
    bad.write_bytes({"empty": b"", "truncated": data[: len(data) // 2], "text": b"hello world, not tensors"}[damage])
    name = r"bad\.safetensors"
    with pytest.raises(ValueError, match=name + r" cannot be read as a safetensors file"):
        kdinpaint.load_exported(bad, TinyUNet())
    with pytest.raises(ValueError, match=name + r" cannot be read as a safetensors file"):
        kdinpaint.load_checkpoint(bad)
    with pytest.raises(ValueError, match=name + r" cannot be read as a tensors-only"):
        read_weights(bad)
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "photo.png")
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "mask.png")
    code = main(["inpaint", str(tmp_path / "photo.png"), str(tmp_path / "mask.png"), str(tmp_path / "out.png"),
                 "--checkpoint", str(bad), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and "bad.safetensors cannot be read" in err and "Traceback" not in err and len(err.splitlines()) == 1


def test_an_exported_file_of_another_network_names_the_file_and_the_keys(tmp_path):
    import kdinpaint
    from tiny import TinyUNet

    path = _exported(tmp_path, width=8)
    with pytest.raises(ValueError, match=r"student8.safetensors \(exported from 'tiny-unet'\) does not fit Sequential: "
                                         r"its completion sites \['down1', 'down2'"):
        kdinpaint.load_exported(path, torch.nn.Sequential(torch.nn.Conv2d(4, 3, 1)))
    with pytest.raises(ValueError, match=r"does not fit TinyUNet: shape mismatches \(\d+\): model.stem.0.weight \(8, 4, 3, 3\) vs model \(4, 4, 3, 3\)"):
        kdinpaint.load_exported(path, TinyUNet(4))


def test_a_weight_file_of_another_network_names_the_file_and_the_keys(tmp_path):
    from safetensors.torch import save_file

    from kdinpaint.weights import load_weights
    from tiny import TinyUNet

    path = tmp_path / "w8.safetensors"
    save_file(TinyUNet(8).state_dict(), str(path))
    with pytest.raises(ValueError, match=r"w8.safetensors is not a tiny teacher: shape mismatches \(\d+\): stem.0.weight \(8, 4, 3, 3\) vs model \(4, 4, 3, 3\)"):
        load_weights(TinyUNet(4), path, "tiny teacher")
    extra = {**TinyUNet(4).state_dict(), "gamma.0.weight": torch.zeros(1)}
    save_file(extra, str(path))
    with pytest.raises(ValueError, match=r"unexpected keys \(1\): gamma.0.weight"):
        load_weights(TinyUNet(4), path, "tiny teacher")
    model = TinyUNet(4)
    save_file(model.state_dict(), str(path))
    fresh = TinyUNet(4)
    load_weights(fresh, path, "tiny teacher")
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))


def test_an_exported_model_refuses_a_0_255_image():
    import kdinpaint
    from tiny import LEVELS, TinyUNet, batch

    student = TinyUNet()
    kd = kdinpaint.attach(student, kdinpaint.build_teacher(student), {"encoder_levels": LEVELS})
    exported = kd.export().eval()
    image, mask = batch()
    with pytest.raises(ValueError, match=r"image values must lie in \[-1, 1\], found .*x / 127.5 - 1"):
        exported((image + 1) * 127.5, mask)


# ---- hooks ---------------------------------------------------------------------------------------------
def _hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_export_after_detach_leaves_the_student_hook_free_and_a_second_attach_single():
    import kdinpaint
    from tiny import LEVELS, TinyUNet, batch

    student = TinyUNet()
    teacher = kdinpaint.build_teacher(student)
    kd = kdinpaint.attach(student, teacher, {"encoder_levels": LEVELS})
    attached_hooks = _hook_count(student)
    kd.detach()
    image, mask = batch()
    with torch.no_grad():
        plain = student.eval()(image, mask)
        exported = kd.export().eval()  # after detach: still allowed, and it must not hook the student again
    assert _hook_count(student) == 0 and not kd.attached and not kdinpaint.attach.__module__ == ""
    with torch.no_grad():
        assert torch.equal(student(image, mask), plain)
        assert exported(image, mask).shape == plain.shape
    again = kdinpaint.attach(student, teacher, {"encoder_levels": LEVELS})
    assert _hook_count(student) == attached_hooks
    again.detach()
    assert _hook_count(student) == 0


# ---- the run folder ------------------------------------------------------------------------------------
def _run_folder(tmp_path: Path, overrides: list[str]) -> Path:
    import yaml

    run = tmp_path / "run"
    (run / "checkpoints" / "step_0000004").mkdir(parents=True)
    (run / "recipe.yaml").write_text(yaml.safe_dump(load_recipe(None, overrides).to_dict(), sort_keys=False))
    return run


def test_resuming_with_another_recipe_is_refused_naming_the_keys(tmp_path):
    from kdinpaint.train.runs import check_run_folder

    run = _run_folder(tmp_path, ["data.size=32", "log.every=2"])
    assert check_run_folder(run, load_recipe(None, ["data.size=32", "log.every=2"])) == []
    assert check_run_folder(run, load_recipe(None, ["data.size=32", "log.every=5", "checkpoint.keep=4"])) == [
        "checkpoint.keep", "log.every"]  # where and how often it logs and saves may change
    changed = load_recipe(None, ["data.size=64", "optim.lr=3e-4", "log.every=2"])
    with pytest.raises(ValueError, match=r"holds checkpoints \(up to step_0000004\) of another recipe \(data.size: 32 -> 64, "
                                         r"optim.lr: 0.0001 -> 0.0003\).*--resume-changed"):
        check_run_folder(run, changed)
    assert check_run_folder(run, changed, allow_changed=True) == ["data.size", "optim.lr"]
    with pytest.raises(ValueError, match=r"checkpoint.resume is false: a new run would collide .*another checkpoint.dir"):
        check_run_folder(run, load_recipe(None, ["data.size=32", "log.every=2", "checkpoint.resume=false"]))
    (run / "recipe.yaml").write_text("model: {adapter: [unclosed\n")
    with pytest.raises(ValueError, match=r"recipe.yaml \(the recipe of the run to resume\) cannot be read"):
        check_run_folder(run, load_recipe(None, []))


def test_a_tampered_random_state_file_is_a_warning_naming_it(tmp_path, caplog):
    import random

    from kdinpaint.train.runs import check_random_states

    states = {"random_state": random.getstate(), "numpy_random_seed": np.random.get_state(),
              "torch_manual_seed": torch.get_rng_state()}
    torch.save(states, tmp_path / "random_states_0.pkl")  # as accelerate's save_state writes it
    assert check_random_states(tmp_path, 0)
    for tampered in (b"\x80\x04garbage", (tmp_path / "random_states_0.pkl").read_bytes()[:100]):
        (tmp_path / "random_states_1.pkl").write_bytes(tampered)
        caplog.clear()
        with caplog.at_level("WARNING"):
            assert not check_random_states(tmp_path, 1)
        assert "random_states_1.pkl cannot be loaded" in caplog.text and "fresh random states" in caplog.text
    torch.save({**states, "torch_manual_seed": torch.zeros(3)}, tmp_path / "random_states_2.pkl")  # loads, wrong state
    assert not check_random_states(tmp_path, 2)


def test_process_group_timeout_reaches_accelerate():
    from datetime import timedelta

    from kdinpaint.train.runs import process_group_kwargs

    recipe = load_recipe(None, [])
    (handler,) = process_group_kwargs(recipe.train.process_group_timeout)
    assert handler.timeout == timedelta(seconds=600)


@pytest.mark.slow
def test_train_refuses_a_bad_teacher_file_in_one_line_before_copying_it(tmp_path):
    import subprocess

    bad = tmp_path / "teacher.safetensors"
    bad.write_bytes(b"not tensors")
    run = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "recipes" / "train.py"), "model.kwargs={width: 4}", "data.size=32", "train.steps=2",
           f"teacher.weights={bad}", f"checkpoint.dir={run}", "log.tensorboard=false"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    (line,) = [ln for ln in proc.stderr.splitlines() if "error" in ln]
    assert line.startswith("train.py: error: ") and f"{bad} cannot be read as a tensors-only reference teacher (teacher.weights)" in line
    assert not (run / "teacher.safetensors").exists()
    debug = subprocess.run([*cmd, "--debug"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert debug.returncode == 1 and "Traceback" in debug.stderr  # --debug keeps it


# ---- Inpainter over shapes, dtypes and values (hypothesis) ---------------------------------------------
class _Pixelwise(torch.nn.Module):
    """tanh(w_c x + b_c m): a network whose output at a pixel depends on that pixel only (padding cannot change it)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([0.5, -0.7, 0.9]).view(1, 3, 1, 1))
        self.b = torch.nn.Parameter(torch.tensor([0.3, -0.2, 0.6]).view(1, 3, 1, 1))

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.tanh(image * self.w + mask * self.b)


_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@st.composite
def _inpainting_case(draw):
    b, h, w = draw(st.integers(1, 3)), draw(st.integers(1, 19)), draw(st.integers(1, 19))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    image = (torch.rand(b, 3, h, w, generator=g, dtype=torch.float64) * 2 - 1).to(draw(st.sampled_from(_DTYPES)))
    mask_batch = draw(st.sampled_from([1, b]))  # one mask for all, or one per image
    mask = (torch.rand(mask_batch, 1, h, w, generator=g) < draw(st.floats(0.0, 0.45))).float()
    return image, mask, draw(st.sampled_from([1, 4, 8])), draw(st.sampled_from([torch.float32, torch.float64]))


@settings(PROPERTY, max_examples=80)
@given(case=_inpainting_case())
def test_inpainter_keeps_known_pixels_and_fills_holes_from_the_model_in_its_dtype(case):
    image, mask, stride, model_dtype = case
    model = _Pixelwise().to(model_dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a drawn mask may be mostly hole
        out = Inpainter(model, stride=stride)(image, mask)
    assert out.shape == image.shape and out.dtype == image.dtype
    # the reference: the model once on the unpadded masked image in its own dtype, composited in the image's
    m = mask.expand(image.shape[0], -1, -1, -1)
    with torch.no_grad():
        pred = model(masked(image, m.to(image.dtype)).to(model_dtype), m.to(model_dtype))
    expected = torch.where(m.bool(), pred.clamp(-1, 1).to(image.dtype), image)
    assert torch.equal(out, expected)
    assert torch.equal(out[~m.bool().expand_as(out)], image[~m.bool().expand_as(image)])  # known pixels bit for bit


@settings(PROPERTY, max_examples=60)
@given(case=_inpainting_case(), bad=st.sampled_from([float("nan"), float("inf"), -float("inf")]),
       where=st.tuples(st.integers(0, 2), st.integers(0, 2), st.integers(0, 18), st.integers(0, 18)), in_mask=st.booleans())
def test_inpainter_refuses_any_non_finite_value_in_the_image_or_mask(case, bad, where, in_mask):
    image, mask, stride, _ = case
    target = mask if in_mask else image
    index = tuple(min(i, s - 1) for i, s in zip(where, target.shape))
    target[index] = bad
    with pytest.raises(ValueError, match=r"(image|mask) has 1 non-finite value"):
        Inpainter(_Pixelwise(), stride=stride)(image, mask)


@settings(PROPERTY, max_examples=60)
@given(case=_inpainting_case(), scale=st.floats(1.02, 255.0))
def test_inpainter_refuses_images_outside_minus_one_one_naming_the_mapping(case, scale):
    image, mask, stride, _ = case
    image = image.double() * scale
    image[0, 0, 0, 0] = scale  # at least one value outside [-1.01, 1.01]
    with pytest.raises(ValueError, match=r"image values must lie in \[-1, 1\].*x / 127.5 - 1"):
        Inpainter(_Pixelwise(), stride=stride)(image, mask)

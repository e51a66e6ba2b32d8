"""Mask folders (polarity, nearest-resize ratios, buckets), generators and deterministic evaluation masks."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from kdinpaint.data import EvalMasks, FreeFormMasks, MaskFolder, MixedMasks, RectangleMasks, rng_for
from kdinpaint.data.training import mask_source
from kdinpaint.evaluation.metrics import TABLE1_BUCKETS


def _block_masks(root, ratios, *, white_hole=True, size=64, seed=0):
    """Masks made of 2×2 blocks (so a nearest 2× downsample is exact) with known hole ratios."""
    root.mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    for k, r in enumerate(ratios):
        cells = (size // 2) ** 2
        hole = np.zeros(cells, bool)
        hole[rng.permutation(cells)[: round(r * cells)]] = True
        hole = np.kron(hole.reshape(size // 2, size // 2), np.ones((2, 2), bool))
        white = hole if white_hole else ~hole
        Image.fromarray(white.astype(np.uint8) * 255).save(root / f"{k:03d}.png")


def test_polarity_autodetect_and_explicit(tmp_path):
    ratios = [0.05, 0.15, 0.25, 0.35, 0.45, 0.55]
    _block_masks(tmp_path / "test", ratios, white_hole=True)
    _block_masks(tmp_path / "train", ratios, white_hole=False)
    white = MaskFolder(tmp_path / "test", size=32)
    black = MaskFolder(tmp_path / "train", size=32)
    assert (white.hole_colour, black.hole_colour) == ("white", "black")
    for i, r in enumerate(ratios):
        assert white[i].mean().item() == pytest.approx(r, abs=1e-3)
        assert torch.equal(white[i], black[i])
    assert torch.equal(MaskFolder(tmp_path / "test", size=32, hole="black")[0], 1 - white[0])
    _block_masks(tmp_path / "mixed", [0.45, 0.5, 0.55])
    with pytest.raises(ValueError, match="hole='white'"):
        MaskFolder(tmp_path / "mixed")
    with pytest.raises(ValueError, match="hole must be"):
        MaskFolder(tmp_path / "test", hole="1")


def test_ratio_buckets_counted_after_nearest_resize(tmp_path):
    ratios = [0.12, 0.18, 0.22, 0.25, 0.31, 0.44, 0.47, 0.58, 0.0, 1.0]
    _block_masks(tmp_path / "m", ratios, size=128)
    cache = tmp_path / "ratios.json"
    folder = MaskFolder(tmp_path / "m", size=64, hole="white", ratio=(0.2, 0.5), cache=cache)
    assert sorted(np.round(folder.ratios, 3).tolist()) == [0.22, 0.25, 0.31, 0.44, 0.47]
    assert len(folder.dropped) == 2  # the empty and the full mask
    again = MaskFolder(tmp_path / "m", size=64, hole="white", ratio=(0.4, 0.5), cache=cache)
    assert len(again) == 2 and cache.is_file()
    allm = MaskFolder(tmp_path / "m", size=64, hole="white")
    counts = allm.bucket_counts([(0.1, 0.2), (0.2, 0.3), (0.3, 0.4), (0.4, 0.5)])
    assert counts == {"0.1-0.2": 2, "0.2-0.3": 2, "0.3-0.4": 1, "0.4-0.5": 2}
    with pytest.raises(ValueError, match="no mask has a hole ratio"):
        MaskFolder(tmp_path / "m", size=64, hole="white", ratio=(0.7, 0.8))
    with pytest.raises(ValueError, match="ratio must be"):
        MaskFolder(tmp_path / "m", ratio=(0.5, 0.4))


def test_bilinear_then_threshold_inflates_but_nearest_does_not(tmp_path):
    # Two-pixel-wide strokes at 128: bilinear downsampling then "> 0" fattens them; nearest keeps the ratio.
    hole = np.zeros((128, 128), bool)
    for k in (0, 1):
        hole[k::8, :] = True
        hole[:, k::8] = True
    Image.fromarray(hole.astype(np.uint8) * 255).save(tmp_path / "grid.png")
    nearest = MaskFolder(tmp_path, size=64, hole="white")[0].mean().item()
    bilinear = np.asarray(Image.fromarray(hole.astype(np.uint8) * 255).resize((64, 64), Image.BILINEAR)) > 0
    assert nearest == pytest.approx(hole.mean(), abs=0.01)
    assert bilinear.mean() > hole.mean() + 0.1


def test_folder_sampling_skips_empty_masks(tmp_path):
    _block_masks(tmp_path / "m", [0.0, 0.3, 0.0])
    folder = MaskFolder(tmp_path / "m", size=32, hole="white")
    for s in range(5):
        assert folder.sample(np.random.default_rng(s), (32, 32)).mean() == pytest.approx(0.3, abs=0.01)
    _block_masks(tmp_path / "e", [0.0, 0.0])  # all black: refused when the folder is opened
    with pytest.raises(ValueError, match=r"is empty \(no hole pixel\).*not masks with holes"):
        MaskFolder(tmp_path / "e", size=32, hole="white")
    _block_masks(tmp_path / "ef", [0.0, 1.0])  # one empty, one full: refused when a mask is drawn
    with pytest.raises(ValueError, match="empty, full or unreadable"):
        MaskFolder(tmp_path / "ef", size=32, hole="white").sample(np.random.default_rng(0), (8, 8))


def test_rectangle_hand_computed():
    m = RectangleMasks(side=(0.5, 0.5), count=(1, 2)).sample(np.random.default_rng(0), (8, 8))
    rows, cols = np.nonzero(m)
    assert m.sum() == 16 and np.ptp(rows) == 3 and np.ptp(cols) == 3
    margin = RectangleMasks(side=(0.25, 0.25), margin=0.25)
    for s in range(10):
        m = margin.sample(np.random.default_rng(s), (16, 16))
        assert m.sum() == 16 and not m[:4].any() and not m[12:].any() and not m[:, :4].any()
    with pytest.raises(ValueError, match="side must be"):
        RectangleMasks(side=(0.5, 1.5))


@pytest.mark.parametrize("bucket", [(0.1, 0.2), (0.4, 0.5)])
def test_ratio_buckets_are_honoured(bucket):
    for source in (FreeFormMasks(ratio=bucket), RectangleMasks(side=(0.1, 0.3), count=(1, 2), ratio=bucket)):
        ratios = [source.sample(np.random.default_rng(s), (64, 64)).mean() for s in range(15)]
        assert all(bucket[0] <= r < bucket[1] for r in ratios)
    with pytest.raises(RuntimeError, match="found no mask"):
        RectangleMasks(side=(0.9, 0.95), ratio=(0.1, 0.2), max_tries=3).sample(np.random.default_rng(0), (32, 32))


def test_mixed_masks_spread_training_holes_evenly_over_the_table1_buckets():
    mixed = mask_source("freeform", 64, "auto", buckets=TABLE1_BUCKETS)  # masks.train_ratio: table1
    ratios = [mixed.sample(np.random.default_rng(s), (64, 64)).mean() for s in range(200)]
    counts = [sum(lo <= r < hi for r in ratios) for lo, hi in TABLE1_BUCKETS]
    assert sum(counts) == 200  # every mask lies in one of the buckets
    assert min(counts) >= 30  # 50 expected in each (binomial sd 6.1); plain strokes put 8 % of holes above 30 %
    plain = [FreeFormMasks().sample(np.random.default_rng(s), (64, 64)).mean() for s in range(200)]
    assert sum(r >= 0.3 for r in plain) < 40 < counts[2] + counts[3]
    # The source is drawn first with the same generator, then its mask: a hand-made replay gives the same array.
    rng = np.random.default_rng(5)
    replay = FreeFormMasks(ratio=TABLE1_BUCKETS[int(rng.integers(4))]).sample(rng, (64, 64))
    assert np.array_equal(mixed.sample(np.random.default_rng(5), (64, 64)), replay)
    with pytest.raises(ValueError, match="at least one mask source"):
        MixedMasks([])
    with pytest.raises(TypeError, match="sample"):
        MixedMasks([FreeFormMasks(), "freeform"])
    with pytest.raises(ValueError, match="not both"):
        mask_source("freeform", 64, "auto", (0.1, 0.2), buckets=TABLE1_BUCKETS)


def test_free_form_strokes_look_like_deepfill():
    ff = FreeFormMasks()
    masks = [ff.sample(np.random.default_rng(s), (256, 256)) for s in range(30)]
    ratios = np.array([m.mean() for m in masks])
    assert 0.05 < ratios.mean() < 0.35 and ratios.min() > 0  # 1-3 thick strokes
    assert torch.equal(torch.from_numpy(masks[3]), torch.from_numpy(ff.sample(np.random.default_rng(3), (256, 256))))
    boxed = FreeFormMasks(box=True).sample(np.random.default_rng(0), (256, 256))
    assert boxed.mean() > 0.15  # at least the ~96-128 px box


SNIPPET = (
    "from kdinpaint.data import EvalMasks, FreeFormMasks, RectangleMasks;"
    "print(EvalMasks(FreeFormMasks(ratio=(0.2, 0.3)), 6, size=48, seed=7).fingerprint(),"
    "EvalMasks(RectangleMasks(), 6, size=48, seed=7).fingerprint())"
)


@pytest.mark.slow  # starts a second interpreter
def test_eval_masks_deterministic_across_runs_and_order():
    ev = EvalMasks(FreeFormMasks(ratio=(0.2, 0.3)), 6, size=48, seed=7)
    forward = [ev[i] for i in range(6)]
    backward = [ev[i] for i in reversed(range(6))][::-1]
    assert all(torch.equal(a, b) for a, b in zip(forward, backward))
    other = subprocess.run([sys.executable, "-c", SNIPPET], capture_output=True, text=True, check=True).stdout.split()
    assert other == [ev.fingerprint(), EvalMasks(RectangleMasks(), 6, size=48, seed=7).fingerprint()]
    assert EvalMasks(FreeFormMasks(ratio=(0.2, 0.3)), 6, size=48, seed=8).fingerprint() != ev.fingerprint()
    assert not torch.equal(forward[0], forward[1])
    with pytest.raises(IndexError):
        ev[6]
    with pytest.raises(ValueError, match="non-negative"):
        rng_for(-1, 0)
    with pytest.raises(TypeError, match="sample"):
        EvalMasks(object(), 3)


def test_check_mask_refuses_bad_values_eagerly_and_does_not_break_a_compiled_graph():
    import torch._dynamo

    from kdinpaint.masking import check_mask

    image = torch.zeros(1, 3, 4, 4)
    with pytest.raises(ValueError, match="divide it by 255"):
        check_mask(torch.full((1, 1, 4, 4), 255.0), image)

    def composite_known(mask, x):
        return x * (1 - check_mask(mask, x))

    explained = torch._dynamo.explain(composite_known)(torch.zeros(1, 1, 4, 4), image)
    assert explained.graph_break_count == 0


def _square_mask(path, side, size=16):
    """A white square hole of ``side`` pixels in the top-left corner of a black ``size`` x ``size`` mask."""
    hole = np.zeros((size, size), bool)
    hole[:side, :side] = True
    Image.fromarray(hole.astype(np.uint8) * 255).save(path)


def test_ratio_cache_measures_a_rewritten_mask_file_again(tmp_path):
    """The cache keeps each ratio with its file's mtime and size: a mask rewritten with another hole is measured
    again, not bucketed by the ratio of the file it replaced."""
    import json

    root, cache = tmp_path / "m", tmp_path / "ratios.json"
    root.mkdir()
    for k, side in enumerate([4, 6, 8]):  # hole ratios 16/256, 36/256, 64/256
        _square_mask(root / f"{k}.png", side)
    folder = MaskFolder(root, size=16, hole="white", ratio=(0.0, 0.2), cache=cache)
    assert [p.rsplit("/", 1)[1] for p in folder.paths] == ["0.png", "1.png"]
    assert folder.ratios.tolist() == [16 / 256, 36 / 256]
    _square_mask(root / "1.png", 12)  # 144/256 = 0.5625: out of the bucket now
    folder = MaskFolder(root, size=16, hole="white", ratio=(0.0, 0.2), cache=cache)
    assert [p.rsplit("/", 1)[1] for p in folder.paths] == ["0.png"]
    table = json.loads(cache.read_text())["16x16:white:0.5"]
    stat = (root / "1.png").stat()
    assert table[str(root / "1.png")] == [144 / 256, stat.st_mtime_ns, stat.st_size]
    # an unchanged file is read from the cache: a ratio planted there (with the file's true stamp) is what is used
    planted = {**table, str(root / "2.png"): [0.1, *table[str(root / "2.png")][1:]]}
    cache.write_text(json.dumps({"16x16:white:0.5": planted}))
    folder = MaskFolder(root, size=16, hole="white", ratio=(0.0, 0.2), cache=cache)
    assert folder.ratios.tolist() == [16 / 256, 0.1]


@pytest.mark.parametrize("content", ['[0.1, 0.2]', '{"16x16:white:0.5": [0.1]}', '"ratios"'])
def test_ratio_cache_of_another_shape_is_refused_naming_the_file_and_the_fix(tmp_path, content):
    root, cache = tmp_path / "m", tmp_path / "ratios.json"
    root.mkdir()
    _square_mask(root / "0.png", 4)
    cache.write_text(content)
    with pytest.raises(ValueError, match=r"mask ratio cache '.*ratios.json' is not shaped as kdinpaint writes it .*delete it"):
        MaskFolder(root, size=16, hole="white", ratio=(0.0, 0.5), cache=cache)
    assert cache.read_text() == content  # nothing overwritten


def test_ratio_cache_entries_of_another_shape_are_measured_again_with_a_warning(tmp_path, caplog):
    import json

    root, cache = tmp_path / "m", tmp_path / "ratios.json"
    root.mkdir()
    _square_mask(root / "0.png", 4)
    _square_mask(root / "1.png", 8)
    old = {"16x16:white:0.5": {str(root / "0.png"): 0.9, str(root / "1.png"): "x"}, "32x32:white:0.5": {"a.png": 0.3}}
    cache.write_text(json.dumps(old))  # a cache of the earlier format (bare ratios) and an edited entry
    with caplog.at_level("WARNING"):
        folder = MaskFolder(root, size=16, hole="white", ratio=(0.0, 0.5), cache=cache)
    assert folder.ratios.tolist() == [16 / 256, 64 / 256]
    assert "2 entries are not [hole ratio, mtime_ns, size]" in caplog.text and "ratios.json" in caplog.text
    stored = json.loads(cache.read_text())
    assert stored["32x32:white:0.5"] == {"a.png": 0.3}  # another setting's entries are kept
    assert [v[0] for v in stored["16x16:white:0.5"].values()] == [16 / 256, 64 / 256]

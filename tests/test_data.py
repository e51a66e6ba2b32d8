"""Image folders, file lists, pixel formats, unreadable files, bundled samples and the paired dataset."""

import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from kdinpaint.data import (FreeFormMasks, ImageFolder, InpaintingDataset, SampleCrops, TrainingStream, list_images,
                            sample_images)
from kdinpaint.data.samples import sample_photo


def _png16(path, arr: np.ndarray) -> None:
    """Write a 16-bit PNG (gray or RGB) by hand: PIL cannot write 16-bit RGB."""
    h, w = arr.shape[:2]
    colour = 2 if arr.ndim == 3 else 0
    raw = b"".join(b"\x00" + arr[i].astype(">u2").tobytes() for i in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 16, colour, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


@pytest.fixture
def folder(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a_rgb.png")
    sub = tmp_path / "sub"
    sub.mkdir()
    Image.fromarray(rgb[..., 0]).save(sub / "b_gray.png")
    rgba = np.concatenate([rgb, np.full((20, 30, 1), 7, np.uint8)], -1)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "c_rgba.png")
    _png16(tmp_path / "d_gray16.png", (np.linspace(0, 65535, 600).reshape(20, 30)).astype(np.uint16))
    (tmp_path / "e_broken.jpg").write_bytes(b"not a jpeg at all")
    (tmp_path / "notes.txt").write_text("not an image")
    return tmp_path, rgb


def test_folder_formats_and_unreadable(folder, caplog):
    root, rgb = folder
    ds = ImageFolder(root, size=(20, 30), crop="resize")
    assert [p.split("/")[-1] for p in ds.paths] == ["a_rgb.png", "c_rgba.png", "d_gray16.png", "e_broken.jpg", "b_gray.png"]
    expected = torch.from_numpy(rgb).permute(2, 0, 1).float() / 127.5 - 1
    torch.testing.assert_close(ds[0]["image"], expected)
    torch.testing.assert_close(ds[1]["image"], expected)  # alpha dropped
    gray = ds[4]["image"]
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[0], expected[0])
    g16 = ds[2]["image"]  # 16-bit gray keeps its full ramp (PIL's own RGB conversion would clip to white)
    ramp = torch.from_numpy(np.linspace(0, 65535, 600).reshape(20, 30).astype(np.uint16).astype(np.float32) / 65535)
    torch.testing.assert_close(g16[1], ramp * 2 - 1, atol=1e-6, rtol=0)
    item = ds[3]  # unreadable: replaced by the next file, counted and reported
    assert item["skipped"] == 1 and item["path"].endswith("b_gray.png")
    assert ds.skipped[0].endswith("e_broken.jpg") and "e_broken.jpg" in caplog.text
    fresh = ImageFolder(root, size=8)
    assert [p.split("/")[-1] for p in fresh.scan()] == ["e_broken.jpg"] and len(fresh) == 4


def test_16bit_rgb_png(tmp_path):
    arr = np.random.default_rng(1).integers(0, 65536, (6, 7, 3)).astype(np.uint16)
    _png16(tmp_path / "rgb16.png", arr)
    img = ImageFolder(tmp_path, size=(6, 7), crop="resize")[0]["image"]
    ref = torch.from_numpy((arr >> 8).astype(np.float32)).permute(2, 0, 1) / 127.5 - 1
    torch.testing.assert_close(img, ref)


def test_crops(tmp_path):
    arr = np.random.default_rng(2).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "x.png")
    centre = ImageFolder(tmp_path, size=40, crop="center")[0]["image"]
    torch.testing.assert_close(centre, torch.from_numpy(arr[:, 10:50]).permute(2, 0, 1).float() / 127.5 - 1)
    torch.manual_seed(0)
    rand = ImageFolder(tmp_path, size=(16, 16), crop="random")
    windows = {tuple(rand[0]["image"][0, 0, :2].tolist()) for _ in range(6)}
    assert len(windows) > 1  # random positions at native resolution
    img = rand[0]["image"]
    ref = torch.from_numpy(arr).permute(2, 0, 1).float() / 127.5 - 1
    hits = [(i, j) for i in range(25) for j in range(45) if torch.equal(ref[:, i : i + 16, j : j + 16], img)]
    assert len(hits) == 1
    assert ImageFolder(tmp_path, size=(50, 90), crop="random")[0]["image"].shape == (3, 50, 90)  # upscaled
    with pytest.raises(ValueError, match="crop must be"):
        ImageFolder(tmp_path, crop="middle")


def test_bad_sources(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="it is empty"):
        ImageFolder(empty)
    (empty / "readme.md").write_text("x")
    with pytest.raises(ValueError, match="no image files.*readme.md"):
        ImageFolder(empty)
    Image.new("RGB", (4, 4)).save(tmp_path / "ok.png")
    flist = tmp_path / "train.flist"
    flist.write_text(f"{tmp_path / 'ok.png'}\n{tmp_path / 'gone1.png'}\nok.png\ngone2.jpg\n")
    with pytest.raises(ValueError, match=r"2 of 4 files .*gone1\.png.*gone2\.jpg"):
        ImageFolder(flist)
    flist.write_text("ok.png\nreadme.md\n")
    (tmp_path / "readme.md").write_text("x")
    with pytest.raises(ValueError, match="not image files.*readme.md"):
        ImageFolder(flist)
    flist.write_text("ok.png\n")
    assert len(list_images(flist)) == 1  # relative to the list's folder
    with pytest.raises(FileNotFoundError):
        ImageFolder(tmp_path / "nowhere")
    only_broken = tmp_path / "broken"
    only_broken.mkdir()
    (only_broken / "x.png").write_bytes(b"junk")
    with pytest.raises(ValueError, match="none of the 1 files"):
        ImageFolder(only_broken)[0]


def test_sample_images_are_photos_and_cached():
    x = sample_images(64, 12)
    assert x.shape == (12, 3, 64, 64) and x.dtype == torch.float32
    assert float(x.min()) >= -1 and float(x.max()) <= 1
    # natural colour photographs: the channels differ, and neighbouring pixels correlate strongly
    assert float((x[:, 0] - x[:, 1]).abs().mean()) > 0.05
    a, b = x[..., :, :-1].flatten(), x[..., :, 1:].flatten()
    assert float(torch.corrcoef(torch.stack([a, b]))[0, 1]) > 0.8
    assert len({tuple(v.flatten()[:64].tolist()) for v in x}) == 12  # all crops differ
    y = sample_images(64, 12)
    assert torch.equal(x, y)
    y.zero_()
    assert torch.equal(sample_images(64, 12), x)  # cached copy unaffected by the caller
    with pytest.raises(ValueError, match="unknown sample photo"):
        sample_images(64, 2, names=["lena"])


def test_sample_images_cycle_eight_scales():
    """Pass r crops the photo with its shorter side at size (1 + 0.35 (r mod 8)), bicubic, at a new place from
    pass 8 on (found by search in a hand-resized copy), never enlarged past 3.45 times the whole photo."""
    size, photo = 32, sample_photo("chelsea")  # (300, 451, 3)
    crops = ((sample_images(size, 12, names=["chelsea"]) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()

    def windows(r):  # every size x size window of the photo resized for pass r
        short = size * (1 + 0.35 * (r % 8))
        h, w = photo.shape[:2]
        nh, nw = round(h * short / min(h, w)), round(w * short / min(h, w))
        big = np.asarray(Image.fromarray(photo).resize((nw, nh), Image.BICUBIC))
        return {(t, l): big[t:t + size, l:l + size] for t in range(nh - size + 1) for l in range(nw - size + 1)}

    for r in (1, 2, 9, 10):
        crop = crops[r][:, ::-1] if r % 2 == 1 else crops[r]  # odd passes are mirrored
        found = [tl for tl, win in windows(r).items() if np.array_equal(win, crop)]
        assert found, f"pass {r} is not a crop of the photo at scale {1 + 0.35 * (r % 8):.2f}"
        if r >= 8:
            assert not np.array_equal(crops[r], crops[r - 8])  # the same scale at another place


def test_dataset_with_dataloader_workers():
    images = sample_images(32, 6, names=["astronaut", "coffee", "chelsea"])
    ds = InpaintingDataset(images, FreeFormMasks(), seed=3)
    loader = DataLoader(ds, batch_size=3, num_workers=2)
    batches = list(loader)
    assert batches[0]["image"].shape == (3, 3, 32, 32) and batches[0]["mask"].shape == (3, 1, 32, 32)
    masks = torch.cat([b["mask"] for b in batches])
    assert set(masks.unique().tolist()) <= {0.0, 1.0} and bool((masks.flatten(1).sum(1) > 0).all())
    # per-index masks: identical without workers and in another order
    again = torch.stack([ds[i]["mask"] for i in reversed(range(6))]).flip(0)
    assert torch.equal(again, masks)
    torch.testing.assert_close(torch.cat([b["image"] for b in batches]), images)
    train = InpaintingDataset(images, FreeFormMasks())
    assert not torch.equal(train[0]["mask"], train[0]["mask"])  # fresh masks each call


def test_dataset_bad_inputs(tmp_path):
    images = sample_images(32, 2, names=["astronaut"])
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        InpaintingDataset(images[:, :1], FreeFormMasks())
    with pytest.raises(TypeError, match="mask source"):
        InpaintingDataset(images, 3)
    with pytest.raises(ValueError, match="resize masks"):
        InpaintingDataset(images, [torch.zeros(1, 16, 16)])[0]


def _scaled_copies(photo: np.ndarray, size: int, levels: int) -> list[np.ndarray]:
    """The photo with its short side at ``size`` (whole photo) ... native, ``levels`` geometric steps, by PIL."""
    h, w = photo.shape[:2]
    out = []
    for j in range(levels):
        scale = (size / min(h, w)) ** (1 - j / (levels - 1))
        shape = (max(size, round(w * scale)), max(size, round(h * scale)))  # PIL: (width, height)
        out.append(np.asarray(Image.fromarray(photo).resize(shape, Image.BICUBIC)))
    return out


def _find(crop: np.ndarray, image: np.ndarray) -> list[tuple[int, int]]:
    """Every ``(top, left)`` where ``crop`` (uint8 ``(S, S, 3)``) sits in ``image`` exactly, unflipped."""
    S, (H, W) = crop.shape[0], image.shape[:2]
    pattern, data, found, start = crop[0].tobytes(), image.tobytes(), [], 0
    while (i := data.find(pattern, start)) != -1:  # candidates from the first row, then the whole crop
        start = i + 1
        top, left = divmod(i // 3, W)
        window = image[top : top + S, left : left + S]
        if i % 3 == 0 and window.shape == crop.shape and np.array_equal(window, crop):
            found.append((top, left))
    return found


def _u8(item: torch.Tensor) -> np.ndarray:
    return ((item + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()


def test_sample_crops_are_deterministic_photo_crops_at_every_scale():
    names, size, count = ("astronaut", "coffee"), 32, 200
    crops = SampleCrops(size, count, names=names, seed=3)
    items = [crops[k] for k in range(count)]
    assert len(crops) == count
    assert all(x.shape == (3, size, size) and x.dtype == torch.float32 for x in items)
    assert min(float(x.min()) for x in items) >= -1 and max(float(x.max()) for x in items) <= 1
    again = SampleCrops(size, count, names=names, seed=3)
    assert all(torch.equal(again[k], items[k]) for k in reversed(range(count)))  # a function of (seed, k) only
    other = SampleCrops(size, count, names=names, seed=4)
    assert sum(torch.equal(other[k], items[k]) for k in range(count)) < count // 20
    # each crop is an exact, unflipped window of one of the photos resized (independently, by PIL) to one of
    # the documented scales: the whole photo at size ... native; over 200 crops every scale and photo occurs
    copies = {n: _scaled_copies(sample_photo(n), size, 6) for n in names}
    seen, places = set(), set()
    for x in items:
        hits = [(n, j, pos) for n in names for j, image in enumerate(copies[n]) for pos in _find(_u8(x), image)]
        assert hits, "a crop that is no window of any scaled copy"
        seen |= {(n, j) for n, j, _ in hits}
        places |= {pos for _, _, pos in hits}
    assert seen == {(n, j) for n in names for j in range(6)}
    assert len(places) > count // 2  # random positions, not a few fixed ones
    with pytest.raises(IndexError, match="out of range"):
        crops[count]


def test_sample_crops_of_a_photo_smaller_than_the_crop_keep_its_aspect():
    # chelsea is 300 × 451: a 320 crop comes from the photo up-scaled to 320 × 481, not stretched to 320 × 451
    photo = sample_photo("chelsea")
    upscaled = np.asarray(Image.fromarray(photo).resize((481, 320), Image.BICUBIC))
    crops = SampleCrops(320, 6, names=["chelsea"])
    lefts = set()
    for k in range(6):
        found = _find(_u8(crops[k]), upscaled)
        assert [top for top, _ in found] == [0]
        lefts.add(found[0][1])
    assert len(lefts) > 1


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(size=4, count=2), "size must be an int >= 8, got 4"),
        (dict(size=32.0, count=2), "size must be an int"),
        (dict(size=32, count=0), "count must be a positive int, got 0"),
        (dict(size=32, count=2, names=["lena"]), r"unknown sample photo\(s\) \['lena'\]; known: \['astronaut'"),
        (dict(size=32, count=2, names=[]), "unknown sample photo"),
        (dict(size=32, count=2, names=["astronaut"], levels=0), "levels must be a positive int, got 0"),
        (dict(size=32, count=2, names=["astronaut"], seed=-1), "seed must be an int >= 0, got -1"),
    ],
)
def test_sample_crops_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SampleCrops(**kwargs)


def _square_symmetries_and_channel_orders(image):
    """All 48 images the full augmentation can give, keyed by (flipped, quarter turns, channel order)."""
    import itertools

    out = {}
    for flipped in (False, True):
        base = image.flip(-1) if flipped else image
        for k in range(4):
            turned = torch.rot90(base, k, (-2, -1))
            for order in itertools.permutations(range(3)):
                out[(flipped, k, order)] = turned[list(order)]
    return out


def test_training_stream_augmentations_are_square_symmetries_and_channel_orders():
    image = torch.arange(3 * 8 * 8, dtype=torch.float32).reshape(1, 3, 8, 8) / 96 - 1  # every pixel distinct
    refs = _square_symmetries_and_channel_orders(image[0])
    full = TrainingStream(image, FreeFormMasks(), 96, augment=["flip", "rot90", "channels"])
    seen = set()
    for k in range(96):
        out = full[k]["image"]
        match = [key for key, ref in refs.items() if torch.equal(out, ref)]
        assert len(match) == 1, f"sample {k} is not one symmetry and channel order of the image"
        seen.add(match[0])
    assert len(seen) >= 36  # 48 possible; 96 uniform draws leave about 6 unseen
    assert {key[1] for key in seen} == {0, 1, 2, 3} and {key[0] for key in seen} == {False, True}
    # Default: horizontal flips only, the stream as it always was; []: the images untouched.
    default = [TrainingStream(image, FreeFormMasks(), 16)[k]["image"] for k in range(16)]
    assert all(torch.equal(x, image[0]) or torch.equal(x, image[0].flip(-1)) for x in default)
    assert any(torch.equal(x, image[0]) for x in default) and any(torch.equal(x, image[0].flip(-1)) for x in default)
    assert all(torch.equal(TrainingStream(image, FreeFormMasks(), 4, augment=[])[k]["image"], image[0]) for k in range(4))
    # A sample is a pure function of (seed, k), whatever was drawn before.
    assert torch.equal(full[40]["image"], TrainingStream(image, FreeFormMasks(), 96, augment=["flip", "rot90", "channels"])[40]["image"])


def test_training_stream_bad_augmentations():
    image = torch.zeros(1, 3, 8, 12)
    with pytest.raises(ValueError, match=r"at most once, got \['flip', 'rotate'\]"):
        TrainingStream(image, FreeFormMasks(), 4, augment=["flip", "rotate"])
    with pytest.raises(TypeError, match="list of names"):
        TrainingStream(image, FreeFormMasks(), 4, augment="flip")
    with pytest.raises(ValueError, match="rot90 needs square images, got \\(8, 12\\)"):
        TrainingStream(image, FreeFormMasks(), 4, augment=["rot90"])[0]


@pytest.mark.parametrize(("size", "hint"), [("32", "write size=32"), (32.0, ""), (True, ""), ((32, "32"), ""),
                                             ((32, 0), ""), ([32, 32, 3], ""), (b"32", "")])
def test_image_folder_refuses_a_size_that_is_not_ints_naming_it(tmp_path, size, hint):
    """A string is a sequence: size="32" used to resize every image to 3 x 2 pixels."""
    Image.new("RGB", (40, 30), (10, 20, 30)).save(tmp_path / "a.png")
    with pytest.raises(ValueError, match=r"size must be a positive int or \(height, width\)") as err:
        ImageFolder(tmp_path, size=size)
    assert repr(size) in str(err.value) and hint in str(err.value)


def test_image_folder_size_of_numpy_and_plain_ints(tmp_path):
    Image.new("RGB", (40, 30), (10, 20, 30)).save(tmp_path / "a.png")
    assert ImageFolder(tmp_path, size=np.int64(8))[0]["image"].shape == (3, 8, 8)
    assert ImageFolder(tmp_path, size=(8, np.int32(12)), crop="resize")[0]["image"].shape == (3, 8, 12)

"""report.html (kdinpaint.train.report_html) on synthetic held-out crops whose gains over the floor are known: the
bucket sections show the largest gains first and the largest losses last, the embedded PNGs are the given images,
the tables hold the summaries, the control column appears when given."""

from __future__ import annotations

import base64
import io
import math
import re

import numpy as np
import pytest
import torch
from PIL import Image

from kdinpaint.evaluation import metrics
from kdinpaint.train.report_html import gains, write_report_html

SIZE = 32


def _data(seed: int = 0):
    """9 crops: two per Table 1 bucket and one hole of 5 %; network and floor fills of known noise levels."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(9, 3, SIZE, SIZE, generator=g) * 1.6 - 0.8
    masks = torch.zeros(9, 1, SIZE, SIZE)
    rows_of_hole = [5, 6, 8, 9, 11, 12, 14, 15, 2]  # x 32 columns / 1024 pixels: 15.6, 18.8, 25, 28.1, ... %; 6.25 %
    for i, r in enumerate(rows_of_hole):
        masks[i, :, :r, :] = 1
    net_noise = torch.tensor([0.05, 0.30, 0.10, 0.02, 0.40, 0.20, 0.08, 0.15, 0.25])
    floor_noise = torch.tensor([0.20, 0.10, 0.10, 0.30, 0.10, 0.05, 0.20, 0.15, 0.05])

    def fill(levels):
        noise = torch.randn(images.shape, generator=g) * levels.view(-1, 1, 1, 1)
        return torch.where(masks.bool(), (images + noise).clamp(-1, 1), images)

    outputs, floor_outputs = fill(net_noise), fill(floor_noise)
    names = [f"eval_{i}" for i in range(9)]
    rows = metrics.evaluate(outputs, images, masks, names=names)
    floor_rows = metrics.evaluate(floor_outputs, images, masks, names=names)
    return images, masks, outputs, floor_outputs, rows, floor_rows


def _psnr_u8(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR on 8-bit values, by hand with numpy."""
    ua = np.round((a.numpy().astype(np.float64) + 1) * 127.5).clip(0, 255)
    ub = np.round((b.numpy().astype(np.float64) + 1) * 127.5).clip(0, 255)
    return 10 * math.log10(255**2 / ((ua - ub) ** 2).mean())


def _sections(text: str) -> dict[str, tuple[list[str], list[tuple[str, str]]]]:
    """``{h3 title: (row notes as plain text, [(img alt, img src)])}`` of the crop sections."""
    out = {}
    for part in text.split("<h3>")[1:]:
        title = part.split("</h3>")[0].split(" (")[0]
        notes = [re.sub(r"<[^>]+>", "", n) for n in re.findall(r"<div class='row-note'>(.*?)</div>", part)]
        imgs = re.findall(r"<img alt='([^']*)' src='([^']*)'>", part)
        out[title] = (notes, imgs)
    return out


def _decode(src: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))))


def test_gains_rank_each_bucket_by_the_psnr_difference_computed_by_hand():
    images, masks, outputs, floor_outputs, rows, floor_rows = _data()
    ranked = gains(rows, floor_rows)
    assert list(ranked) == ["10-20%", "20-30%", "30-40%", "40-50%", "outside 10-50%"]
    for label, entries in ranked.items():
        by_hand = [_psnr_u8(outputs[i], images[i]) - _psnr_u8(floor_outputs[i], images[i]) for i, _ in entries]
        assert [g for _, g in entries] == pytest.approx(by_hand, abs=1e-6)
        assert by_hand == sorted(by_hand, reverse=True), label
    assert sorted(i for i, _ in ranked["20-30%"]) == [2, 3]
    assert [i for i, _ in ranked["outside 10-50%"]] == [8]


def test_report_html_shows_the_tables_and_the_crops_of_each_bucket(tmp_path):
    images, masks, outputs, floor_outputs, rows, floor_rows = _data()
    path = write_report_html(tmp_path, "tiny:net", images, masks, outputs, floor_outputs, rows, floor_rows, per_bucket=3)
    assert path == tmp_path / "report.html" and not (tmp_path / "report.html.tmp").exists()
    text = path.read_text()
    assert "http" not in text.replace("<!doctype html>", "")  # self-contained: nothing loads from elsewhere
    sections = _sections(text)
    assert list(sections) == ["Holes 10-20%", "Holes 20-30%", "Holes 30-40%", "Holes 40-50%", "Holes outside 10-50%"]
    ranked = gains(rows, floor_rows)
    for section, label in zip(sections, ranked):
        entries = ranked[label]
        expect = [entries[0][0]] + ([entries[-1][0]] if len(entries) > 1 else [])  # the best, then the worst
        notes, shots = sections[section]
        assert [re.match(r"(eval_\d+):", note).group(1) for note in notes] == [f"eval_{i}" for i in expect], section
        assert notes[0].startswith(f"eval_{expect[0]}: gains most")
        if len(expect) > 1:
            assert notes[1].startswith(f"eval_{expect[1]}: {'loses most' if entries[-1][1] < 0 else 'gains least'}")
        assert len(shots) == 4 * len(expect) and [t.split()[0] for t, _ in shots[:4]] == ["input", "tiny:net", "biharmonic", "truth"]
        i = expect[0]
        u8 = lambda x: ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()  # noqa: E731
        assert np.array_equal(_decode(shots[1][1]), u8(outputs[i]))
        assert np.array_equal(_decode(shots[2][1]), u8(floor_outputs[i]))
        assert np.array_equal(_decode(shots[3][1]), u8(images[i]))
        hole = masks[i, 0].bool().numpy()
        assert (_decode(shots[0][1])[hole] == 128).all()  # the hole is grey in the input
    summary = metrics.summarize(rows)
    assert f"{summary['buckets']['all']['psnr']:.2f}" in text
    assert "tiny:net is" in text or "tiny:net vs" in text  # the verdict line


def test_report_html_shows_and_scores_the_control(tmp_path):
    images, masks, outputs, floor_outputs, rows, floor_rows = _data()
    control = torch.where(masks.bool(), torch.zeros_like(images), images)
    text = write_report_html(tmp_path, "tiny:net", images, masks, outputs, floor_outputs, rows, floor_rows,
                             control_outputs=control).read_text()
    shots = _sections(text)["Holes 10-20%"][1]
    assert [t.split()[0] for t, _ in shots[:5]] == ["input", "tiny:net", "biharmonic", "truth", "control"]
    control_rows = metrics.evaluate(control, images, masks)
    assert f"control {control_rows[0].psnr:.2f} dB" in text
    assert "tiny:net (control)" in text


def test_report_html_refuses_inputs_that_do_not_match(tmp_path):
    images, masks, outputs, floor_outputs, rows, floor_rows = _data()
    with pytest.raises(ValueError, match="outputs has shape"):
        write_report_html(tmp_path, "n", images, masks, outputs[:3], floor_outputs, rows, floor_rows)
    with pytest.raises(ValueError, match="rows for 9 images"):
        write_report_html(tmp_path, "n", images, masks, outputs, floor_outputs, rows[:3], floor_rows)
    with pytest.raises(ValueError, match="differ in images"):
        write_report_html(tmp_path, "n", images, masks, outputs, floor_outputs, rows, floor_rows[::-1])

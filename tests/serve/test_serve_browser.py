"""The brush page in a real browser: headless Chromium (Debian's ``chromium`` package) driven by Playwright.

Load the page, open a bundled photo, draw a stroke with the mouse, press Inpaint: the network's image differs from
the photo only inside the stroke (and somewhere inside it), the biharmonic fill is beside it; a bad upload shows a
message on the page. The test takes a screenshot of the page with the results, into ``$KDINPAINT_SERVE_SCREENSHOT``
when set (the README's ``examples/serve-screenshot.png`` is made so), else into the test's temporary folder. The network
is the ``tiny-unet`` adapter with random weights, or the checkpoint in ``$KDINPAINT_SERVE_CHECKPOINT``:

    KDINPAINT_SERVE_CHECKPOINT=runs/quick/student.safetensors KDINPAINT_SERVE_SCREENSHOT=examples/serve-screenshot.png \
        python -m pytest -q tests/serve/test_serve_browser.py
"""

from __future__ import annotations

import base64
import io
import os
import shutil
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed: pip install -e '.[dev]'")

from kdinpaint.inference import Inpainter  # noqa: E402
from kdinpaint.serve.app import create_app  # noqa: E402
from kdinpaint.serve.images import Limits  # noqa: E402

CHROMIUM = os.environ.get("KDINPAINT_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = pytest.mark.skipif(
    not (os.path.isfile(CHROMIUM) or shutil.which("chromium")),
    reason=f"no Chromium at {CHROMIUM}: install Debian's chromium package (apt-get install chromium); .ci/run does",
)


def _decode(url: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGBA"))


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM if os.path.isfile(CHROMIUM) else shutil.which("chromium"),
                                     args=ARGS)
        yield chromium
        chromium.close()


@pytest.mark.slow
def test_brush_a_stroke_and_inpaint_in_the_browser(browser, live, tmp_path):
    screenshot = Path(os.environ.get("KDINPAINT_SERVE_SCREENSHOT") or tmp_path / "serve-screenshot.png")
    checkpoint = os.environ.get("KDINPAINT_SERVE_CHECKPOINT")
    net = Inpainter.from_checkpoint(checkpoint) if checkpoint else Inpainter.from_adapter("tiny-unet")
    note = None if checkpoint else "tiny-unet runs with RANDOM weights: its fill is noise."
    methods = {net.name: net, "biharmonic": Inpainter.from_baseline("biharmonic")}
    url = live(create_app(methods, limits=Limits(max_side=256), note=note))
    page = browser.new_page(viewport={"width": 1000, "height": 620})
    try:
        page.goto(url + "/")
        page.wait_for_selector("body[data-ready='1']")
        page.select_option("#photo", "chelsea")
        page.wait_for_function("document.getElementById('message').textContent.startsWith('Brush over')")
        assert page.is_disabled("#inpaint")  # nothing brushed yet
        page.eval_on_selector("#brush", "e => { e.value = 40; }")  # a wider brush than the default 24 px
        box = page.locator("#mask").bounding_box()
        page.mouse.move(box["x"] + 0.30 * box["width"], box["y"] + 0.35 * box["height"])
        page.mouse.down()
        for t in np.linspace(0, 1, 12):  # a diagonal stroke across the cat's face
            page.mouse.move(box["x"] + (0.30 + 0.25 * t) * box["width"], box["y"] + (0.35 + 0.25 * t) * box["height"])
        page.mouse.up()
        page.click("#inpaint")
        page.wait_for_selector("#results img[data-method='biharmonic']", timeout=60_000)
        mask_url = page.evaluate("document.getElementById('mask').toDataURL('image/png')")
        result_url = page.get_attribute(f"#results img[data-method='{net.name}']", "src")
        floor_url = page.get_attribute("#results img[data-method='biharmonic']", "src")
        assert page.locator("#results a[download]").count() == 2  # a download link under each fill
        page.screenshot(path=str(screenshot))
    finally:
        page.close()
    Image.open(screenshot).convert("RGB").quantize(256).save(screenshot, optimize=True)  # a small PNG
    assert Image.open(screenshot).size == (1000, 620)
    with urllib.request.urlopen(url + "/api/photo/chelsea") as r:
        photo = np.asarray(Image.open(io.BytesIO(r.read())).convert("RGB"))
    brushed = _decode(mask_url)
    hole = (brushed[..., 3] > 127) & (brushed[..., :3].max(-1) > 127)  # the server's reading of the page's mask
    assert 0.01 < hole.mean() < 0.3
    for name, image in ((net.name, _decode(result_url)[..., :3]), ("biharmonic", _decode(floor_url)[..., :3])):
        assert image.shape == photo.shape, name
        changed = (image != photo).any(-1)
        assert not (changed & ~hole).any(), f"{name} changed {int((changed & ~hole).sum())} pixels outside the stroke"
        assert changed[hole].mean() > 0.5, name  # and it did fill the stroke


@pytest.mark.slow
def test_a_bad_upload_shows_a_message_on_the_page(browser, live, tmp_path):
    url = live(create_app({"biharmonic": Inpainter.from_baseline("biharmonic")}, limits=Limits(max_side=128)))
    page = browser.new_page()
    try:
        page.goto(url + "/")
        page.wait_for_selector("body[data-ready='1']")
        fake = tmp_path / "holiday.jpg"
        fake.write_bytes(b"this is not a photo")
        page.set_input_files("#file", str(fake))
        page.wait_for_function("document.getElementById('message').textContent.includes('not an image')")
        text = page.inner_text("#message")
        assert "Traceback" not in text and "choose a photo file" in text
        good = tmp_path / "red.png"
        Image.new("RGB", (300, 150), "red").save(good)
        page.set_input_files("#file", str(good))
        page.wait_for_function("document.getElementById('message').textContent.startsWith('Brush over')")
        assert page.evaluate("[document.getElementById('image').width, document.getElementById('image').height]") == [128, 64]
    finally:
        page.close()

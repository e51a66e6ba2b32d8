"""The brush page's server refuses bad uploads with a message (never a traceback) and reads nothing but the
bundled photos; good uploads come back as the RGB photo the page works on."""

from __future__ import annotations

import argparse
import base64
import io
import json
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")

from kdinpaint.serve.app import create_app  # noqa: E402
from kdinpaint.serve.command import build_methods, serve_arguments  # noqa: E402
from kdinpaint.serve.images import Limits, UploadError, decode_mask, read_upload  # noqa: E402


def _png(image: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", **kw)
    return buf.getvalue()


def _url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def _request(url: str, data: bytes | None = None, content_type: str = "application/octet-stream") -> tuple[int, dict | bytes]:
    req = urllib.request.Request(url, data=data, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            body, status, kind = r.read(), r.status, r.headers.get("content-type", "")
    except urllib.error.HTTPError as e:
        body, status, kind = e.read(), e.code, e.headers.get("content-type", "")
    return status, (json.loads(body) if "json" in kind else body)


def _fill_grey(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask.bool(), torch.zeros_like(image), image)


def _broken(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    raise RuntimeError("secret internal detail")


LIMITS = Limits(max_bytes=200_000, max_pixels=300 * 300, max_side=64)


@pytest.fixture
def server(live):
    return live(create_app({"grey": _fill_grey}, limits=LIMITS))


def test_bad_uploads_get_a_message(server):
    cases = {
        b"hello, not an image": (415, "not an image this page reads"),
        b"": (400, "empty"),
        b"\x89PNG\r\n\x1a\n" + b"\0" * 300_000: (413, "over the limit of 0.2 MiB"),
        _png(Image.new("RGB", (400, 300))): (413, "120000 = 0.1 million pixels".replace("120000", "400x300")),
        _png(Image.new("RGB", (40, 40)))[:-30]: (400, "damaged"),  # truncated: the header reads, the pixels do not
        _png(Image.new("RGB", (8, 40))): (400, "too small"),
    }
    for data, (status, words) in cases.items():
        got, body = _request(server + "/api/upload", data)
        assert got == status and words in body["error"], (data[:20], got, body)
        assert "Traceback" not in body["error"]


def test_a_header_claiming_a_huge_image_is_refused_before_decoding():
    """A 'decompression bomb': a tiny file whose header says 50000 x 50000 pixels."""
    small = _png(Image.new("L", (1, 1)))
    # rewrite the IHDR width and height (bytes 16..24) and its CRC
    import struct
    import zlib

    ihdr = b"IHDR" + struct.pack(">II", 50_000, 50_000) + small[24:29]
    bomb = small[:8] + struct.pack(">I", 13) + ihdr + struct.pack(">I", zlib.crc32(ihdr)) + small[33:]
    with pytest.raises(UploadError, match="million pixels, over the limit|not an image"):
        read_upload(bomb, LIMITS)


def test_a_good_upload_comes_back_as_rgb_shrunk_to_the_working_size(server):
    rgba = Image.new("RGBA", (200, 100), (10, 200, 30, 0))  # fully transparent: flattened on white
    status, body = _request(server + "/api/upload", _png(rgba))
    assert status == 200 and (body["width"], body["height"]) == (64, 32)
    out = Image.open(io.BytesIO(base64.b64decode(body["image"].split(",", 1)[1])))
    assert out.mode == "RGB" and np.asarray(out).min() == 255
    grey16 = Image.fromarray(np.full((40, 40), 65535 // 2, dtype=np.uint16))
    assert abs(int(np.asarray(read_upload(_png(grey16), LIMITS))[0, 0, 0]) - 127) <= 1  # 16-bit scaled, not clipped


def test_only_bundled_photos_by_name_are_served(server):
    status, body = _request(server + "/api/photo/coffee")
    assert status == 200 and Image.open(io.BytesIO(body)).size == (64, 43)
    for name in ("..%2F..%2Fetc%2Fpasswd", "%2Fetc%2Fpasswd", "coffee.png", "..", "README.md"):
        status, body = _request(server + "/api/photo/" + name)
        assert status == 404 and ("no bundled photo" in body["error"] or "Not Found" in body["error"]), name
    status, _ = _request(server + "/static/index.html")
    assert status == 404  # the page is served at / only; no folder is exposed


def test_inpaint_changes_only_the_brushed_pixels_and_refuses_bad_masks(server):
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8))
    brush = Image.new("RGBA", (64, 48), (0, 0, 0, 0))
    brush.paste((255, 40, 40, 255), (10, 10, 30, 20))
    payload = {"image": _url(_png(photo)), "mask": _url(_png(brush))}
    status, body = _request(server + "/api/inpaint", json.dumps(payload).encode(), "application/json")
    assert status == 200 and [r["name"] for r in body["results"]] == ["grey"]
    out = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["results"][0]["image"].split(",", 1)[1]))))
    hole = np.zeros((48, 64), bool)
    hole[10:20, 10:30] = True
    assert body["hole"] == pytest.approx(hole.mean())
    assert np.array_equal(out[~hole], np.asarray(photo)[~hole])
    assert (out[hole] == 128).all()  # the fill (0 in [-1, 1]) rounded to 8 bits
    bad = {
        "mask": (_url(_png(Image.new("RGBA", (64, 48)))), "mask is empty"),
        "size": (_url(_png(brush.resize((32, 24)))), "the mask is 32x24 but the photo is 64x48"),
        "full": (_url(_png(Image.new("RGB", (64, 48), "white"))), "covers the whole photo"),
        "text": ("data:text/plain;base64,aGk=", "data:image/...;base64 URL"),
        "b64": ("data:image/png;base64,***", "not valid base64"),
    }
    for what, (mask, words) in bad.items():
        status, body = _request(server + "/api/inpaint", json.dumps({**payload, "mask": mask}).encode(), "application/json")
        assert status in (400, 415) and words in body["error"], (what, body)
    status, body = _request(server + "/api/inpaint", b"{not json", "application/json")
    assert status == 400 and "not JSON" in body["error"]


def test_a_failing_method_answers_500_without_its_traceback(live):
    url = live(create_app({"broken": _broken}, limits=LIMITS))
    photo = Image.new("RGB", (32, 32), "blue")
    brush = Image.new("L", (32, 32))
    brush.paste(255, (4, 4, 12, 12))
    payload = json.dumps({"image": _url(_png(photo)), "mask": _url(_png(brush))}).encode()
    status, body = _request(url + "/api/inpaint", payload, "application/json")
    assert status == 500 and "RuntimeError" in body["error"] and "secret" not in body["error"]


def test_decode_mask_reads_painted_pixels():
    rgba = Image.new("RGBA", (20, 10), (0, 0, 0, 0))
    rgba.paste((255, 40, 40, 255), (0, 0, 5, 10))
    rgba.paste((255, 40, 40, 60), (5, 0, 10, 10))  # faint antialiased edge: not a hole
    hole = decode_mask(_png(rgba), (20, 10))
    assert hole[:, :5].all() and not hole[:, 5:].any()


def _checkpoint(path):
    import kdinpaint

    torch.manual_seed(0)
    adapter = kdinpaint.get_adapter("tiny-unet")
    kd = kdinpaint.attach(adapter.student(width=4), adapter.teacher(width=4), adapter.spec)
    kdinpaint.save_exported(kd.export(), path, adapter="tiny-unet", builder_kwargs={"width": 4})
    kd.detach()


def test_the_serve_command_shows_the_run_and_its_control_beside_biharmonic(tmp_path, monkeypatch, capsys):
    import uvicorn

    from kdinpaint.cli import main

    started = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, **kw: started.update(app=app, host=host, port=port))
    assert main(["serve", "--port", "8123"]) == 0
    assert (started["host"], started["port"]) == ("127.0.0.1", 8123)  # this machine only, unless told
    routes = {r.path for r in started["app"].routes}
    assert {"/", "/api/config", "/api/photo/{name}", "/api/upload", "/api/inpaint"} <= routes
    _checkpoint(tmp_path / "student.safetensors")
    _checkpoint(tmp_path / "control.safetensors")
    p = argparse.ArgumentParser()
    serve_arguments(p)
    methods, note = build_methods(p.parse_args(["--checkpoint", str(tmp_path / "student.safetensors")]))
    assert list(methods) == ["tiny-unet (student.safetensors)", "tiny-unet (control.safetensors), control", "biharmonic"]
    assert note is None
    methods, _ = build_methods(p.parse_args(["--checkpoint", str(tmp_path / "student.safetensors"), "--no-control"]))
    assert len(methods) == 2
    assert main(["serve", "--host", "0.0.0.0", "--port", "8124"]) == 0
    assert "WARNING: listening on 0.0.0.0" in capsys.readouterr().err
    assert main(["serve", "--checkpoint", str(tmp_path / "missing.safetensors")]) == 1

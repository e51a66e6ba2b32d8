"""The brush page's server: a FastAPI app with one static page and four JSON endpoints.

``GET /`` the page · ``GET /api/config`` the methods, bundled photos and limits · ``GET /api/photo/{name}`` a
bundled photo as PNG (by name from :data:`kdinpaint.data.SAMPLE_NAMES`, never a path) · ``POST /api/upload`` a
photo's bytes as the request body → the photo as the page will use it (RGB PNG, shrunk to ``max_side``) ·
``POST /api/inpaint`` ``{"image": data URL, "mask": data URL}`` → ``{"results": [{"name", "image"}], "hole"}``.

Every refusal is ``{"error": message}`` with a 4xx status; an unexpected failure is logged here with its traceback
and answered ``{"error": "..."}`` with 500, without the traceback. Request bodies are read up to their limit and
no further. One inpainting runs at a time (the models share the CPU or GPU).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Mapping
from importlib import resources
from typing import Any, Callable

import torch
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image
from starlette.exceptions import HTTPException as StarletteHTTPException

from kdinpaint.serve.images import (
    DEFAULT_LIMITS,
    FORMATS,
    Limits,
    UploadError,
    data_url,
    decode_mask,
    fit,
    from_data_url,
    read_upload,
    to_image,
    to_png,
    to_tensor,
)

__all__ = ["create_app", "PAGE"]

log = logging.getLogger(__name__)

PAGE = "index.html"
Method = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _page() -> str:
    return resources.files("kdinpaint.serve").joinpath("static", PAGE).read_text(encoding="utf-8")


def create_app(methods: Mapping[str, Method], *, limits: Limits = DEFAULT_LIMITS, note: str | None = None) -> Any:
    """The FastAPI app serving the page for ``methods`` (``{label: inpainter}``, shown left to right; each takes
    ``(image (1, 3, H, W) in [-1, 1], mask (1, 1, H, W))`` and returns the composite). ``note``: a line the page
    shows above the results (e.g. that a network has random weights)."""
    from kdinpaint.data.samples import SAMPLE_NAMES, sample_photo

    if not methods:
        raise ValueError("create_app needs at least one method to show")
    app = FastAPI(title="kdinpaint", docs_url=None, redoc_url=None, openapi_url=None)
    lock = threading.Lock()
    page = _page()

    def refuse(e: UploadError) -> JSONResponse:
        return JSONResponse({"error": str(e)}, status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:  # 404, 405: same shape
        return JSONResponse({"error": f"{request.method} {request.url.path}: {exc.detail}"}, status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:  # never a traceback to the page
        log.exception("kdinpaint serve: %s %s failed", request.method, request.url.path)
        return JSONResponse({"error": f"the server failed ({type(exc).__name__}): see its log"}, status_code=500)

    async def body(request: Request, limit: int, what: str) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise UploadError(f"the {what} is {int(declared) / 2**20:.1f} MiB, over the limit of {limit / 2**20:.1f} MiB: "
                              "upload a smaller image (or start the server with a larger --max-upload-mb)", 413)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise UploadError(f"the {what} is over the limit of {limit / 2**20:.1f} MiB: upload a smaller image", 413)
            chunks.append(chunk)
        return b"".join(chunks)

    @app.get("/", response_class=HTMLResponse)
    def index() -> HTMLResponse:
        return HTMLResponse(page, headers={"Cache-Control": "no-store"})

    @app.get("/api/config")
    def config() -> dict[str, Any]:
        return {"methods": list(methods), "photos": list(SAMPLE_NAMES), "note": note, "formats": list(FORMATS),
                "max_bytes": limits.max_bytes, "max_pixels": limits.max_pixels, "max_side": limits.max_side}

    @app.get("/api/photo/{name}")
    def photo(name: str) -> Response:
        if name not in SAMPLE_NAMES:  # a name from a fixed list, never a path
            return JSONResponse({"error": f"no bundled photo {name!r}; choose one of {list(SAMPLE_NAMES)}"}, 404)
        image = fit(Image.fromarray(sample_photo(name)).convert("RGB"), limits.max_side)
        return Response(to_png(image), media_type="image/png")

    @app.post("/api/upload")
    async def upload(request: Request) -> Response:
        try:
            image = read_upload(await body(request, limits.max_bytes, "upload"), limits)
        except UploadError as e:
            return refuse(e)
        return JSONResponse({"image": data_url(image), "width": image.width, "height": image.height})

    @app.post("/api/inpaint")
    async def inpaint(request: Request) -> Response:
        try:
            raw = await body(request, 3 * limits.max_bytes, "request")  # two base64 images
            try:
                payload = json.loads(raw)
            except (ValueError, UnicodeDecodeError):
                raise UploadError("the request is not JSON: send {\"image\": ..., \"mask\": ...}") from None
            if not isinstance(payload, dict):
                raise UploadError("the request must be a JSON object with image and mask")
            image = read_upload(from_data_url(payload.get("image"), "image"), limits)
            hole = decode_mask(from_data_url(payload.get("mask"), "mask"), image.size, limits)
        except UploadError as e:
            return refuse(e)
        x = to_tensor(image)  # (1, 3, H, W)
        m = torch.from_numpy(hole).float()[None, None]  # (1, 1, H, W)
        results = []
        with lock:
            for label, method in methods.items():
                results.append({"name": label, "image": data_url(to_image(method(x, m)))})
        return JSONResponse({"results": results, "hole": float(hole.mean()), "width": image.width,
                             "height": image.height})

    return app

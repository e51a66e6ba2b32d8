"""``kdinpaint serve``: a local web page to brush a mask on a photo and see the fill.

Open a bundled photo or upload one, brush the holes with the mouse or a finger, press *Inpaint*: the network's fill
appears beside the biharmonic fill (and the run's control network when ``control.safetensors`` lies beside the
checkpoint), each with a download link. The server is a FastAPI app (:func:`~kdinpaint.serve.app.create_app`) and
one static page (``kdinpaint/serve/static/index.html``), run by uvicorn on 127.0.0.1 unless told otherwise; install
it with ``pip install 'kdinpaint[serve]'``.

What the server reads from disk: the page, the bundled photos (:mod:`kdinpaint.data.samples`) and the model files
named on the command line; an upload lives in memory for one request and is never written. Uploads are bounded in
bytes and in pixels (checked from the image header, before decoding), only PNG, JPEG, WebP, BMP, GIF and TIFF
images are accepted, and every refusal comes back as a one-line message the page shows, never a traceback.
"""

from kdinpaint.serve.images import DEFAULT_LIMITS, Limits, UploadError, decode_mask, read_upload

__all__ = ["DEFAULT_LIMITS", "Limits", "UploadError", "decode_mask", "read_upload"]

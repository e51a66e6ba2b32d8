"""A live server of the brush page on 127.0.0.1 (a free port) in a thread of the test process."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest


def start(app) -> tuple[str, object, threading.Thread]:
    uvicorn = pytest.importorskip("uvicorn", reason="kdinpaint serve needs uvicorn: pip install -e '.[dev]'")
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    return f"http://127.0.0.1:{port}", server, thread


@pytest.fixture
def live() -> Iterator:
    """``live(app)`` → the base URL of ``app`` served until the test ends."""
    running = []

    def serve(app) -> str:
        url, server, thread = start(app)
        running.append((server, thread))
        return url

    yield serve
    for server, thread in running:
        server.should_exit = True
        thread.join(10)

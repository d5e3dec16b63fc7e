"""Shared fixtures for the data tests: a tiny Qwen2.5-VL checkpoint and its processor, a folder of images."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.data.helpers import BLUE, RED, png_bytes


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lmmrl_megatron.testing.make_tiny import make_tiny_checkpoint

    return make_tiny_checkpoint("qwen2_5_vl", tmp_path_factory.mktemp("tiny_qwen2_5_vl"), seed=0)


@pytest.fixture(scope="session")
def processor(tiny_checkpoint: Path) -> Any:
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_checkpoint)


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    """A folder with `red.png` (56x56), `blue.png` (84x56) and `corrupt.png` (truncated PNG bytes)."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "red.png").write_bytes(png_bytes((56, 56), RED))
    (folder / "blue.png").write_bytes(png_bytes((84, 56), BLUE))
    (folder / "corrupt.png").write_bytes(png_bytes()[:40])
    return folder


class _ImageHandler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if self.path == "/slow.png":
            time.sleep(3)  # longer than the client's timeout in the test
        if self.path in ("/red.png", "/slow.png", "/blue.png"):
            body = png_bytes((84, 56), BLUE) if self.path == "/blue.png" else png_bytes((56, 56), RED)
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        else:
            self.send_error(404, "no such image")

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="session")
def http_base() -> Iterator[str]:
    """A real HTTP server on loopback serving /red.png, /blue.png, a /slow.png that stalls 3 s, else 404."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _ImageHandler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()

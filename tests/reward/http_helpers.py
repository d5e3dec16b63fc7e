"""Real HTTP servers on loopback for the reward server and client tests, each run in a background thread."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from lmmrl_megatron.reward.labels import LabelIndex
from lmmrl_megatron.reward.scorer import RewardScorer
from lmmrl_megatron.reward.server import RewardService
from lmmrl_megatron.reward.server import serving as serving_rewards


@contextmanager
def serving(server: ThreadingHTTPServer) -> Iterator[str]:
    """Run `server` in a thread; yield its base URL; shut it down afterwards."""
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        host, port = server.server_address[:2]
        yield f"http://{host}:{port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@contextmanager
def reward_server(scorer: RewardScorer, label_index: LabelIndex | None = None, **options: float) -> Iterator[str]:
    """Our reward server (uvicorn) on a free loopback port, in a background thread; yields its base URL."""
    with serving_rewards(RewardService(scorer, "chatml", label_index), **options) as server:
        yield server.url


def post_json(url: str, payload: object | bytes, timeout_s: float = 30.0) -> tuple[int, dict]:
    """POST a JSON payload (or raw bytes); return (status, decoded reply) whatever the status."""
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def get_json(url: str, timeout_s: float = 30.0) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


# What a scripted server does with the n-th POST (0-based): (status, reply body), or raises to drop the connection.
Script = Callable[[int, dict], tuple[int, object]]


class ScriptedServer(ThreadingHTTPServer):
    """A tiny real HTTP server whose replies follow a script; it counts the POSTs it received."""

    daemon_threads = True

    def __init__(self, script: Script) -> None:
        super().__init__(("127.0.0.1", 0), _ScriptedHandler)
        self.script = script
        self.num_posts = 0
        self.lock = threading.Lock()
        self.release = threading.Event()  # scripts that stall wait on this, so teardown never hangs


class _ScriptedHandler(BaseHTTPRequestHandler):
    server: ScriptedServer

    def do_POST(self) -> None:
        payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.server.lock:
            number = self.server.num_posts
            self.server.num_posts += 1
        status, reply = self.server.script(number, payload)
        body = json.dumps(reply).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass

"""LMM-R1 / OpenRLHF compatible remote reward server, on FastAPI and uvicorn.

    python -m lmmrl_megatron.reward.server --host 127.0.0.1 --port 5000 \\
        [--data train.jsonl --input-key message --label-key answer] [--prompt-template chatml]

LMM-R1's own launch line runs unchanged (its flags are aliases here):

    python -m lmmrl_megatron.reward.server --dataset "${DATASET_PATH}" --input_key message --prompt-template chatml

POST /get_reward with `{"query": [...], "prompts": [...], "labels": [...]}` answers
`{"rewards": [...], "format_rewards": [...], "acc_rewards": [...], "components": {...}, "counters": {...}}`.
`query[i]` is the decoded prompt and response with special tokens; the response is what follows the last assistant
turn. `labels` may be left out (or hold nulls) when the server was given `--data`: the answer is then looked up by
`prompts[i]`, the raw (JSON string) messages. GET /health reports the configuration and running totals. Malformed
payloads get a 4xx JSON error naming the key at fault; a body that does not arrive within `--body-timeout-s` gets
a 408 and its connection is closed.

Requests are coroutines, not threads: each one hands its samples to the verifier pool and awaits them, so a
thousand waiting requests cost no threads, and the pool serves the requests' batches in turn.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import logging
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http import HTTPStatus

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from lmmrl_megatron.reward.config import RewardConfig, RewardFunctionConfig
from lmmrl_megatron.reward.labels import LabelIndex, load_label_index
from lmmrl_megatron.reward.query import ASSISTANT_PREFIXES, PromptTemplate, response_from_query
from lmmrl_megatron.reward.results import RewardBatchResult, RewardCounters
from lmmrl_megatron.reward.scorer import PendingScores, RewardScorer

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 512 * 1024 * 1024
DEFAULT_BODY_TIMEOUT_S = 30.0


class PayloadError(ValueError):
    """A request the server cannot serve; `key` names the part of the payload at fault (None: the whole body)."""

    def __init__(self, key: str | None, message: str, status: HTTPStatus = HTTPStatus.BAD_REQUEST,
                 close_connection: bool = False) -> None:
        super().__init__(message)
        self.key = key
        self.status = status
        self.close_connection = close_connection  # the body was not read whole: the connection cannot be reused


@dataclass(frozen=True)
class RewardRequest:
    queries: list[str]
    prompts: list[str]
    labels: list[str]


class RewardService:
    """The server's logic without HTTP: validate a payload, find responses and labels, score them."""

    def __init__(self, scorer: RewardScorer, template: PromptTemplate, label_index: LabelIndex | None) -> None:
        self.scorer = scorer
        self.template = template
        self.label_index = label_index
        self._lock = threading.Lock()
        self.num_requests = 0
        self.totals = RewardCounters()  # over every request served, for /health

    def parse_request(self, body: bytes) -> RewardRequest:
        payload = parse_json_body(body)
        if not isinstance(payload, dict):
            raise PayloadError(None, f"the body must be a JSON object, got {type(payload).__name__}")
        if "query" not in payload:
            raise PayloadError("query", "'query' is required: a list of decoded prompt + response strings")
        queries = _string_list(payload["query"], "query")
        prompts = _optional_list(payload, "prompts", len(queries))
        labels = _optional_list(payload, "labels", len(queries))
        if prompts is None:
            prompts = [None] * len(queries)
        for index, prompt in enumerate(prompts):
            if prompt is not None and not isinstance(prompt, str):
                raise PayloadError(f"prompts[{index}]", f"must be a string, got {type(prompt).__name__}")
        if labels is None:
            labels = [None] * len(queries)
        resolved = [self._label(label, prompt, index) for index, (label, prompt) in enumerate(zip(labels, prompts))]
        return RewardRequest(queries=queries, prompts=[prompt or "" for prompt in prompts], labels=resolved)

    def _label(self, label: object, prompt: str | None, index: int) -> str:
        if isinstance(label, str):
            return label
        if isinstance(label, (int, float)) and not isinstance(label, bool):
            return str(label)
        if label is not None:
            raise PayloadError(f"labels[{index}]", f"must be a string or a number, got {type(label).__name__}")
        if self.label_index is None:
            raise PayloadError("labels", "labels are missing and the server was started without --data to find them")
        if prompt is None:
            raise PayloadError(f"prompts[{index}]", "labels are missing, so prompts are needed to look them up")
        answer = self.label_index.lookup(prompt)
        if answer is None:
            raise PayloadError(f"prompts[{index}]", f"prompt not found in the --data dataset: {prompt[:200]!r}")
        return answer

    def submit(self, request: RewardRequest) -> PendingScores:
        """Hand the request's samples to the verifier pool; await or wait on the result's futures."""
        responses = [response_from_query(query, self.template) for query in request.queries]
        return self.scorer.submit(responses, request.labels, request.prompts)

    def reply(self, result: RewardBatchResult) -> dict[str, object]:
        """The JSON reply for a scored request (and the request counted in the totals)."""
        with self._lock:
            self.num_requests += 1
            self.totals.add(result.counters)
        counters = result.counters
        if counters.num_failures or counters.num_rejected:
            logger.info("request of %d samples: %d timeouts, %d errors, %d bad returns, %d crashes, %d rejected; %s",
                        counters.num_samples, counters.num_timeouts, counters.num_errors, counters.num_bad_returns,
                        counters.num_crashes, counters.num_rejected, "; ".join(counters.messages[:2]))
        zeros = [0.0] * len(result.rewards)
        return {
            "rewards": result.rewards,
            "format_rewards": result.components.get("format", zeros),
            "acc_rewards": result.components.get("accuracy", zeros),
            "components": result.components,
            "counters": counters.to_json(),
        }

    def health(self) -> dict[str, object]:
        config = self.scorer.config
        with self._lock:
            totals = {key: value for key, value in self.totals.to_json().items() if key != "messages"}
            num_requests = self.num_requests
        return {
            "status": "ok",
            "functions": [{"name": function.name, "weight": function.weight} for function in config.functions],
            "format_kind": config.format_kind,
            "prompt_template": self.template,
            "num_workers": config.num_workers,
            "timeout_s": config.timeout_s,
            "math_timeout_s": config.math_timeout_s,
            "num_worker_restarts": self.scorer.num_worker_restarts,
            "num_dataset_prompts": len(self.label_index.answers) if self.label_index is not None else 0,
            "num_requests": num_requests,
            "totals": totals,
        }


def parse_json_body(body: bytes) -> object:
    """The body's JSON; a PayloadError for bad JSON, and for JSON nested too deeply to decode (naming the top-level
    key it is under). JSON that decodes but nests where it should not fails the type checks, which name the key."""
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise PayloadError(None, f"the body is not valid JSON: {error}") from error
    except RecursionError as error:
        key = _deeply_nested_key(body)
        where = f"under '{key}'" if key is not None else "at the top level"
        raise PayloadError(key, f"the JSON is nested too deeply to decode {where}") from error


_JSON_STRUCTURE = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}:]')


def _deeply_nested_key(body: bytes, depth_limit: int = 500) -> str | None:
    """The top-level key under which the JSON first nests `depth_limit` deep (None: not under a key). Strings are
    skipped whole by the regular expression; the scan stops at the first excess."""
    depth = 0
    key: str | None = None
    previous = b""
    for match in _JSON_STRUCTURE.finditer(body):
        token = match.group()
        if token in (b"[", b"{"):
            depth += 1
            if depth > depth_limit:
                return key
        elif token in (b"]", b"}"):
            depth -= 1
        elif token == b":" and depth == 1 and previous.startswith(b'"'):
            try:
                key = str(json.loads(previous))[:100]
            except (json.JSONDecodeError, UnicodeDecodeError):
                key = previous[1:-1].decode("utf-8", "replace")[:100]
        previous = token
    return None


def _string_list(value: object, key: str) -> list[str]:
    if not isinstance(value, list):
        raise PayloadError(key, f"'{key}' must be a list of strings, got {type(value).__name__}")
    for index, item in enumerate(value):
        if not isinstance(item, str):
            raise PayloadError(f"{key}[{index}]", f"must be a string, got {type(item).__name__}")
    return value


def _optional_list(payload: dict[str, object], key: str, length: int) -> list[object] | None:
    value = payload.get(key)
    if value is None:
        return None
    if not isinstance(value, list):
        raise PayloadError(key, f"'{key}' must be a list, got {type(value).__name__}")
    if len(value) != length:
        raise PayloadError(key, f"'{key}' has {len(value)} items but 'query' has {length}")
    return value


# ------------------------------------------------------------------------------------------------ HTTP
def create_app(service: RewardService, body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S) -> FastAPI:
    """The ASGI application: POST /get_reward, GET /health; JSON in and out, errors as {"error", "key"}."""
    app = FastAPI(title="lmmrl-megatron reward server", docs_url=None, redoc_url=None, openapi_url=None)

    def error_response(error: PayloadError) -> JSONResponse:
        headers = {"Connection": "close"} if error.close_connection else None
        return JSONResponse({"error": str(error), "key": error.key}, status_code=error.status, headers=headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        message = {404: f"no route {request.url.path!r}", 405: f"{request.method} is not allowed on {request.url.path}"}
        return JSONResponse({"error": message.get(error.status_code, str(error.detail)), "key": None},
                            status_code=error.status_code)

    @app.get("/health")
    async def health() -> JSONResponse:
        return JSONResponse(service.health())

    @app.post("/get_reward")
    async def get_reward(request: Request) -> JSONResponse:
        try:
            body = await read_body(request, body_timeout_s)
            parsed = service.parse_request(body)
        except PayloadError as error:
            return error_response(error)
        except ClientDisconnect:
            return JSONResponse({"error": "the client went away", "key": None}, status_code=400)
        try:
            pending = service.submit(parsed)
            outcomes = await asyncio.gather(*(asyncio.wrap_future(future) for future in pending.futures))
            reply = service.reply(pending.combine(list(outcomes)))
        except Exception as error:  # a broken verifier pool must answer 500, not drop the connection
            logger.exception("scoring a request failed")
            return JSONResponse({"error": f"{type(error).__name__}: {error}", "key": None}, status_code=500)
        return JSONResponse(reply)

    return app


async def read_body(request: Request, timeout_s: float) -> bytes:
    """The request body, checked against its Content-Length; a PayloadError (408) if it does not all arrive
    within `timeout_s`, so a client that stalls mid-body holds nothing for longer than that."""
    length_text = request.headers.get("content-length")
    if length_text is None:
        raise PayloadError(None, "Content-Length is required", HTTPStatus.LENGTH_REQUIRED, close_connection=True)
    try:
        length = int(length_text)
    except ValueError as error:
        raise PayloadError(None, f"bad Content-Length {length_text!r}", close_connection=True) from error
    if length < 0:
        raise PayloadError(None, f"bad Content-Length {length_text!r}", close_connection=True)
    if length > MAX_BODY_BYTES:
        raise PayloadError(None, f"body over {MAX_BODY_BYTES} bytes", HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                           close_connection=True)
    chunks: list[bytes] = []
    received = 0

    async def receive_all() -> None:
        nonlocal received
        async for chunk in request.stream():
            chunks.append(chunk)
            received += len(chunk)

    try:
        await asyncio.wait_for(receive_all(), timeout_s)
    except TimeoutError as error:
        raise PayloadError(None, f"the body did not arrive within {timeout_s} s ({received} of {length} bytes)",
                           HTTPStatus.REQUEST_TIMEOUT, close_connection=True) from error
    return b"".join(chunks)


class RewardHTTPServer:
    """uvicorn serving `create_app(service)` on a socket bound at construction (so `port` is known at once).

    `serve_forever()` runs in the calling thread (SIGINT/SIGTERM stop it gracefully when that is the main thread);
    `start()` runs it in a background thread and `shutdown()` stops it.
    """

    def __init__(self, address: tuple[str, int], service: RewardService,
                 body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S, backlog: int = 2048) -> None:
        host, port = address
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.socket.bind((host, port))
            self.socket.listen(backlog)
        except OSError:
            self.socket.close()
            raise
        self.host = host
        self.service = service
        config = uvicorn.Config(
            create_app(service, body_timeout_s), log_config=None, log_level="warning", access_log=False,
            lifespan="off", backlog=backlog, timeout_graceful_shutdown=5,
        )
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self.socket.getsockname()[1]

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def serve_forever(self) -> None:
        try:
            self._server.run(sockets=[self.socket])
        finally:
            self.socket.close()

    def start(self) -> None:
        self._thread = threading.Thread(target=self.serve_forever, name="reward-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the reward HTTP server did not start")
            time.sleep(0.01)

    def shutdown(self) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join()


@contextmanager
def serving(service: RewardService, host: str = "127.0.0.1", port: int = 0,
            body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S) -> Iterator[RewardHTTPServer]:
    """Serve `service` from a background thread for the duration of the block (tests, benchmarks)."""
    server = RewardHTTPServer((host, port), service, body_timeout_s)
    server.start()
    try:
        yield server
    finally:
        server.shutdown()


# ------------------------------------------------------------------------------------------------ command line
def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def parse_function_weight(text: str) -> RewardFunctionConfig:
    """`NAME=WEIGHT` (e.g. `format=0.5`, `rewards.py:length_penalty=-0.1`) -> RewardFunctionConfig."""
    name, separator, weight = text.rpartition("=")
    if not separator:
        raise argparse.ArgumentTypeError(f"--function {text!r} must be NAME=WEIGHT")
    try:
        return RewardFunctionConfig(name=name, weight=float(weight))
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"--function {text!r}: {error}") from error


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lmmrl_megatron.reward.server", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=5000, help="port to bind; 0 picks a free one")
    parser.add_argument("--data", "--dataset", dest="data", default=None,
                        help="dataset(s) to find answers in when labels are absent, comma-separated (.jsonl, .json, "
                             ".parquet, json@DIR, a datasets folder), in LMM-R1's format; --dataset is LMM-R1's name")
    parser.add_argument("--input-key", "--input_key", dest="input_key", default="message")
    parser.add_argument("--label-key", "--label_key", dest="label_key", default="answer")
    parser.add_argument("--bad-input", default="error", choices=["error", "skip"],
                        help="a bad --data record stops the server (error) or is left out and counted (skip)")
    parser.add_argument("--prompt-template", "--prompt_template", dest="prompt_template", default="chatml",
                        choices=sorted(ASSISTANT_PREFIXES))
    parser.add_argument("--log-file", "--log_file", dest="log_file", default=None,
                        help="also write the log to this file, emptied at start (LMM-R1's --log_file)")
    parser.add_argument("--function", dest="functions", action="append", type=parse_function_weight, default=None,
                        help="NAME=WEIGHT, repeatable (default: format=0.5 accuracy=1.0, as LMM-R1)")
    parser.add_argument("--disable-format-reward", "--disable_format_reward", dest="disable_format_reward",
                        action="store_true", help="drop the format term (as LMM-R1)")
    parser.add_argument("--format-kind", default="think_answer", choices=["think_answer", "boxed"])
    parser.add_argument("--timeout-s", type=float, default=RewardConfig.timeout_s,
                        help="real-time limit of one reward function on one sample")
    parser.add_argument("--math-timeout-s", type=float, default=RewardConfig.math_timeout_s,
                        help="CPU-time limit of each math-verify step (parse the label, parse the answer, compare)")
    parser.add_argument("--num-workers", type=int, default=RewardConfig.num_workers)
    parser.add_argument("--body-timeout-s", type=float, default=DEFAULT_BODY_TIMEOUT_S,
                        help="a request body that has not all arrived after this long gets a 408")
    return parser


def config_from_args(args: argparse.Namespace) -> RewardConfig:
    config = RewardConfig(
        format_kind=args.format_kind,
        timeout_s=args.timeout_s,
        math_timeout_s=args.math_timeout_s,
        num_workers=args.num_workers,
    )
    if args.functions is not None:
        config.functions = args.functions
    if args.disable_format_reward:
        config.functions = [function for function in config.functions if function.name != "format"]
    config.__post_init__()  # re-validate after the edits above
    return config


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_arg_parser().parse_args(argv)
    if args.log_file:
        handler = logging.FileHandler(args.log_file, mode="w", encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger().addHandler(handler)
    try:
        config = config_from_args(args)
        if args.body_timeout_s <= 0:
            raise ValueError(f"--body-timeout-s must be positive, got {args.body_timeout_s}")
        label_index = None
        if args.data:
            label_index = load_label_index(args.data, args.input_key, args.label_key, args.bad_input)
            logger.info("%s: %d prompts with answers, %s", args.data, len(label_index.answers), label_index.skipped)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not _is_loopback(args.host):
        logger.warning("binding %s: the reward server is reachable from other machines and has no authentication",
                       args.host)
    # uvicorn stops gracefully on SIGTERM, then raises it again; this turns that into a clean exit.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    logger.info("format reward is %s", "disabled" if args.disable_format_reward else "enabled")
    with RewardScorer(config) as scorer:
        try:
            server = RewardHTTPServer((args.host, args.port), RewardService(scorer, args.prompt_template, label_index),
                                      args.body_timeout_s)
        except OSError as error:
            print(f"error: cannot listen on {args.host}:{args.port}: {error}", file=sys.stderr)
            return 2
        scorer.wait_until_ready()  # warm workers before the first request
        print(f"reward server listening on {server.url}", flush=True)
        try:
            server.serve_forever()
        except (KeyboardInterrupt, SystemExit):
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())

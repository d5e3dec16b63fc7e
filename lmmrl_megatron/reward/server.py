"""LMM-R1 / OpenRLHF compatible remote reward server.

    python -m lmmrl_megatron.reward.server --host 127.0.0.1 --port 5000 \
        [--data train.jsonl --input-key message --label-key answer] [--prompt-template chatml]

POST /get_reward with `{"query": [...], "prompts": [...], "labels": [...]}` answers
`{"rewards": [...], "format_rewards": [...], "acc_rewards": [...], "components": {...}, "counters": {...}}`.
`query[i]` is the decoded prompt and response with special tokens; the response is what follows the last assistant
turn. `labels` may be left out (or hold nulls) when the server was given `--data`: the answer is then looked up by
`prompts[i]`, the raw (JSON string) messages. GET /health reports the configuration. Malformed payloads get a 4xx
JSON error naming the key at fault.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import signal
import sys
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from lmmrl_megatron.reward.config import RewardConfig, RewardFunctionConfig
from lmmrl_megatron.reward.labels import LabelIndex, load_label_index
from lmmrl_megatron.reward.query import ASSISTANT_PREFIXES, PromptTemplate, response_from_query
from lmmrl_megatron.reward.scorer import RewardScorer

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 512 * 1024 * 1024


class PayloadError(ValueError):
    """A request the server cannot serve; `key` names the part of the payload at fault (None: the whole body)."""

    def __init__(self, key: str | None, message: str, status: HTTPStatus = HTTPStatus.BAD_REQUEST) -> None:
        super().__init__(message)
        self.key = key
        self.status = status


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

    def parse_request(self, body: bytes) -> RewardRequest:
        try:
            payload = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise PayloadError(None, f"the body is not valid JSON: {error}") from error
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

    def handle(self, request: RewardRequest) -> dict[str, object]:
        responses = [response_from_query(query, self.template) for query in request.queries]
        result = self.scorer.score(responses, request.labels, request.prompts)
        zeros = [0.0] * len(responses)
        return {
            "rewards": result.rewards,
            "format_rewards": result.components.get("format", zeros),
            "acc_rewards": result.components.get("accuracy", zeros),
            "components": result.components,
            "counters": result.counters.to_json(),
        }

    def health(self) -> dict[str, object]:
        config = self.scorer.config
        return {
            "status": "ok",
            "functions": [{"name": function.name, "weight": function.weight} for function in config.functions],
            "format_kind": config.format_kind,
            "prompt_template": self.template,
            "num_workers": config.num_workers,
            "timeout_s": config.timeout_s,
            "num_worker_restarts": self.scorer.num_worker_restarts,
            "num_dataset_prompts": len(self.label_index.answers) if self.label_index is not None else 0,
        }


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


class RewardRequestHandler(BaseHTTPRequestHandler):
    """Routes: POST /get_reward, GET /health; JSON in and out."""

    protocol_version = "HTTP/1.1"
    server: RewardHTTPServer

    def do_GET(self) -> None:
        if self.path.split("?")[0] == "/health":
            self._reply(HTTPStatus.OK, self.server.service.health())
        elif self.path.split("?")[0] == "/get_reward":
            self._reply_error(PayloadError(None, "use POST for /get_reward", HTTPStatus.METHOD_NOT_ALLOWED))
        else:
            self._reply_error(PayloadError(None, f"no route {self.path!r}", HTTPStatus.NOT_FOUND))

    def do_POST(self) -> None:
        try:
            body = self._read_body()
        except PayloadError as error:
            self.close_connection = True  # the body was not read, so the connection cannot carry another request
            self._reply_error(error)
            return
        if self.path.split("?")[0] != "/get_reward":
            status = HTTPStatus.METHOD_NOT_ALLOWED if self.path == "/health" else HTTPStatus.NOT_FOUND
            self._reply_error(PayloadError(None, f"no POST route {self.path!r}", status))
            return
        try:
            request = self.server.service.parse_request(body)
            reply = self.server.service.handle(request)
        except PayloadError as error:
            self._reply_error(error)
            return
        except Exception as error:  # a broken verifier pool must answer 500, not drop the connection
            logger.exception("scoring a request failed")
            self._reply(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"{type(error).__name__}: {error}", "key": None})
            return
        self._reply(HTTPStatus.OK, reply)

    def _read_body(self) -> bytes:
        length_text = self.headers.get("Content-Length")
        if length_text is None:
            raise PayloadError(None, "Content-Length is required", HTTPStatus.LENGTH_REQUIRED)
        try:
            length = int(length_text)
        except ValueError as error:
            raise PayloadError(None, f"bad Content-Length {length_text!r}") from error
        if length < 0:
            raise PayloadError(None, f"bad Content-Length {length_text!r}")
        if length > MAX_BODY_BYTES:
            raise PayloadError(None, f"body over {MAX_BODY_BYTES} bytes", HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
        return self.rfile.read(length)

    def _reply_error(self, error: PayloadError) -> None:
        self._reply(error.status, {"error": str(error), "key": error.key})

    def _reply(self, status: HTTPStatus, payload: dict[str, object]) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        logger.debug("%s %s", self.address_string(), format % args)


class RewardHTTPServer(ThreadingHTTPServer):
    """A thread per connection; all threads share the service's verifier pool."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], service: RewardService) -> None:
        super().__init__(address, RewardRequestHandler)
        self.service = service

    @property
    def port(self) -> int:
        return self.server_address[1]


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
    parser.add_argument("--data", default=None,
                        help="dataset to find answers in when labels are absent (.jsonl, .json, .parquet, json@DIR, "
                             "a datasets folder), in LMM-R1's format")
    parser.add_argument("--input-key", "--input_key", dest="input_key", default="message")
    parser.add_argument("--label-key", "--label_key", dest="label_key", default="answer")
    parser.add_argument("--bad-input", default="error", choices=["error", "skip"],
                        help="a bad --data record stops the server (error) or is left out and counted (skip)")
    parser.add_argument("--prompt-template", "--prompt_template", dest="prompt_template", default="chatml",
                        choices=sorted(ASSISTANT_PREFIXES))
    parser.add_argument("--function", dest="functions", action="append", type=parse_function_weight, default=None,
                        help="NAME=WEIGHT, repeatable (default: format=0.5 accuracy=1.0, as LMM-R1)")
    parser.add_argument("--disable-format-reward", action="store_true", help="drop the format term (as LMM-R1)")
    parser.add_argument("--format-kind", default="think_answer", choices=["think_answer", "boxed"])
    parser.add_argument("--timeout-s", type=float, default=RewardConfig.timeout_s)
    parser.add_argument("--num-workers", type=int, default=RewardConfig.num_workers)
    return parser


def config_from_args(args: argparse.Namespace) -> RewardConfig:
    config = RewardConfig(
        format_kind=args.format_kind,
        timeout_s=args.timeout_s,
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
    try:
        config = config_from_args(args)
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
    # A plain SIGTERM would skip the cleanup below and leave verifier processes to notice on their own.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    with RewardScorer(config) as scorer:
        server = RewardHTTPServer((args.host, args.port), RewardService(scorer, args.prompt_template, label_index))
        print(f"reward server listening on http://{args.host}:{server.port}", flush=True)
        try:
            server.serve_forever()
        except (KeyboardInterrupt, SystemExit):
            pass
        finally:
            server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

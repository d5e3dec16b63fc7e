"""The client the trainer uses for `reward.remote_rm_url`: POST /get_reward with timeouts and retries.

Retries (with exponential backoff) cover what a restart or a busy server causes: refused or reset connections,
timeouts, and 5xx replies. A 4xx reply means the request itself is wrong, so it fails at once with the server's
message. Works with LMM-R1 / OpenRLHF servers, which answer only `rewards` (and perhaps `format_rewards`,
`acc_rewards`), as well as with `lmmrl_megatron.reward.server`.

With several servers (`remote_rm_url` with commas, as OpenRLHF takes it) a batch is cut into one contiguous part
per server, the parts are posted at the same time, and each retry of a part goes to the next server in the list,
so one server that is down slows its part instead of failing the step.
"""

from __future__ import annotations

import http.client
import json
import logging
import math
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from lmmrl_megatron.reward.config import RewardConfig, split_remote_rm_url
from lmmrl_megatron.reward.results import RewardBatchResult, RewardCounters, check_batch_lengths, split_batch

logger = logging.getLogger(__name__)


class RemoteRewardError(RuntimeError):
    """The remote reward server refused the request (4xx), answered nonsense, or stayed unreachable."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class RetryPolicy:
    timeout_s: float = 120.0
    max_retries: int = 3
    backoff_s: float = 1.0
    backoff_max_s: float = 30.0

    def delay_before_retry(self, retry_number: int) -> float:
        """Seconds to wait before retry `retry_number` (1-based): backoff_s, 2*backoff_s, 4*backoff_s, ... capped."""
        return min(self.backoff_max_s, self.backoff_s * 2 ** (retry_number - 1))


class _Retryable(Exception):
    pass


def get_reward_url(url: str) -> str:
    """A server's base (`http://host:port`) or its full `.../get_reward` URL -> the full URL."""
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"remote reward url must start with http:// or https://, got {url!r}")
    return url if url.rstrip("/").endswith("/get_reward") else url.rstrip("/") + "/get_reward"


class RemoteRewardClient:
    """Scores batches on one or more remote reward servers. `url` is a server's base (`http://host:port`) or its
    full `.../get_reward` URL, or several of them separated by commas, as OpenRLHF's `--remote_rm_url` takes it."""

    def __init__(self, url: str, policy: RetryPolicy | None = None) -> None:
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"remote reward url must start with http:// or https://, got {url!r}")
        self.urls = [get_reward_url(part) for part in split_remote_rm_url(url)[0]]
        self.policy = policy or RetryPolicy()
        self.num_retries = 0  # over the client's lifetime, for logs
        self._senders = ThreadPoolExecutor(len(self.urls), "reward-client") if len(self.urls) > 1 else None

    @property
    def url(self) -> str:
        return self.urls[0]

    @classmethod
    def from_config(cls, config: RewardConfig) -> RemoteRewardClient:
        if config.remote_rm_url is None:
            raise ValueError("reward.remote_rm_url is not set")
        if not config.remote_urls:
            raise ValueError(f"reward.remote_rm_url {config.remote_rm_url!r} names a reward_func file, not a server")
        policy = RetryPolicy(
            timeout_s=config.client_timeout_s,
            max_retries=config.client_max_retries,
            backoff_s=config.client_backoff_s,
            backoff_max_s=config.client_backoff_max_s,
        )
        return cls(config.remote_rm_url, policy)

    def score(self, queries: list[str], prompts: list[str], labels: list[str] | None) -> RewardBatchResult:
        """Rewards for `queries[i]` (decoded prompt + response); `labels=None` lets the server look them up."""
        check_batch_lengths(queries, prompts, labels)
        parts = [(index, start, end) for index, (start, end) in enumerate(split_batch(len(queries), len(self.urls)))]

        def score_part(part: tuple[int, int, int]) -> RewardBatchResult:
            index, start, end = part
            payload: dict[str, object] = {"query": queries[start:end], "prompts": prompts[start:end]}
            if labels is not None:
                payload["labels"] = labels[start:end]
            return parse_reply(self._post_with_retries(json.dumps(payload).encode(), index), end - start)

        if self._senders is None or len(parts) == 1:
            results = [score_part(part) for part in parts]
        else:
            results = list(self._senders.map(score_part, parts))
        return RewardBatchResult.concatenate(results)

    def close(self) -> None:
        if self._senders is not None:
            self._senders.shutdown()

    def _post_with_retries(self, body: bytes, first_server: int = 0) -> object:
        last_problem = ""
        for attempt in range(self.policy.max_retries + 1):
            url = self.urls[(first_server + attempt) % len(self.urls)]
            if attempt > 0:
                self.num_retries += 1
                delay = self.policy.delay_before_retry(attempt)
                logger.warning("reward server %s: %s; retry %d/%d on %s in %.1f s",
                               self.urls[(first_server + attempt - 1) % len(self.urls)], last_problem, attempt,
                               self.policy.max_retries, url, delay)
                time.sleep(delay)
            try:
                return self._post_once(url, body)
            except _Retryable as problem:
                last_problem = f"{url}: {problem}" if len(self.urls) > 1 else str(problem)
        servers = f"reward server {self.url}" if len(self.urls) == 1 else f"reward servers {', '.join(self.urls)}"
        raise RemoteRewardError(
            f"{servers} failed after {self.policy.max_retries + 1} attempts; last: {last_problem}"
        )

    def _post_once(self, url: str, body: bytes) -> object:
        request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.policy.timeout_s) as response:
                raw = response.read()
        except urllib.error.HTTPError as error:
            detail = _error_detail(error)
            if error.code >= 500:
                raise _Retryable(f"HTTP {error.code}: {detail}") from error
            raise RemoteRewardError(f"reward server {url} rejected the request: HTTP {error.code}: {detail}",
                                    status=error.code) from error
        except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError, OSError) as error:
            reason = error.reason if isinstance(error, urllib.error.URLError) else error
            raise _Retryable(f"{type(reason).__name__}: {reason}") from error
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise RemoteRewardError(f"reward server {url} answered invalid JSON: {raw[:200]!r}") from error


def _error_detail(error: urllib.error.HTTPError) -> str:
    try:
        body = error.read()
    except OSError:
        return error.reason if isinstance(error.reason, str) else ""
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return body[:300].decode(errors="replace")
    if isinstance(payload, dict) and "error" in payload:
        key = payload.get("key")
        return f"{payload['error']}" + (f" (key: {key})" if key else "")
    return str(payload)[:300]


def parse_reply(reply: object, num_samples: int) -> RewardBatchResult:
    """A RewardBatchResult from a server reply; RemoteRewardError when it is not a reply for `num_samples`."""
    if not isinstance(reply, dict):
        raise RemoteRewardError(f"reward server reply must be a JSON object, got {type(reply).__name__}")
    rewards = _number_list(reply.get("rewards"), "rewards", num_samples)
    components: dict[str, list[float]] = {}
    raw_components = reply.get("components")
    if isinstance(raw_components, dict):
        for name, values in raw_components.items():
            components[str(name)] = _number_list(values, f"components.{name}", num_samples)
    else:
        # An LMM-R1 server: only the format and accuracy parts, when it sends them.
        for name, key in (("format", "format_rewards"), ("accuracy", "acc_rewards")):
            if reply.get(key) is not None:
                components[name] = _number_list(reply[key], key, num_samples)
    try:
        counters = RewardCounters.from_json(reply["counters"]) if "counters" in reply else RewardCounters()
    except ValueError as error:
        raise RemoteRewardError(f"reward server reply: {error}") from error
    counters.num_samples = num_samples
    return RewardBatchResult(rewards=rewards, components=components, counters=counters)


def _number_list(value: object, key: str, length: int) -> list[float]:
    if not isinstance(value, list):
        raise RemoteRewardError(f"reward server reply: '{key}' must be a list, got {type(value).__name__}")
    if len(value) != length:
        raise RemoteRewardError(f"reward server reply: '{key}' has {len(value)} values for {length} queries")
    numbers: list[float] = []
    for index, item in enumerate(value):
        if isinstance(item, bool) or not isinstance(item, (int, float)) or not math.isfinite(item):
            raise RemoteRewardError(f"reward server reply: '{key}[{index}]' is not a finite number: {item!r}")
        numbers.append(float(item))
    return numbers

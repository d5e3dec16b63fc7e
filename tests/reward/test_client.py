"""The remote reward client against real loopback servers: retries with backoff, no retry on 4xx, timeouts."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from lmmrl_megatron.reward.client import RemoteRewardClient, RemoteRewardError, RetryPolicy, parse_reply
from lmmrl_megatron.reward.config import RewardConfig
from lmmrl_megatron.reward.scorer import RewardScorer

from .http_helpers import ScriptedServer, reward_server, serving

FAST_RETRIES = RetryPolicy(timeout_s=10.0, max_retries=3, backoff_s=0.01, backoff_max_s=0.05)


def lmmr1_reply(payload: dict) -> dict:
    """What LMM-R1's verifier answers: rewards with format and accuracy parts, nothing else."""
    count = len(payload["query"])
    return {"rewards": [1.5] * count, "format_rewards": [0.5] * count, "acc_rewards": [1.0] * count}


def failing_first(num_failures: int, status: int = 503):
    def script(number: int, payload: dict) -> tuple[int, object]:
        if number < num_failures:
            return status, {"error": f"failure {number}", "key": None}
        return 200, lmmr1_reply(payload)

    return script


def test_retries_5xx_until_the_server_answers() -> None:
    server = ScriptedServer(failing_first(2))
    with serving(server) as url:
        client = RemoteRewardClient(url, FAST_RETRIES)
        result = client.score(["q1", "q2"], ["p1", "p2"], ["1", "2"])
    assert server.num_posts == 3 and client.num_retries == 2
    assert result.rewards == [1.5, 1.5]
    assert result.components == {"format": [0.5, 0.5], "accuracy": [1.0, 1.0]}


def test_gives_up_after_max_retries() -> None:
    server = ScriptedServer(failing_first(100, status=500))
    with serving(server) as url:
        client = RemoteRewardClient(url + "/get_reward", FAST_RETRIES)
        with pytest.raises(RemoteRewardError, match="failed after 4 attempts; last: HTTP 500: failure 3"):
            client.score(["q"], ["p"], ["1"])
    assert server.num_posts == 4


def test_a_4xx_is_not_retried_and_carries_the_servers_message() -> None:
    server = ScriptedServer(failing_first(100, status=400))
    with serving(server) as url:
        with pytest.raises(RemoteRewardError, match="rejected the request: HTTP 400: failure 0") as caught:
            RemoteRewardClient(url, FAST_RETRIES).score(["q"], ["p"], ["1"])
    assert caught.value.status == 400
    assert server.num_posts == 1


def test_connection_refused_is_retried_then_reported() -> None:
    with socket.socket() as probe:  # a port that was free a moment ago and has nobody listening now
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client = RemoteRewardClient(f"http://127.0.0.1:{port}", FAST_RETRIES)
    with pytest.raises(RemoteRewardError, match="failed after 4 attempts; last: ConnectionRefusedError"):
        client.score(["q"], ["p"], None)
    assert client.num_retries == 3


def test_a_slow_server_times_out_and_is_retried() -> None:
    def script(number: int, payload: dict) -> tuple[int, object]:
        if number == 0:
            server.release.wait(timeout=30)  # stall the first request past the client's timeout
        return 200, lmmr1_reply(payload)

    server = ScriptedServer(script)
    with serving(server) as url:
        client = RemoteRewardClient(url, RetryPolicy(timeout_s=0.5, max_retries=2, backoff_s=0.01))
        try:
            result = client.score(["q"], ["p"], ["1"])
        finally:
            server.release.set()
    assert result.rewards == [1.5]
    assert client.num_retries == 1 and server.num_posts == 2


def test_the_request_carries_lmmr1_keys_and_omits_absent_labels() -> None:
    seen: list[dict] = []

    def script(number: int, payload: dict) -> tuple[int, object]:
        seen.append(payload)
        return 200, {"rewards": [0.0]}

    with serving(ScriptedServer(script)) as url:
        result = RemoteRewardClient(url, FAST_RETRIES).score(["query"], ["prompt"], None)
    assert seen == [{"query": ["query"], "prompts": ["prompt"]}]
    assert result.components == {} and result.counters.num_samples == 1


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        ([1.0], "must be a JSON object"),
        ({"scores": [1.0]}, "'rewards' must be a list"),
        ({"rewards": [1.0, 2.0]}, "'rewards' has 2 values for 1 queries"),
        ({"rewards": ["1"]}, r"'rewards\[0\]' is not a finite number"),
        ({"rewards": [1.0], "acc_rewards": [1.0, 0.0]}, "'acc_rewards' has 2 values"),
        ({"rewards": [1.0], "counters": {"num_errors": "x"}}, "counters.num_errors"),
    ],
)
def test_malformed_replies_are_errors(reply: object, message: str) -> None:
    with pytest.raises(RemoteRewardError, match=message):
        parse_reply(reply, 1)


def test_invalid_json_from_the_server_is_an_error() -> None:
    with serving(ScriptedServer(lambda number, payload: (200, "not an object"))) as url:
        with pytest.raises(RemoteRewardError, match="must be a JSON object"):
            RemoteRewardClient(url, FAST_RETRIES).score(["q"], ["p"], ["1"])


@pytest.fixture(scope="module")
def scorer() -> Iterator[RewardScorer]:
    with RewardScorer(RewardConfig(num_workers=1)) as shared:
        yield shared


def test_against_our_reward_server_from_config(scorer: RewardScorer) -> None:
    with reward_server(scorer) as url:
        config = RewardConfig(remote_rm_url=url + "/get_reward", client_backoff_s=0.01)
        client = RemoteRewardClient.from_config(config)
        queries = [f"<|im_start|>assistant\n<think>.</think><answer>{n}</answer><|im_end|>" for n in (2, 3)]
        result = client.score(queries, ["p", "p"], ["2", "2"])
        # This server has no --data to look labels up in: a 4xx naming the key, at once.
        with pytest.raises(RemoteRewardError, match=r"HTTP 400: .*without --data.*\(key: labels\)"):
            client.score(["q"], ["p"], None)
        assert client.num_retries == 0
    assert result.rewards == [1.5, 0.5]
    assert result.components == {"format": [0.5, 0.5], "accuracy": [1.0, 0.0]}
    assert result.counters.num_samples == 2 and result.counters.num_calls == 4


def test_client_validates_its_inputs() -> None:
    with pytest.raises(ValueError, match="must start with http"):
        RemoteRewardClient("localhost:5000")
    with pytest.raises(ValueError, match="remote_rm_url is not set"):
        RemoteRewardClient.from_config(RewardConfig())
    client = RemoteRewardClient("http://127.0.0.1:1/", FAST_RETRIES)
    assert client.url == "http://127.0.0.1:1/get_reward"
    with pytest.raises(ValueError, match="lengths must match"):
        client.score(["q"], [], None)


def test_backoff_doubles_up_to_its_cap() -> None:
    policy = RetryPolicy(backoff_s=0.5, backoff_max_s=3.0)
    assert [policy.delay_before_retry(n) for n in (1, 2, 3, 4, 5)] == [0.5, 1.0, 2.0, 3.0, 3.0]


def echo_rewards(number: int, payload: dict) -> tuple[int, object]:
    """Reward = the query read as a number, so the order of the merged rewards shows."""
    return 200, {"rewards": [float(query) for query in payload["query"]], "counters": {"num_timeouts": 1}}


def test_a_batch_is_split_across_comma_separated_servers() -> None:
    first, second = ScriptedServer(echo_rewards), ScriptedServer(echo_rewards)
    seen: list[list[str]] = []
    first.script = second.script = lambda number, payload: (seen.append(payload["query"]), echo_rewards(number, payload))[1]
    with serving(first) as url_a, serving(second) as url_b:
        client = RemoteRewardClient(f"{url_a}/get_reward, {url_b}", FAST_RETRIES)
        result = client.score([str(n) for n in range(5)], ["p"] * 5, ["l"] * 5)
        client.close()
    assert (first.num_posts, second.num_posts) == (1, 1)
    assert sorted(seen) == [["0", "1", "2"], ["3", "4"]]
    assert result.rewards == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert result.counters.num_samples == 5 and result.counters.num_timeouts == 2


def test_a_failing_server_passes_its_part_to_the_next() -> None:
    with socket.socket() as probe:  # nobody listens here
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}"
    failing = ScriptedServer(failing_first(100, status=503))
    working = ScriptedServer(echo_rewards)
    with serving(failing) as url_failing, serving(working) as url_working:
        client = RemoteRewardClient(f"{dead},{url_failing},{url_working}", FAST_RETRIES)
        result = client.score([str(n) for n in range(6)], ["p"] * 6, None)
        client.close()
    assert result.rewards == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    assert working.num_posts == 3  # its own part, then the parts the other two could not score
    assert client.num_retries == 3


def test_from_config_takes_a_comma_separated_list() -> None:
    config = RewardConfig(remote_rm_url="http://127.0.0.1:1, http://127.0.0.1:2/get_reward")
    client = RemoteRewardClient.from_config(config)
    assert client.urls == ["http://127.0.0.1:1/get_reward", "http://127.0.0.1:2/get_reward"]
    client.close()
    with pytest.raises(ValueError, match="names a reward_func file"):
        RemoteRewardClient.from_config(RewardConfig(remote_rm_url="my/reward_func.py"))

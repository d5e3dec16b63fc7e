"""The reward server over real HTTP on loopback: LMM-R1's API, concurrency, label lookup, malformed payloads."""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from lmmrl_megatron.reward.config import RewardConfig
from lmmrl_megatron.reward.labels import load_label_index, prompt_key
from lmmrl_megatron.reward.scorer import RewardScorer

from .http_helpers import get_json, post_json, reward_server

REPO_ROOT = Path(__file__).resolve().parents[2]
USER_FILE = Path(__file__).with_name("user_reward_functions.py")


def chatml_query(question: str, response: str) -> str:
    return (
        f"<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|>"
        f"<|image_pad|><|vision_end|>{question}<|im_end|>\n<|im_start|>assistant\n{response}<|im_end|><|endoftext|>"
    )


def messages(question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "image": "a.png"}, {"type": "text", "text": question}]}]


@pytest.fixture(scope="module")
def scorer() -> Iterator[RewardScorer]:
    with RewardScorer(RewardConfig(num_workers=2)) as shared:
        yield shared


@pytest.fixture(scope="module")
def server_url(scorer: RewardScorer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    data = tmp_path_factory.mktemp("data") / "train.jsonl"
    write_dataset(data)
    with reward_server(scorer, load_label_index(str(data), "message", "answer"), body_timeout_s=1.0) as url:
        yield url


def write_dataset(path: Path) -> None:
    records = [
        {"message": json.dumps(messages("How many circles?")), "answer": "3"},  # stringified, as LMM-R1 stores it
        {"message": messages("What color is the square?"), "answer": "red"},  # a plain list
        {"message": json.dumps(messages("What fraction is shaded?")), "answer": "\\frac{1}{4}"},
    ]
    path.write_text("".join(json.dumps(record) + "\n" for record in records))


def test_health(server_url: str) -> None:
    status, reply = get_json(server_url + "/health")
    assert status == 200
    assert reply["status"] == "ok"
    assert reply["functions"] == [{"name": "format", "weight": 0.5}, {"name": "accuracy", "weight": 1.0}]
    assert reply["num_dataset_prompts"] == 3


def test_lmmr1_scoring_with_labels(server_url: str) -> None:
    responses = [
        "<think>I see three.</think><answer>3</answer>",  # format and answer: 1.5
        "<think>I see three.</think>\n<answer>3</answer>",  # a newline between the tags: answer only, 1.0
        "<think>I see four.</think><answer>4</answer>",  # format only: 0.5
        "3",  # neither: 0
    ]
    payload = {
        "query": [chatml_query("How many circles?", response) for response in responses],
        "prompts": [json.dumps(messages("How many circles?"))] * 4,
        "labels": ["3"] * 4,
    }
    status, reply = post_json(server_url + "/get_reward", payload)
    assert status == 200
    assert reply["rewards"] == [1.5, 1.0, 0.5, 0.0]
    assert reply["format_rewards"] == [0.5, 0.0, 0.5, 0.0]
    assert reply["acc_rewards"] == [1.0, 1.0, 0.0, 0.0]
    assert reply["components"] == {"format": reply["format_rewards"], "accuracy": reply["acc_rewards"]}
    assert reply["counters"]["num_samples"] == 4 and reply["counters"]["num_timeouts"] == 0


def test_labels_absent_are_found_from_the_prompt_in_the_dataset(server_url: str) -> None:
    prompts = [
        json.dumps(messages("How many circles?")),
        json.dumps(messages("What color is the square?"), indent=1),  # different spacing, same messages
        json.dumps(messages("What fraction is shaded?")),
    ]
    answers = ["3", "Red", "0.25"]
    queries = [chatml_query("q", f"<think>.</think><answer>{answer}</answer>") for answer in answers]
    status, reply = post_json(server_url + "/get_reward", {"query": queries, "prompts": prompts})
    assert status == 200 and reply["acc_rewards"] == [1.0, 1.0, 1.0]
    # A null label in a list is looked up too; a wrong answer still scores 0.
    labels = [None, "blue", None]
    status, reply = post_json(server_url + "/get_reward", {"query": queries, "prompts": prompts, "labels": labels})
    assert status == 200 and reply["acc_rewards"] == [1.0, 0.0, 1.0]


def test_an_unknown_prompt_is_a_400_naming_its_index(server_url: str) -> None:
    payload = {"query": ["a", "b"], "prompts": [json.dumps(messages("How many circles?")), "never seen"]}
    status, reply = post_json(server_url + "/get_reward", payload)
    assert status == 400 and reply["key"] == "prompts[1]" and "not found" in reply["error"]


def test_many_parallel_requests_are_all_answered_correctly(server_url: str) -> None:
    def request(number: int) -> list[float]:
        right = f"<think>.</think><answer>{number}</answer>"
        wrong = f"<think>.</think><answer>{number + 1}</answer>"
        payload = {"query": [chatml_query("q", right), chatml_query("q", wrong)], "labels": [str(number)] * 2}
        status, reply = post_json(server_url + "/get_reward", payload)
        assert status == 200
        return reply["rewards"]

    with ThreadPoolExecutor(max_workers=16) as clients:
        results = list(clients.map(request, range(64)))
    assert results == [[1.5, 0.5]] * 64


MALFORMED = [
    (b"{not json", None, "not valid JSON"),
    (b"\xff\xfe", None, "not valid JSON"),
    (json.dumps([1, 2]).encode(), None, "must be a JSON object"),
    ({"prompts": ["p"], "labels": ["1"]}, "query", "'query' is required"),
    ({"query": "one string"}, "query", "must be a list of strings"),
    ({"query": ["a", 7], "labels": ["1", "2"]}, "query[1]", "must be a string"),
    ({"query": ["a", "b"], "labels": ["1"]}, "labels", "has 1 items but 'query' has 2"),
    ({"query": ["a"], "prompts": ["p", "q"], "labels": ["1"]}, "prompts", "has 2 items"),
    ({"query": ["a"], "prompts": "p", "labels": ["1"]}, "prompts", "must be a list"),
    ({"query": ["a"], "prompts": [3], "labels": ["1"]}, "prompts[0]", "must be a string"),
    ({"query": ["a"], "labels": [{"answer": 1}]}, "labels[0]", "must be a string or a number"),
    ({"query": ["a"], "labels": [True]}, "labels[0]", "must be a string or a number"),
    ({"query": ["a"]}, "prompts[0]", "prompts are needed"),
    ({"query": {"0": "a"}}, "query", "must be a list of strings"),
    ({"query": None}, "query", "must be a list of strings"),
    ({"query": ["a"], "labels": {"0": "1"}}, "labels", "must be a list"),
    ({"query": ["a"], "labels": [["1"]]}, "labels[0]", "must be a string or a number"),
    ({"query": ["a"], "labels": [None], "prompts": [None]}, "prompts[0]", "prompts are needed"),
    # nested too deeply to decode: named by the top-level key it is under (a 500 RecursionError before)
    (b'{"query": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "query", "nested too deeply"),
    (b'{"query": ["a"], "labels": ' + b'{"x":' * 50_000 + b"1" + b"}" * 50_000 + b"}", "labels", "nested too deeply"),
    (b"[" * 1_000_000, None, "nested too deeply"),
    # nested, but shallow enough to decode: the type checks name the key
    ({"query": ["a"], "labels": [[[[[[[[[["1"]]]]]]]]]]}, "labels[0]", "must be a string or a number"),
]


@pytest.mark.parametrize(("payload", "key", "message"), MALFORMED)
def test_malformed_payloads_get_a_400_naming_the_key(
    server_url: str, payload: object, key: str | None, message: str
) -> None:
    status, reply = post_json(server_url + "/get_reward", payload)
    assert status == 400
    assert reply["key"] == key
    assert message in reply["error"]


def test_labels_absent_without_a_dataset_is_a_400(scorer: RewardScorer) -> None:
    with reward_server(scorer, label_index=None) as url:
        status, reply = post_json(url + "/get_reward", {"query": ["a"], "prompts": ["p"]})
    assert status == 400 and reply["key"] == "labels" and "without --data" in reply["error"]


def test_unknown_routes_and_methods(server_url: str) -> None:
    assert get_json(server_url + "/nope")[0] == 404
    assert post_json(server_url + "/nope", {"query": []})[0] == 404
    assert get_json(server_url + "/get_reward")[0] == 405
    assert post_json(server_url + "/health", {})[0] == 405


def test_a_body_without_content_length_is_refused(server_url: str) -> None:
    host, port = server_url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    connection.putrequest("POST", "/get_reward")
    connection.endheaders()
    response = connection.getresponse()
    assert response.status == 411 and "Content-Length" in json.loads(response.read())["error"]
    connection.close()


def raw_request(url: str, head: bytes, body: bytes = b"") -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    connection = socket.create_connection((host, int(port)), timeout=30)
    connection.sendall(head + b"\r\n\r\n" + body)
    return connection


def read_reply(connection: socket.socket) -> tuple[int, dict, bytes]:
    """Status, JSON body and the headers of the reply on a raw socket, read until the server closes it."""
    data = b""
    while chunk := connection.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body), head


def test_a_body_shorter_than_its_content_length_times_out_without_holding_up_others(server_url: str) -> None:
    stalled = raw_request(
        server_url, b"POST /get_reward HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000",
        b'{"query": ["never fini',
    )
    started = time.monotonic()
    # While that body is pending, other requests are served as usual.
    payload = {"query": [chatml_query("q", "<think>.</think><answer>1</answer>")], "labels": ["1"]}
    status, reply = post_json(server_url + "/get_reward", payload)
    assert status == 200 and reply["rewards"] == [1.5]
    status, reply, head = read_reply(stalled)  # the server answers and closes the connection
    assert status == 408 and reply["key"] is None
    assert "did not arrive within 1.0 s (22 of 1000 bytes)" in reply["error"]
    assert b"connection: close" in head.lower()
    assert time.monotonic() - started < 30
    stalled.close()


def test_bad_content_lengths_are_refused(server_url: str) -> None:
    for content_length in (b"ten", b"-5"):  # the HTTP layer (h11) refuses these before the application sees them
        connection = raw_request(server_url, b"POST /get_reward HTTP/1.1\r\nHost: x\r\nContent-Length: " + content_length)
        data = b""
        while chunk := connection.recv(65536):
            data += chunk
        connection.close()
        assert data.startswith(b"HTTP/1.1 400 ") and b"Invalid HTTP request" in data
    connection = raw_request(server_url, b"POST /get_reward HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999")
    status, reply, _ = read_reply(connection)
    connection.close()
    assert status == 413 and reply == {"error": "body over 536870912 bytes", "key": None}


def test_two_hundred_concurrent_clients_are_all_answered(server_url: str) -> None:
    # http.server's listen backlog of 5 dropped some of 200 concurrent connections; uvicorn's is 2048.
    barrier = threading.Barrier(200)

    def request(number: int) -> list[float]:
        payload = {"query": [chatml_query("q", f"<think>.</think><answer>{number}</answer>")], "labels": [str(number)]}
        barrier.wait(timeout=60)
        status, reply = post_json(server_url + "/get_reward", payload, timeout_s=300)
        assert status == 200, reply
        return reply["rewards"]

    with ThreadPoolExecutor(max_workers=200) as clients:
        results = list(clients.map(request, range(200)))
    assert results == [[1.5]] * 200


def test_health_counts_requests_and_their_failures(server_url: str) -> None:
    before = get_json(server_url + "/health")[1]
    queries = [chatml_query("q", "<think>.</think><answer>9^{9^{9^{9}}}</answer>")]
    assert post_json(server_url + "/get_reward", {"query": queries, "labels": ["3"]})[0] == 200
    after = get_json(server_url + "/health")[1]
    assert after["num_requests"] == before["num_requests"] + 1
    assert after["totals"]["num_rejected"] == before["totals"]["num_rejected"] + 1
    assert after["math_timeout_s"] == 3.0 and "messages" not in after["totals"]


def test_a_hanging_reward_function_times_out_inside_the_request() -> None:
    config = RewardConfig(
        functions=[{"name": f"{USER_FILE}:sleeps_on_hang", "weight": 1.0}, {"name": "accuracy", "weight": 1.0}],
        num_workers=2,
        timeout_s=0.5,
    )
    with RewardScorer(config) as scorer, reward_server(scorer) as url:
        queries = [chatml_query("q", "<answer>1</answer>"), chatml_query("q", "<answer>1</answer> hang")]
        status, reply = post_json(url + "/get_reward", {"query": queries, "labels": ["1", "1"]})
    assert status == 200
    assert reply["rewards"] == [2.0, 1.0]
    assert reply["counters"]["num_timeouts"] == 1
    assert reply["format_rewards"] == [0.0, 0.0]  # no format term configured: zeros, as LMM-R1 with it disabled


def test_label_index_keys_ignore_json_spacing_and_key_order() -> None:
    assert prompt_key('[{"role": "user", "content": "hi"}]') == prompt_key([{"content": "hi", "role": "user"}])
    assert prompt_key("  plain text prompt ") == "plain text prompt"


def test_dataset_errors_name_file_and_line_or_are_skipped_and_counted(tmp_path: Path) -> None:
    data = tmp_path / "bad.jsonl"
    good = json.dumps({"message": messages("q1"), "answer": "1"})
    data.write_text(f'{good}\n\n{json.dumps({"message": messages("q2")})}\n{{oops\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:3: empty_answer"):
        load_label_index(str(data), "message", "answer")
    index = load_label_index(str(data), "message", "answer", bad_input="skip")
    assert index.lookup(json.dumps(messages("q1"))) == "1" and len(index.answers) == 1
    assert index.skipped == "2 skipped (malformed_json=1, empty_answer=1)"


def test_label_index_reads_other_sources_and_counts_conflicts(tmp_path: Path) -> None:
    as_json = tmp_path / "data.json"
    records = [{"prompt": messages("p1"), "solution": 2}, {"prompt": json.dumps(messages("p1")), "solution": 3}]
    as_json.write_text(json.dumps(records))
    index = load_label_index(str(as_json), "prompt", "solution")
    assert index.lookup(json.dumps(messages("p1"))) == "2" and index.num_conflicts == 1


def test_command_line_server_answers_and_stops_on_sigterm(tmp_path: Path) -> None:
    data = tmp_path / "train.jsonl"
    write_dataset(data)
    command = [
        sys.executable, "-m", "lmmrl_megatron.reward.server", "--port", "0", "--data", str(data),
        "--input-key", "message", "--label-key", "answer", "--prompt-template", "chatml", "--num-workers", "1",
        "--function", "accuracy=2", "--function", f"{USER_FILE}:mentions_prompt=1",
    ]  # fmt: skip
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment)
    try:
        line = process.stdout.readline()
        assert line.startswith("reward server listening on http://127.0.0.1:"), process.stderr.read()
        url = line.split()[-1]
        prompt = json.dumps(messages("How many circles?"))
        query = chatml_query("How many circles?", f"<answer>3</answer> {prompt}")
        status, reply = post_json(url + "/get_reward", {"query": [query], "prompts": [prompt]})
        assert status == 200
        assert reply["rewards"] == [3.0]  # 2 * accuracy + the user function seeing the prompt
        assert reply["format_rewards"] == [0.0]
    finally:
        process.terminate()
        assert process.wait(timeout=30) == 0


def test_command_line_errors_exit_with_a_message(tmp_path: Path) -> None:
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    command = [sys.executable, "-m", "lmmrl_megatron.reward.server", "--data", str(tmp_path / "missing.jsonl")]
    finished = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=60)
    assert finished.returncode == 2
    assert "missing.jsonl': no such file" in finished.stderr


# LMM-R1's launch line for its math verifier (examples/scripts/lmm_r1/*.sh), with our module in place of
# `openrlhf.models.remote_rm.math_verifier`.
LMMR1_LAUNCH = ["--dataset", "{data}", "--input_key", "message", "--prompt-template", "chatml"]
LMMR1_TEMPLATES = ["chatml", "qwen1", "base", "phi3", "phi4", "gemma3"]


def lmmr1_records() -> list[dict]:
    """Records as LMM-R1's example data has them: the messages as a JSON string, a boxed LaTeX answer."""
    system = {"role": "system", "content": "Put the final answer in \\boxed{} inside <answer> </answer>."}
    questions = [("Which number replaces the question mark?", "$\\boxed{60}$"),
                 ("Which bike is most expensive?\n\nA. A\nB. B\nC. C", "$\\boxed{A}$")]
    return [
        {"question": question, "answer": answer,
         "message": json.dumps([system, {"role": "user", "content": [
             {"type": "text", "text": question}, {"type": "image", "image": "images/1.jpg"}]}])}
        for question, answer in questions
    ]


def test_lmmr1_launch_line_flags_are_accepted_unchanged(tmp_path: Path) -> None:
    from lmmrl_megatron.reward.server import build_arg_parser

    line = [part.format(data=tmp_path / "a.jsonl") for part in LMMR1_LAUNCH]
    args = build_arg_parser().parse_args(line)
    assert (args.data, args.input_key, args.prompt_template) == (str(tmp_path / "a.jsonl"), "message", "chatml")
    for template in LMMR1_TEMPLATES:
        assert build_arg_parser().parse_args(["--prompt-template", template]).prompt_template == template
    args = build_arg_parser().parse_args(["--log_file", "rm.log", "--disable-format-reward", "--dataset", "a,b"])
    assert (args.log_file, args.disable_format_reward, args.data) == ("rm.log", True, "a,b")


def test_lmmr1_launch_line_serves_lmmr1_client_code(tmp_path: Path) -> None:
    import requests

    records = lmmr1_records()
    (tmp_path / "first.jsonl").write_text(json.dumps(records[0]) + "\n")
    (tmp_path / "second.json").write_text(json.dumps(records[1:]))  # LMM-R1's --dataset takes .json lists too
    data = f"{tmp_path / 'first.jsonl'},{tmp_path / 'second.json'}"
    log_file = tmp_path / "remote_rm.log"
    log_file.write_text("an old run's log\n")
    # LMM-R1's line unchanged, plus a free port (LMM-R1 always takes 5000, which another run here may hold).
    command = [sys.executable, "-m", "lmmrl_megatron.reward.server",
               *[part.format(data=data) for part in LMMR1_LAUNCH], "--log_file", str(log_file), "--port", "0"]
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment)
    try:
        line = process.stdout.readline()
        assert line.startswith("reward server listening on http://127.0.0.1:"), process.stderr.read()
        url = line.split()[-1] + "/get_reward"
        responses = ["<think>count</think><answer> The answer is $\\boxed{60}$ </answer>",
                     "<think>compare</think><answer> The answer is $\\boxed{A}$ </answer>",
                     "<think>compare</think><answer> The answer is $\\boxed{A}$ or $\\boxed{B}$ </answer>"]
        prompts = [records[0]["message"], records[1]["message"], records[1]["message"]]
        queries = [chatml_query("q", response) for response in responses]
        labels = [records[0]["answer"], records[1]["answer"], records[1]["answer"]]
        # What LMM-R1's trainer does (openrlhf/utils/remote_rm_utils.py): POST json, read "rewards".
        reply = requests.post(url=url, json={"query": queries, "prompts": prompts, "labels": labels},
                              headers={"Content-Type": "application/json"}, timeout=180)
        reply.raise_for_status()
        assert reply.json()["rewards"] == [1.5, 1.5, 0.5]
        assert reply.json()["format_rewards"] == [0.5, 0.5, 0.5] and reply.json()["acc_rewards"] == [1.0, 1.0, 0.0]
        # Without labels, the answers come from the --dataset files.
        reply = requests.post(url=url, json={"query": queries, "prompts": prompts}, timeout=180)
        assert reply.status_code == 200 and reply.json()["rewards"] == [1.5, 1.5, 0.5]
    finally:
        process.terminate()
        assert process.wait(timeout=60) == 0
    log = log_file.read_text()
    assert "an old run's log" not in log  # emptied at start, as LMM-R1 removes its log file
    assert "prompts with answers" in log and "format reward is enabled" in log

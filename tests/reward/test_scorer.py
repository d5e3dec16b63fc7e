"""Scoring through the verifier pool: weighted sums, and timeouts, errors, bad returns and crashes counted as 0."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from lmmrl_megatron.reward.config import RewardConfig
from lmmrl_megatron.reward.scorer import RewardScorer

USER_FILE = Path(__file__).with_name("user_reward_functions.py")
RIGHT = "<think>two circles and a square</think><answer>3</answer>"  # 52 characters
WRONG_FORMAT_RIGHT_ANSWER = "It is \\boxed{3}"
WRONG = "<think>hmm</think><answer>4</answer>"


def user(name: str) -> str:
    return f"{USER_FILE}:{name}"


@pytest.fixture(scope="module")
def weighted_scorer() -> Iterator[RewardScorer]:
    config = RewardConfig(
        functions=[
            {"name": "format", "weight": 0.5},
            {"name": "accuracy", "weight": 1.0},
            {"name": user("length_bonus"), "weight": -0.1},
        ],
        num_workers=2,
    )
    with RewardScorer(config) as scorer:
        yield scorer


def test_weighted_sum_of_functions(weighted_scorer: RewardScorer) -> None:
    result = weighted_scorer.score([RIGHT, WRONG_FORMAT_RIGHT_ANSWER, WRONG], ["3", "3", "3"])
    lengths = [len(RIGHT), len(WRONG_FORMAT_RIGHT_ANSWER), len(WRONG)]
    assert result.components["format"] == [0.5, 0.0, 0.5]
    assert result.components["accuracy"] == [1.0, 1.0, 0.0]
    assert result.components[user("length_bonus")] == pytest.approx([-0.1 * n / 10 for n in lengths])
    expected = [0.5 + 1.0 - 0.01 * lengths[0], 1.0 - 0.01 * lengths[1], 0.5 - 0.01 * lengths[2]]
    assert result.rewards == pytest.approx(expected)
    assert result.counters.num_samples == 3 and result.counters.num_calls == 9
    assert result.counters.num_failures == 0


def test_prompts_reach_user_functions() -> None:
    config = RewardConfig(functions=[{"name": user("mentions_prompt"), "weight": 1.0}], num_workers=1)
    with RewardScorer(config) as scorer:
        result = scorer.score(["the sky is blue", "grass"], ["", ""], prompts=["sky", "sky"])
    assert result.rewards == [1.0, 0.0]


def test_empty_batch_and_length_mismatch(weighted_scorer: RewardScorer) -> None:
    empty = weighted_scorer.score([], [])
    assert empty.rewards == [] and empty.components["accuracy"] == []
    with pytest.raises(ValueError, match="2 responses but 1 labels"):
        weighted_scorer.score([RIGHT, WRONG], ["3"])


def test_failures_score_zero_are_counted_and_never_stall_the_batch() -> None:
    config = RewardConfig(
        functions=[
            {"name": "accuracy", "weight": 1.0},
            {"name": user("sleeps_forever"), "weight": 1.0},
            {"name": user("raises"), "weight": 1.0},
            {"name": user("returns_text"), "weight": 1.0},
            {"name": user("returns_nan"), "weight": 1.0},
            {"name": user("exits_process"), "weight": 1.0},
        ],
        num_workers=2,
        timeout_s=0.5,
    )
    with RewardScorer(config) as scorer:
        result = scorer.score([RIGHT, WRONG], ["3", "3"])
        assert result.rewards == [1.0, 0.0]  # only accuracy contributes
        counters = result.counters
        assert (counters.num_timeouts, counters.num_errors, counters.num_bad_returns, counters.num_crashes) == (
            2, 2, 4, 2
        )
        assert counters.num_calls == 12 and counters.num_failures == 10
        assert any("RuntimeError: cannot score" in message for message in counters.messages)
        # Two timeouts and two crashes: four workers replaced, and the pool still works afterwards.
        assert scorer.num_worker_restarts == 4
        again = scorer.score([RIGHT], ["3"])
        assert again.rewards == [1.0]


def test_a_hung_sample_costs_only_itself() -> None:
    config = RewardConfig(functions=[{"name": user("sleeps_on_hang"), "weight": 1.0}], num_workers=2, timeout_s=0.5)
    with RewardScorer(config) as scorer:
        result = scorer.score(["fine", "hang", "fine", "fine", "hang", "fine"], [""] * 6)
    assert result.rewards == [1.0, 0.0, 1.0, 1.0, 0.0, 1.0]
    assert result.counters.num_timeouts == 2


def test_a_parser_error_on_the_label_scores_zero_and_counts() -> None:
    with RewardScorer(RewardConfig(functions=[{"name": "accuracy", "weight": 1.0}], num_workers=1)) as scorer:
        result = scorer.score([RIGHT, RIGHT], ["3", "$$"])
    assert result.rewards == [1.0, 0.0]
    assert result.counters.num_errors == 1
    assert "LabelParseError" in result.counters.messages[0]


def test_concurrent_callers_share_the_pool(weighted_scorer: RewardScorer) -> None:
    answers = {thread: [] for thread in range(6)}

    def score_batch(thread: int) -> None:
        labels = [str(thread + i) for i in range(5)]
        responses = [f"<think>t</think><answer>{thread + i if i % 2 == 0 else -1}</answer>" for i in range(5)]
        answers[thread] = weighted_scorer.score(responses, labels).components["accuracy"]

    threads = [threading.Thread(target=score_batch, args=(thread,)) for thread in answers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(values == [1.0, 0.0, 1.0, 0.0, 1.0] for values in answers.values())


def test_missing_user_function_fails_at_construction() -> None:
    config = RewardConfig(functions=[{"name": user("missing_function"), "weight": 1.0}], num_workers=1)
    with pytest.raises(ValueError, match="defines no 'missing_function'"):
        RewardScorer(config)


def test_workers_never_rerun_the_callers_main_module(tmp_path: Path) -> None:
    # A script with no `if __name__ == "__main__":` guard: multiprocessing's spawn would run it again in every
    # worker; fresh worker interpreters must not.
    script = tmp_path / "score_without_guard.py"
    script.write_text(
        "from lmmrl_megatron.reward import RewardConfig, RewardScorer\n"
        "print('script body ran', flush=True)\n"
        "with RewardScorer(RewardConfig(num_workers=2)) as scorer:\n"
        "    print(scorer.score(['<think>.</think><answer>2</answer>'] * 4, ['2'] * 4).rewards, flush=True)\n"
    )
    environment = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    finished = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=environment, timeout=120, cwd=tmp_path
    )
    assert finished.returncode == 0, finished.stderr
    assert finished.stdout.splitlines() == ["script body ran", "[1.5, 1.5, 1.5, 1.5]"]

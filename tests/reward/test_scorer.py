"""Scoring through the verifier pool: weighted sums, and timeouts, errors, bad returns and crashes counted as 0."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lmmrl_megatron.reward.config import RewardConfig
from lmmrl_megatron.reward.pool import KILL_GRACE_S
from lmmrl_megatron.reward.results import RewardCounters
from lmmrl_megatron.reward.scorer import BatchFunctionScorer, RewardScorer

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
        # The timeouts interrupt the call inside its worker; only the two crashes cost a worker, and the pool
        # still works afterwards.
        assert scorer.num_worker_restarts == 2
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


def test_a_call_that_ignores_its_time_limit_is_killed_and_its_worker_replaced() -> None:
    config = RewardConfig(functions=[{"name": user("swallows_interrupts"), "weight": 1.0}], num_workers=1,
                          timeout_s=0.3)
    with RewardScorer(config) as scorer:
        scorer.wait_until_ready()
        started = time.monotonic()
        result = scorer.score(["x"], [""])
        took = time.monotonic() - started
        assert result.rewards == [0.0] and result.counters.num_timeouts == 1
        assert "killed" in result.counters.messages[0]
        assert scorer.num_worker_restarts == 1
        assert took < 0.3 + KILL_GRACE_S + 30  # the kill, not the function, ended it (30 s of slack for a busy CI)


# Answers that pass the pre-check but keep sympy busy for seconds each (it expands them while comparing).
SLOW = [f"<answer>(x+{k})^{{100}}(x-1)^{{100}}</answer>" for k in range(2, 8)]
TOWERS = [f"<answer>{k}^{{{k}^{{{k}^{{{k}}}}}}}</answer>" for k in range(3, 11)]
GOOD = ["<answer>\\frac{2}{4}</answer>", "<answer>(y+2)^2</answer>"]
GOOD_LABELS = ["0.5", "y^2+4y+4"]


@pytest.fixture(scope="module")
def accuracy_pool() -> Iterator[RewardScorer]:
    config = RewardConfig(functions=[{"name": "accuracy", "weight": 1.0}], num_workers=2, math_timeout_s=0.5)
    with RewardScorer(config) as scorer:
        scorer.wait_until_ready()
        yield scorer


def test_a_fresh_pool_scores_its_first_symbolic_answers_right(accuracy_pool: RewardScorer) -> None:
    # Warm workers: the first comparisons of a fresh interpreter would otherwise cost seconds, which a small
    # math limit would turn into timeouts. (The fixture's pool has served nothing before this test.)
    result = accuracy_pool.score(GOOD, GOOD_LABELS)
    assert result.rewards == [1.0, 1.0] and result.counters.num_failures == 0


def test_power_towers_are_refused_at_once_and_do_not_hold_up_a_good_answer(accuracy_pool: RewardScorer) -> None:
    towers = accuracy_pool.submit(TOWERS, ["3"] * len(TOWERS))
    time.sleep(0.2)
    started = time.monotonic()
    good = accuracy_pool.score(GOOD, GOOD_LABELS)
    took = time.monotonic() - started
    refused = towers.result()
    assert good.rewards == [1.0, 1.0] and good.counters.num_failures == 0
    assert refused.rewards == [0.0] * len(TOWERS)
    assert refused.counters.num_rejected == len(TOWERS) and refused.counters.num_failures == 0
    assert "power" in refused.counters.messages[0]
    assert accuracy_pool.num_worker_restarts == 0
    assert took < 10  # the towers cost nothing; before the pre-check, each held a worker for the whole timeout


def test_slow_answers_time_out_in_the_worker_and_a_good_request_is_served_in_between(
    accuracy_pool: RewardScorer,
) -> None:
    slow = accuracy_pool.submit(SLOW, ["x^2"] * len(SLOW))
    time.sleep(0.2)
    good = accuracy_pool.submit(GOOD, GOOD_LABELS)
    good_result = good.result()
    good_done = time.monotonic()
    slow_result = slow.result()
    slow_done = time.monotonic()
    assert good_result.rewards == [1.0, 1.0] and good_result.counters.num_failures == 0
    assert slow_result.rewards == [0.0] * len(SLOW)
    assert slow_result.counters.num_timeouts == len(SLOW)
    assert all("CPU time" in message for message in slow_result.counters.messages)
    # Round-robin between the two requests: the good one was answered after about one slow answer per worker,
    # not after all six; and a CPU-time limit that fires costs no worker.
    assert good_done < slow_done
    assert accuracy_pool.num_worker_restarts == 0


def test_counters_become_training_metrics() -> None:
    counters = RewardCounters(num_samples=4, num_calls=8, num_timeouts=2, num_errors=1, num_rejected=3)
    assert counters.to_metrics() == {
        "reward/num_failures": 3.0, "reward/num_timeouts": 2.0, "reward/num_errors": 1.0,
        "reward/num_bad_returns": 0.0, "reward/num_crashes": 0.0, "reward/num_rejected": 3.0,
    }


BATCH_FILE = Path(__file__).with_name("batch_reward_functions.py")


def test_an_openrlhf_reward_func_file_scores_whole_batches() -> None:
    config = RewardConfig(functions=[], remote_rm_url=str(Path(__file__).with_name("reward_func.py")), num_workers=2)
    with BatchFunctionScorer(config) as scorer:
        result = scorer.score(["q: 1 a: 1", "q: 2 a: 3", "q: 3 a: 3"], ["p"] * 3, ["1", "2", "3"])
    assert result.rewards == [1.0, 0.0, 1.0]
    assert result.counters.num_samples == 3 and result.counters.num_failures == 0


@pytest.mark.parametrize(
    ("function", "status"),
    [("returns_dict", None), ("returns_nested_list", None), ("returns_too_few", "num_bad_returns"),
     ("raises", "num_errors"), ("hangs", "num_timeouts")],
)
def test_reward_func_return_conventions_and_failures(function: str, status: str | None) -> None:
    config = RewardConfig(functions=[], remote_rm_url=f"{BATCH_FILE}:{function}", num_workers=1, timeout_s=0.2)
    with BatchFunctionScorer(config) as scorer:
        result = scorer.score(["a", "b"], ["p", "p"], ["1", "2"])
    if status is None:
        assert result.rewards == [0.5, 0.25] and result.counters.num_failures == 0
    else:
        assert result.rewards == [0.0, 0.0] and getattr(result.counters, status) == 1


def test_a_reward_func_file_is_checked_when_the_scorer_starts() -> None:
    with pytest.raises(ValueError, match="defines no 'reward_func'"):
        BatchFunctionScorer(RewardConfig(functions=[], remote_rm_url=str(BATCH_FILE)))
    with pytest.raises(ValueError, match=r"must accept \(queries: list\[str\], prompts: list\[str\]"):
        BatchFunctionScorer(RewardConfig(functions=[], remote_rm_url=f"{USER_FILE}:takes_two_arguments"))

"""The signal-based time limits that verifier workers put around reward functions and math-verify's steps."""

from __future__ import annotations

import threading
import time

import pytest

from lmmrl_megatron.reward.timelimits import TimeLimitExceeded, cpu_time_limit, wall_time_limit


def spin(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def test_a_wall_time_limit_interrupts_sleep_and_computation() -> None:
    started = time.monotonic()
    with pytest.raises(TimeLimitExceeded, match="took more than 0.2 s"):
        with wall_time_limit(0.2, "sleeping"):
            time.sleep(30)
    assert time.monotonic() - started < 10
    with pytest.raises(TimeLimitExceeded):
        with wall_time_limit(0.2, "a big power"):
            base = 9
            base ** (base**9)  # CPython's big-integer power returns to the interpreter often enough to be stopped


def test_a_cpu_time_limit_counts_work_not_waiting() -> None:
    with cpu_time_limit(0.2, "sleeping"):
        time.sleep(0.5)  # no CPU used: the limit does not fire
    with pytest.raises(TimeLimitExceeded, match="more than 0.2 s of CPU time"):
        with cpu_time_limit(0.2, "spinning"):
            spin(30)


def test_limits_are_disarmed_after_their_block_and_can_be_combined() -> None:
    with wall_time_limit(0.3, "outer"), cpu_time_limit(5.0, "inner"):
        spin(0.05)
    time.sleep(0.5)  # a leftover timer would raise here
    with pytest.raises(TimeLimitExceeded, match="inner"):
        with wall_time_limit(30, "outer"), cpu_time_limit(0.2, "inner"):
            spin(30)


def test_the_limit_is_not_swallowed_by_except_exception() -> None:
    with pytest.raises(TimeLimitExceeded):
        with wall_time_limit(0.2, "a careless function"):
            try:
                time.sleep(30)
            except Exception:
                pass


def test_off_the_main_thread_the_limits_do_nothing() -> None:
    finished = []

    def work() -> None:
        with wall_time_limit(0.01, "thread"), cpu_time_limit(0.01, "thread"):
            time.sleep(0.1)
        finished.append(True)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert finished == [True]

"""User reward functions for the tests, loaded by path as `tests/reward/user_reward_functions.py:NAME`."""

from __future__ import annotations

import os
import time


def length_bonus(response: str, label: str, prompt: str) -> float:
    """One point per 10 characters of response, to tell samples apart in weighted sums."""
    return len(response) / 10


def mentions_prompt(response: str, label: str, prompt: str) -> int:
    return int(prompt in response)


def sleeps_forever(response: str, label: str, prompt: str) -> float:
    while True:
        time.sleep(60)


def swallows_interrupts(response: str, label: str, prompt: str) -> float:
    """Never gives up, even when its time limit interrupts it: what code stuck in C looks like to the pool."""
    while True:
        try:
            time.sleep(60)
        except BaseException:
            pass


def sleeps_on_hang(response: str, label: str, prompt: str) -> float:
    """Hangs only on responses containing 'hang', to check that one stuck sample costs only itself."""
    while "hang" in response:
        time.sleep(60)
    return 1.0


def raises(response: str, label: str, prompt: str) -> float:
    raise RuntimeError(f"cannot score {response!r}")


def returns_text(response: str, label: str, prompt: str) -> str:
    return "1.0"


def returns_nan(response: str, label: str, prompt: str) -> float:
    return float("nan")


def exits_process(response: str, label: str, prompt: str) -> float:
    os._exit(3)


def takes_two_arguments(response: str, label: str) -> float:
    return 0.0


NOT_A_FUNCTION = 42

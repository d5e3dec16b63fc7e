"""Time limits that interrupt Python code from inside a verifier process, with timer signals.

Two independent timers, so they can be armed together:
- `wall_time_limit`: real time (SIGALRM). The worker puts every reward-function call under one, so a sleeping or
  spinning user function ends with a timeout instead of a kill.
- `cpu_time_limit`: CPU time of the process (SIGPROF). math-verify's parse and verify steps run under one, so a
  busy machine (many processes sharing two cores) never turns a correct answer into a timeout: only work done
  counts, not time spent waiting for a core.

A signal reaches Python between bytecodes, which covers sympy and even CPython's own big-integer arithmetic; a C
loop that never returns to the interpreter is what the pool's kill after `timeout_s` is for. Off the main thread
(where signal handlers cannot be installed) both are no-ops.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class TimeLimitExceeded(BaseException):
    """A time limit ran out. A BaseException, so that `except Exception` in sympy or user code does not swallow it."""


@contextmanager
def wall_time_limit(seconds: float | None, what: str) -> Iterator[None]:
    with _time_limit(signal.ITIMER_REAL, signal.SIGALRM, seconds, f"{what} took more than {seconds} s"):
        yield


@contextmanager
def cpu_time_limit(seconds: float | None, what: str) -> Iterator[None]:
    with _time_limit(signal.ITIMER_PROF, signal.SIGPROF, seconds, f"{what} used more than {seconds} s of CPU time"):
        yield


@contextmanager
def _time_limit(timer: int, signal_number: int, seconds: float | None, message: str) -> Iterator[None]:
    if seconds is None or threading.current_thread() is not threading.main_thread():
        yield
        return
    armed = True

    def expire(signum: int, frame: object) -> None:
        if armed:  # a signal that arrives while disarming must not raise outside the block
            raise TimeLimitExceeded(message)

    previous = signal.signal(signal_number, expire)
    signal.setitimer(timer, seconds)
    try:
        yield
    finally:
        armed = False
        signal.setitimer(timer, 0)
        signal.signal(signal_number, previous)

"""A verifier worker process: `python -m lmmrl_megatron.reward.worker FD PARENT_PID`, driven by `pool.py`.

It is a fresh interpreter rather than a multiprocessing child so that it never re-imports the caller's main
module (a training script with torch, Ray and Megatron, or a user script without an `if __name__ == "__main__"`
guard). Protocol over the connection on file descriptor FD: the parent sends a `WorkerStart`; the worker loads the
reward functions, warms math-verify up, and answers None (or a message saying why it could not start), then
answers each `VerifyTask` with a `TaskOutcome` and each `BatchTask` with a `BatchOutcome` until the connection
closes.

Every call runs under a real-time limit (`WorkerStart.timeout_s`, times the samples of a batch task), and the
`accuracy` function's math-verify steps under a CPU-time limit (`math_timeout_s`): a call that runs out ends
with a 'timeout' outcome and the worker goes on. Only code that never returns to the interpreter needs the
pool's kill.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable
from multiprocessing.connection import Connection

from lmmrl_megatron.reward.protocol import (
    MAX_DETAIL_CHARS,
    BatchOutcome,
    BatchTask,
    Outcome,
    Task,
    TaskOutcome,
    VerifyTask,
    WorkerStart,
)

# Answers of the kinds `accuracy` meets, checked once at start: the first symbolic comparison of a fresh
# interpreter imports and caches much of sympy and costs far more than the later ones.
WARM_UP = [
    ("<answer>\\frac{1}{2}</answer>", "0.5"),
    ("<answer>(1, 2]</answer>", "(1,2]"),
    ("<answer>50\\%</answer>", "0.5"),
    ("<answer>x = 3</answer>", "3"),
    ("<answer>(x+1)^2</answer>", "x^2+2x+1"),
    ("<answer>2^{1/2}</answer>", "\\sqrt{2}"),
    ("<answer>\\{1, 2\\}</answer>", "\\{2,1\\}"),
    ("<answer>(B)</answer>", "B"),
    ("<answer>red</answer>", "red"),
]


def _die_with_parent(parent_pid: int) -> None:
    """Ask Linux to kill this process when its parent dies: a worker stuck in sympy would otherwise linger."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def serve(connection: Connection) -> None:
    start: WorkerStart = connection.recv()
    # The parent's import path first, so user reward files can import whatever the parent can.
    sys.path[:] = [*start.sys_path, *(entry for entry in sys.path if entry not in start.sys_path)]
    from lmmrl_megatron.reward.functions import accuracy_reward, builtin_reward_functions
    from lmmrl_megatron.reward.user_functions import load_batch_reward_function, load_reward_function

    try:
        builtins = builtin_reward_functions(start.format_kind, start.math_timeout_s)
        functions = [
            builtins[name] if name in builtins else load_reward_function(name) for name in start.function_names
        ]
        batch_function = load_batch_reward_function(start.batch_function) if start.batch_function else None
        if "accuracy" in start.function_names:
            for response, label in WARM_UP:
                accuracy_reward(response, label)
    except BaseException as error:  # report any start failure to the parent rather than dying silently
        connection.send(f"{type(error).__name__}: {error}"[:MAX_DETAIL_CHARS])
        return
    connection.send(None)
    while True:
        try:
            task: Task = connection.recv()
        except (EOFError, OSError):
            return
        connection.send(run_task(task, functions, batch_function, start.timeout_s))


def run_task(task: Task, functions: list[Callable[..., object]], batch_function: Callable[..., object] | None,
             timeout_s: float) -> Outcome:
    """One task under its real-time limit; whatever the function does becomes an outcome."""
    from lmmrl_megatron.reward.functions import AnswerRejected
    from lmmrl_megatron.reward.timelimits import TimeLimitExceeded, wall_time_limit
    from lmmrl_megatron.reward.user_functions import BadRewardValue, as_reward_value, as_reward_values

    try:
        with wall_time_limit(task.limit_s(timeout_s), "the reward function"):
            if isinstance(task, BatchTask):
                raw = batch_function(list(task.queries), list(task.prompts), list(task.labels))
                return BatchOutcome(as_reward_values(raw, len(task.queries)), "ok")
            assert isinstance(task, VerifyTask)
            raw = functions[task.function_index](task.response, task.label, task.prompt)
            return TaskOutcome(as_reward_value(raw), "ok")
    except TimeLimitExceeded as error:
        return task.failed("timeout", str(error)[:MAX_DETAIL_CHARS])
    except AnswerRejected as error:
        return task.failed("rejected", str(error)[:MAX_DETAIL_CHARS])
    except BadRewardValue as error:
        return task.failed("bad_return", str(error)[:MAX_DETAIL_CHARS])
    except BaseException as error:  # even sys.exit in a user function only costs this sample
        return task.failed("error", f"{type(error).__name__}: {error}"[:MAX_DETAIL_CHARS])


def main() -> None:
    file_descriptor, parent_pid = int(sys.argv[1]), int(sys.argv[2])
    _die_with_parent(parent_pid)
    # Ctrl-C reaches the whole process group; the parent decides when workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    serve(Connection(file_descriptor))


if __name__ == "__main__":
    main()

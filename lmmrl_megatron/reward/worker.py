"""A verifier worker process: `python -m lmmrl_megatron.reward.worker FD PARENT_PID`, driven by `pool.py`.

It is a fresh interpreter rather than a multiprocessing child so that it never re-imports the caller's main
module (a training script with torch, Ray and Megatron, or a user script without an `if __name__ == "__main__"`
guard). Protocol over the connection on file descriptor FD: the parent sends a `WorkerStart`; the worker answers
None when its reward functions are loaded (or a message saying why not), then answers each `VerifyTask` with a
`TaskOutcome` until the connection closes.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from multiprocessing.connection import Connection

from lmmrl_megatron.reward.protocol import MAX_DETAIL_CHARS, TaskOutcome, VerifyTask, WorkerStart


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
    from lmmrl_megatron.reward.functions import builtin_reward_functions
    from lmmrl_megatron.reward.user_functions import BadRewardValue, as_reward_value, load_reward_function

    try:
        builtins = builtin_reward_functions(start.format_kind)
        functions = [
            builtins[name] if name in builtins else load_reward_function(name) for name in start.function_names
        ]
    except BaseException as error:  # report any start failure to the parent rather than dying silently
        connection.send(f"{type(error).__name__}: {error}"[:MAX_DETAIL_CHARS])
        return
    connection.send(None)
    while True:
        try:
            task: VerifyTask = connection.recv()
        except (EOFError, OSError):
            return
        try:
            raw = functions[task.function_index](task.response, task.label, task.prompt)
            outcome = TaskOutcome(value=as_reward_value(raw), status="ok")
        except BadRewardValue as error:
            outcome = TaskOutcome(0.0, "bad_return", str(error)[:MAX_DETAIL_CHARS])
        except BaseException as error:  # even sys.exit in a user function only costs this sample
            outcome = TaskOutcome(0.0, "error", f"{type(error).__name__}: {error}"[:MAX_DETAIL_CHARS])
        connection.send(outcome)


def main() -> None:
    file_descriptor, parent_pid = int(sys.argv[1]), int(sys.argv[2])
    _die_with_parent(parent_pid)
    # Ctrl-C reaches the whole process group; the parent decides when workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    serve(Connection(file_descriptor))


if __name__ == "__main__":
    main()

"""A pool of verifier processes that can be killed and replaced, so one hung or crashing check costs one sample.

`concurrent.futures.ProcessPoolExecutor` cannot cancel a task that is already running, and sympy can spin in C
(a power tower of big integers) where no signal reaches it. So each worker process here is driven by one thread of
the parent: the thread sends a task, waits at most `timeout_s` for the answer, and on a timeout kills the process;
a fresh one starts for the next task. Results come back as `TaskOutcome`s: nothing a reward function does can
raise into the caller or stall the batch. Workers are fresh interpreters (see `worker.py`).
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import subprocess
import sys
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

from lmmrl_megatron.reward.config import FormatKind
from lmmrl_megatron.reward.protocol import TaskOutcome, VerifyTask, WorkerStart

_WORKER_START_TIMEOUT_S = 120.0
# The folder that holds the `lmmrl_megatron` package, so workers import this very copy of it.
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])


@dataclass
class _Job:
    task: VerifyTask
    future: Future[TaskOutcome]


class _WorkerSlot(threading.Thread):
    """One worker process and the parent thread that feeds it, restarting it after a timeout or a crash."""

    def __init__(self, pool: VerifierPool, index: int) -> None:
        super().__init__(name=f"reward-verifier-{index}", daemon=True)
        self._pool = pool
        self._process: subprocess.Popen[bytes] | None = None
        self._connection: Connection | None = None

    def run(self) -> None:
        try:
            while (job := self._pool._jobs.get()) is not None:
                if not job.future.set_running_or_notify_cancel():
                    continue
                try:
                    job.future.set_result(self._execute(job.task))
                except BaseException as error:  # the worker could not start: the caller must hear of it
                    job.future.set_exception(error)
        finally:
            self._stop_process()

    def _execute(self, task: VerifyTask) -> TaskOutcome:
        connection = self._ensure_process()
        try:
            connection.send(task)
        except (OSError, EOFError, ValueError):
            self._restart_later()
            return TaskOutcome(0.0, "crashed", "the verifier process was gone before the task was sent")
        if not connection.poll(self._pool.timeout_s):
            self._restart_later()
            return TaskOutcome(0.0, "timeout", f"no result within {self._pool.timeout_s} s; worker restarted")
        try:
            return connection.recv()
        except (EOFError, OSError):
            exit_code = self._process.wait(timeout=10) if self._process is not None else None
            self._restart_later()
            return TaskOutcome(0.0, "crashed", f"the verifier process died (exit code {exit_code})")

    def _restart_later(self) -> None:
        self._stop_process()
        self._pool._count_restart()

    def _ensure_process(self) -> Connection:
        if self._process is not None and self._process.poll() is None and self._connection is not None:
            return self._connection
        self._stop_process()
        if self._pool._start_failure is not None:
            raise RuntimeError(self._pool._start_failure)  # fail fast: a restart would fail the same way
        try:
            return self._start_process()
        except RuntimeError as error:
            self._pool._start_failure = str(error)
            raise

    def _start_process(self) -> Connection:
        parent_end, child_end = multiprocessing.Pipe(duplex=True)
        environment = dict(os.environ)
        environment["PYTHONPATH"] = os.pathsep.join(filter(None, [_PACKAGE_ROOT, environment.get("PYTHONPATH")]))
        command = [sys.executable, "-m", "lmmrl_megatron.reward.worker", str(child_end.fileno()), str(os.getpid())]
        self._process = subprocess.Popen(
            command, pass_fds=[child_end.fileno()], stdin=subprocess.DEVNULL, env=environment, close_fds=True
        )
        child_end.close()
        self._connection = parent_end
        parent_end.send(WorkerStart(self._pool.function_names, self._pool.format_kind, tuple(sys.path)))
        if not parent_end.poll(_WORKER_START_TIMEOUT_S):
            self._stop_process()
            raise RuntimeError(f"a reward verifier process did not start within {_WORKER_START_TIMEOUT_S} s")
        try:
            failure = parent_end.recv()
        except EOFError:
            failure = f"it exited with code {self._process.wait(timeout=10)} (see its stderr above)"
        if failure is not None:
            self._stop_process()
            raise RuntimeError(f"a reward verifier process could not load the reward functions: {failure}")
        return parent_end

    def _stop_process(self) -> None:
        if self._connection is not None:
            self._connection.close()
        if self._process is not None:
            if self._process.poll() is None:
                self._process.kill()
            self._process.wait(timeout=10)
        self._process, self._connection = None, None


class VerifierPool:
    """`num_workers` verifier processes running reward functions with a per-task timeout of `timeout_s`.

    Workers start on first use and restart after a timeout or a crash. Thread-safe: concurrent callers (the reward
    server's request threads) share the workers. Use as a context manager or call `close()`.
    """

    def __init__(self, function_names: tuple[str, ...], format_kind: FormatKind, num_workers: int,
                 timeout_s: float) -> None:
        assert num_workers >= 1 and timeout_s > 0
        self.function_names = function_names
        self.format_kind = format_kind
        self.timeout_s = timeout_s
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._num_restarts = 0
        self._start_failure: str | None = None
        self._closed = False
        self._slots = [_WorkerSlot(self, index) for index in range(num_workers)]
        for slot in self._slots:
            slot.start()

    @property
    def num_restarts(self) -> int:
        """Worker processes killed or found dead and replaced so far (after timeouts and crashes)."""
        with self._lock:
            return self._num_restarts

    def _count_restart(self) -> None:
        with self._lock:
            self._num_restarts += 1

    def submit(self, task: VerifyTask) -> Future[TaskOutcome]:
        if not 0 <= task.function_index < len(self.function_names):
            raise IndexError(f"function_index {task.function_index} out of range for {self.function_names}")
        with self._lock:
            if self._closed:
                raise RuntimeError("the verifier pool is closed")
            future: Future[TaskOutcome] = Future()
            self._jobs.put(_Job(task, future))
        return future

    def map(self, tasks: list[VerifyTask]) -> list[TaskOutcome]:
        """Run all tasks across the workers; outcomes in task order."""
        futures = [self.submit(task) for task in tasks]
        return [future.result() for future in futures]

    def close(self) -> None:
        """Let queued tasks finish, then stop the workers."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        for _ in self._slots:
            self._jobs.put(None)
        for slot in self._slots:
            slot.join()

    def __enter__(self) -> VerifierPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

"""A pool of verifier processes that can be killed and replaced, so one hung or crashing check costs one sample.

`concurrent.futures.ProcessPoolExecutor` cannot cancel a task that is already running, and code in C can spin
where no signal reaches it. So each worker process here is driven by one thread of the parent: the thread sends a
task and waits for the answer. Workers limit each call themselves (see `worker.py`); the thread kills a worker
that has not answered `KILL_GRACE_S` after its limit, and starts and warms a fresh one before taking the next task.
Results come back as outcomes: nothing a reward function does can raise into the caller or stall the batch.

Workers start and warm up when the pool is made, not on the first task. Tasks are taken round-robin across the
batches waiting (one batch per `map` or `submit_batch` call, e.g. one per server request), so a batch full of slow
answers holds at most its share of the workers and a small batch behind it is served next.
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import threading
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

from lmmrl_megatron.reward.config import FormatKind
from lmmrl_megatron.reward.protocol import BatchTask, Outcome, Task, WorkerStart

_WORKER_START_TIMEOUT_S = 120.0
# How long after its own time limit a worker may take to answer before it is killed.
KILL_GRACE_S = 2.0
# The folder that holds the `lmmrl_megatron` package, so workers import this very copy of it.
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])


@dataclass
class _Job:
    task: Task
    future: Future[Outcome]


class _WorkerSlot(threading.Thread):
    """One worker process and the parent thread that feeds it, restarting it after a kill or a crash."""

    def __init__(self, pool: VerifierPool, index: int) -> None:
        super().__init__(name=f"reward-verifier-{index}", daemon=True)
        self._pool = pool
        self._process: subprocess.Popen[bytes] | None = None
        self._connection: Connection | None = None
        self.ready = threading.Event()

    def run(self) -> None:
        try:
            try:
                self._ensure_process()
            except RuntimeError:
                pass  # recorded in the pool; every job will get the error
            finally:
                self.ready.set()
            while (job := self._pool._next_job()) is not None:
                if not job.future.set_running_or_notify_cancel():
                    continue
                try:
                    job.future.set_result(self._execute(job.task))
                except BaseException as error:  # the worker could not start: the caller must hear of it
                    job.future.set_exception(error)
        finally:
            self._stop_process()

    def _execute(self, task: Task) -> Outcome:
        connection = self._ensure_process()
        try:
            connection.send(task)
        except (OSError, EOFError, ValueError):
            self._restart()
            return task.failed("crashed", "the verifier process was gone before the task was sent")
        limit_s = task.limit_s(self._pool.timeout_s)
        if not connection.poll(limit_s + KILL_GRACE_S):
            self._restart()
            return task.failed("timeout", f"no answer within {limit_s} s; the verifier process was killed")
        try:
            return connection.recv()
        except (EOFError, OSError):
            exit_code = self._process.wait(timeout=10) if self._process is not None else None
            self._restart()
            return task.failed("crashed", f"the verifier process died (exit code {exit_code})")

    def _restart(self) -> None:
        """Replace the worker now, so the next task finds a warm one."""
        self._stop_process()
        self._pool._count_restart()
        try:
            self._ensure_process()
        except RuntimeError:
            pass  # recorded in the pool; the next job gets the error

    def _ensure_process(self) -> Connection:
        if self._process is not None and self._process.poll() is None and self._connection is not None:
            return self._connection
        self._stop_process()
        if self._pool._start_failure is not None:
            raise RuntimeError(self._pool._start_failure)  # fail fast: a restart would fail the same way
        try:
            return self._start_process()
        except Exception as error:  # whatever it was, later starts would meet it too: fail every job with it
            self._stop_process()
            self._pool._start_failure = str(error) if isinstance(error, RuntimeError) else (
                f"a reward verifier process could not start: {type(error).__name__}: {error}")
            raise RuntimeError(self._pool._start_failure) from error

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
        parent_end.send(self._pool.worker_start)
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
    """`num_workers` verifier processes running reward functions with a per-call limit of `timeout_s` (real time)
    and, for math-verify's steps, `math_timeout_s` (CPU time).

    Workers start (and warm up) at once and restart after a kill or a crash. Thread-safe: concurrent callers (the
    reward server's requests) share the workers, each batch getting its turn. Use as a context manager or call
    `close()`.
    """

    def __init__(self, function_names: tuple[str, ...], format_kind: FormatKind, num_workers: int,
                 timeout_s: float, math_timeout_s: float | None = None, batch_function: str | None = None) -> None:
        assert num_workers >= 1 and timeout_s > 0
        self.function_names = function_names
        self.batch_function = batch_function
        self.timeout_s = timeout_s
        self.worker_start = WorkerStart(
            function_names, format_kind, timeout_s, math_timeout_s, batch_function, tuple(sys.path)
        )
        self._batches: deque[deque[_Job]] = deque()
        self._lock = threading.Condition()
        self._num_restarts = 0
        self._start_failure: str | None = None
        self._closed = False
        self._slots = [_WorkerSlot(self, index) for index in range(num_workers)]
        for slot in self._slots:
            slot.start()

    @property
    def num_restarts(self) -> int:
        """Worker processes killed or found dead and replaced so far (after hangs past the limit and crashes)."""
        with self._lock:
            return self._num_restarts

    def _count_restart(self) -> None:
        with self._lock:
            self._num_restarts += 1

    def wait_until_ready(self, timeout_s: float = _WORKER_START_TIMEOUT_S + 10) -> None:
        """Block until every worker has started and warmed up; RuntimeError when they could not start."""
        for slot in self._slots:
            if not slot.ready.wait(timeout_s):
                raise RuntimeError(f"the reward verifier processes did not start within {timeout_s} s")
        if self._start_failure is not None:
            raise RuntimeError(self._start_failure)

    def submit_batch(self, tasks: list[Task]) -> list[Future[Outcome]]:
        """Queue `tasks` as one batch; their futures, in task order."""
        for task in tasks:
            if isinstance(task, BatchTask):
                if self.batch_function is None:
                    raise ValueError("this pool was started without a batch function")
            elif not 0 <= task.function_index < len(self.function_names):
                raise IndexError(f"function_index {task.function_index} out of range for {self.function_names}")
        jobs = deque(_Job(task, Future()) for task in tasks)
        futures = [job.future for job in jobs]
        with self._lock:
            if self._closed:
                raise RuntimeError("the verifier pool is closed")
            if jobs:
                self._batches.append(jobs)
                self._lock.notify(len(jobs))
        return futures

    def map(self, tasks: list[Task]) -> list[Outcome]:
        """Run all tasks across the workers; outcomes in task order."""
        return [future.result() for future in self.submit_batch(tasks)]

    def _next_job(self) -> _Job | None:
        """The next task of the batch whose turn it is (None once closed and drained); blocks while there is none."""
        with self._lock:
            while not self._batches:
                if self._closed:
                    return None
                self._lock.wait()
            jobs = self._batches.popleft()
            job = jobs.popleft()
            if jobs:
                self._batches.append(jobs)
            return job

    def close(self) -> None:
        """Let queued tasks finish, then stop the workers."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._lock.notify_all()
        for slot in self._slots:
            slot.join()

    def __enter__(self) -> VerifierPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

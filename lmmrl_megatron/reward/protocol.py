"""Messages between the verifier pool and its worker processes (pickled over a socket pair)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lmmrl_megatron.reward.config import FormatKind

OutcomeStatus = Literal["ok", "timeout", "error", "bad_return", "crashed", "rejected"]
MAX_DETAIL_CHARS = 300


@dataclass(frozen=True)
class WorkerStart:
    """What a worker loads at start: the reward functions by config name, in `function_index` order, and the
    batch function (`path.py` or `path.py:name`, OpenRLHF's `reward_func(queries, prompts, labels)`), if any.

    `timeout_s` is the real-time limit of each call inside the worker; `math_timeout_s` the CPU-time limit of
    each math-verify step of the `accuracy` function.
    """

    function_names: tuple[str, ...]
    format_kind: FormatKind
    timeout_s: float
    math_timeout_s: float | None
    batch_function: str | None = None
    sys_path: tuple[str, ...] = ()


@dataclass(frozen=True)
class TaskOutcome:
    """The value of one reward function on one sample; value is 0.0 unless status is 'ok'."""

    value: float
    status: OutcomeStatus
    detail: str = ""


@dataclass(frozen=True)
class BatchOutcome:
    """The values of the batch function on the samples of one BatchTask; all 0.0 unless status is 'ok'."""

    values: tuple[float, ...]
    status: OutcomeStatus
    detail: str = ""


@dataclass(frozen=True)
class VerifyTask:
    """Run reward function number `function_index` on one sample."""

    function_index: int
    response: str
    label: str
    prompt: str

    def limit_s(self, timeout_s: float) -> float:
        return timeout_s

    def failed(self, status: OutcomeStatus, detail: str) -> TaskOutcome:
        return TaskOutcome(0.0, status, detail)


@dataclass(frozen=True)
class BatchTask:
    """Run the batch function once on these samples (queries are decoded prompt + response, as OpenRLHF's)."""

    queries: tuple[str, ...]
    prompts: tuple[str, ...]
    labels: tuple[str, ...]

    def limit_s(self, timeout_s: float) -> float:
        """The time limit of the call: `timeout_s` for each sample it scores."""
        return timeout_s * max(1, len(self.queries))

    def failed(self, status: OutcomeStatus, detail: str) -> BatchOutcome:
        return BatchOutcome((0.0,) * len(self.queries), status, detail)


Task = VerifyTask | BatchTask
Outcome = TaskOutcome | BatchOutcome

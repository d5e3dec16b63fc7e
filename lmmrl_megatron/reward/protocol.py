"""Messages between the verifier pool and its worker processes (pickled over a socket pair)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lmmrl_megatron.reward.config import FormatKind

OutcomeStatus = Literal["ok", "timeout", "error", "bad_return", "crashed"]
MAX_DETAIL_CHARS = 300


@dataclass(frozen=True)
class WorkerStart:
    """What a worker loads at start: the reward functions by config name, in `function_index` order."""

    function_names: tuple[str, ...]
    format_kind: FormatKind
    sys_path: tuple[str, ...] = ()


@dataclass(frozen=True)
class VerifyTask:
    """Run reward function number `function_index` on one sample."""

    function_index: int
    response: str
    label: str
    prompt: str


@dataclass(frozen=True)
class TaskOutcome:
    """The value of one reward function on one sample; value is 0.0 unless status is 'ok'."""

    value: float
    status: OutcomeStatus
    detail: str = ""

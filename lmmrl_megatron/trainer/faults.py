"""Fault injection for recovery tests and drills: kill a process of a live run at a chosen point.

Set `LMMRL_FAULT` in the driver's environment (comma-separated for several):

    LMMRL_FAULT=kill_policy_worker@3      SIGKILL the last policy rank in step 3, after the step's generation and
    LMMRL_FAULT=kill_policy_worker@3:0    forward passes, before its optimizer step (":0": rank 0)
    LMMRL_FAULT=kill_driver@2             SIGKILL the driver itself while saving step 2's checkpoint: the workers
                                          have written it, it is not committed yet

Each fault fires at most once per driver process, so a run that `trainer.max_restarts` restarts in the same
process passes the step the second time. Unset (the default), nothing happens.
"""

from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass
from typing import Any

FAULT_ENV = "LMMRL_FAULT"
_KINDS = {"kill_policy_worker": "train", "kill_driver": "save"}

_fired: set[str] = set()


@dataclass(frozen=True)
class Fault:
    spec: str
    kind: str
    step: int
    rank: int | None = None


def parse_faults(value: str) -> list[Fault]:
    faults = []
    for spec in (part.strip() for part in value.split(",")):
        if not spec:
            continue
        kind, _, where = spec.partition("@")
        step, _, rank = where.partition(":")
        if kind not in _KINDS or not step.isdigit() or (rank and not rank.isdigit()):
            raise ValueError(
                f"{FAULT_ENV}={value!r}: {spec!r} is not kill_policy_worker@STEP[:RANK] or kill_driver@STEP"
            )
        faults.append(Fault(spec, kind, int(step), int(rank) if rank else None))
    return faults


def inject(point: str, step: int, policy: Any = None) -> None:
    """Fire the faults set for this point ('train' or 'save') of `step`, if any."""
    value = os.environ.get(FAULT_ENV)
    if not value:
        return
    for fault in parse_faults(value):
        if _KINDS[fault.kind] != point or fault.step != step or fault.spec in _fired:
            continue
        _fired.add(fault.spec)
        print(f"lmmrl: {FAULT_ENV}: {fault.spec}", file=sys.stderr, flush=True)
        if fault.kind == "kill_driver":
            os.kill(os.getpid(), signal.SIGKILL)
        else:
            rank = len(policy.workers) - 1 if fault.rank is None else fault.rank
            policy.kill_rank(rank)

"""Automatic recovery: a run whose worker dies restarts its workers and resumes, up to `trainer.max_restarts`.

    train(config)   # what lmmrl-train runs: RLTrainer(config).fit(), restarted after a worker's death

Each attempt is a whole RLTrainer: a fresh Ray cluster (when the run started its own), fresh workers, and a resume
from the newest checkpoint this run committed (before the first one, the run's own `checkpoint.resume`
setting: the same start as the first attempt). Resuming is exact, so a restarted run ends with the metrics an
uninterrupted one has. Only deaths restart (WorkerDiedError, Ray's actor and node deaths); any other error stops
the run at once. Each restart is logged on stderr and in `save_path/restarts.jsonl`.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

from lmmrl_megatron.config.schema import RunConfig
from lmmrl_megatron.trainer.errors import WorkerDiedError, one_line


def _recoverable() -> tuple[type[BaseException], ...]:
    from ray.exceptions import NodeDiedError, RayActorError, WorkerCrashedError

    return (WorkerDiedError, RayActorError, WorkerCrashedError, NodeDiedError)


def _with_resume(config: RunConfig, resume: str) -> RunConfig:
    return dataclasses.replace(config, checkpoint=dataclasses.replace(config.checkpoint, resume=resume))


def train(config: RunConfig) -> Path:
    """Train to `trainer.max_steps`, restarting after a worker's death up to `trainer.max_restarts` times."""
    from lmmrl_megatron.trainer.controller import RLTrainer

    max_restarts = config.trainer.max_restarts
    resume = config.checkpoint.resume
    restarts = 0
    while True:
        trainer = None
        try:
            trainer = RLTrainer(_with_resume(config, resume))
            return trainer.fit()
        except _recoverable() as exc:
            if trainer is not None and trainer.last_saved is not None:
                resume = str(trainer.last_saved)
            if restarts >= max_restarts:
                if max_restarts:
                    raise WorkerDiedError(f"{one_line(exc, 300)} (after {restarts} restart(s); "
                                          f"trainer.max_restarts={max_restarts})") from exc
                raise
            restarts += 1
            _log_restart(config, restarts, max_restarts, exc, resume)
        finally:
            if trainer is not None:
                trainer.close()


def _log_restart(config: RunConfig, restart: int, max_restarts: int, exc: BaseException, resume: str) -> None:
    source = resume if resume not in ("auto", "none") else ("the start" if resume == "none" else "checkpoint.resume=auto")
    print(
        f"lmmrl-train: restart {restart}/{max_restarts}: {one_line(exc, 300)}; resuming from {source}",
        file=sys.stderr,
        flush=True,
    )
    record = {"time": time.time(), "restart": restart, "max_restarts": max_restarts, "error": one_line(exc, 1000),
              "resume": resume}
    path = Path(config.checkpoint.save_path) / "restarts.jsonl"
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")

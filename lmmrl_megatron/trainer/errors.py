"""Errors whose message is the whole story: `lmmrl-train` prints each as one line, without a traceback.

    RunError                 the base: a failure a person fixes outside the code
      DataError              the prompt data cannot be read (`file:line: reason: detail`)
      CheckpointStorageError the checkpoint folder is not writable, too small, or filled up during a save
      WorkerDiedError        a Ray worker of the run died (a crash, the OOM killer, a kill); restartable
      ClusterError           no Ray cluster where RAY_ADDRESS points, or one too small for the run's placement
"""

from __future__ import annotations


class RunError(RuntimeError):
    """An error a person can act on from its message alone."""


class DataError(RunError):
    """The prompt data is unusable (a bad record under `bad_input: error`, a missing file, an empty source)."""


class CheckpointStorageError(RunError):
    """The checkpoint folder cannot take a checkpoint: read-only, not enough free space, or full mid-save."""


class WorkerDiedError(RunError):
    """A worker process of the run died; `trainer.max_restarts` lets the run restart from its last checkpoint."""


class ClusterError(RunError):
    """The Ray cluster cannot take this run: none at RAY_ADDRESS, or fewer GPUs than the placement needs."""


def one_line(text: object, limit: int = 400) -> str:
    """`text` on one line (whitespace runs collapsed), cut to `limit` characters."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."

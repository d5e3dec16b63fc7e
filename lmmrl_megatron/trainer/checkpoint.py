"""Crash-safe checkpoint directories: written aside, committed by an atomic rename, found again by `resume`.

    save_path/checkpoints/
        step_00000010/     committed: holds COMPLETE, the model/optimizer checkpoint and trainer_state.pt
        .tmp-step_00000020 a save in progress (or one a crash interrupted): never read, removed by the next save
        latest             the name of the newest committed checkpoint, replaced atomically

A save is two-phase so every rank can write into the staging directory (a Megatron distributed checkpoint) before
one rank commits it: `stage(step)` -> ranks write -> barrier -> `commit(step)`. A crash at any point leaves the
previous committed checkpoint intact and `latest` pointing at it.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

COMPLETE_MARKER = "COMPLETE"
_PREFIX = "step_"


def _step_dir_name(step: int) -> str:
    return f"{_PREFIX}{step:08d}"


@dataclass
class CheckpointManager:
    root: Path  # save_path/checkpoints
    keep_last: int = 2

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        if self.keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {self.keep_last}")

    def staging_dir(self, step: int) -> Path:
        return self.root / f".tmp-{_step_dir_name(step)}"

    def stage(self, step: int) -> Path:
        """Create an empty staging directory for `step` (removing any a crashed save left behind)."""
        staging = self.staging_dir(step)
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir(parents=True)
        return staging

    def commit(self, step: int, metadata: dict[str, Any] | None = None) -> Path:
        """Mark the staged checkpoint complete, rename it into place, point `latest` at it, prune old ones."""
        staging = self.staging_dir(step)
        assert staging.is_dir(), f"commit({step}) without stage({step})"
        marker = {"step": step, "time": time.time(), **(metadata or {})}
        (staging / COMPLETE_MARKER).write_text(json.dumps(marker))
        final = self.root / _step_dir_name(step)
        if final.exists():  # re-saving a step (e.g. after resuming from it): replace the old copy
            shutil.rmtree(final)
        os.replace(staging, final)
        self._write_latest(final.name)
        self._prune()
        return final

    def _write_latest(self, name: str) -> None:
        tmp = self.root / f".latest.tmp-{os.getpid()}"
        tmp.write_text(name + "\n")
        os.replace(tmp, self.root / "latest")

    def committed(self) -> list[Path]:
        """Committed checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if p.name.startswith(_PREFIX) and (p / COMPLETE_MARKER).is_file()]
        return sorted(found, key=lambda p: int(p.name[len(_PREFIX) :]))

    def latest(self) -> Path | None:
        pointer = self.root / "latest"
        if pointer.is_file():
            candidate = self.root / pointer.read_text().strip()
            if (candidate / COMPLETE_MARKER).is_file():
                return candidate
        committed = self.committed()  # `latest` missing or stale: fall back to the newest complete one
        return committed[-1] if committed else None

    def resolve_resume(self, resume: str) -> Path | None:
        """`auto`: the latest committed checkpoint or None; `none`: None; otherwise a checkpoint directory."""
        if resume == "none":
            return None
        if resume == "auto":
            return self.latest()
        path = Path(resume)
        if not (path / COMPLETE_MARKER).is_file():
            raise ValueError(f"checkpoint.resume={resume!r} is not a complete checkpoint (no {COMPLETE_MARKER} file)")
        return path

    def _prune(self) -> None:
        for old in self.committed()[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)


def capture_rng_state() -> dict[str, Any]:
    """Every generator a step draws from, so a resumed run samples exactly what the uninterrupted one would."""
    state: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])

"""Crash-safe checkpoint directories: written aside, committed by an atomic rename, found again by `resume`.

    save_path/checkpoints/
        step_00000010/     committed: holds COMPLETE, the model/optimizer checkpoint and trainer_state.pt
        .tmp-step_00000020 a save in progress (or one a crash interrupted): never read, removed by the next save
                           of any step and when a run starts
        latest             the name of the newest committed checkpoint, for people and tools
        superseded-<time>/ an earlier run's checkpoints after the step this run started from, moved aside

A save is two-phase so every rank can write into the staging directory (a Megatron distributed checkpoint) before
one rank commits it: `stage(step)` -> ranks write -> barrier -> `commit(step)`. A crash at any point leaves the
previous committed checkpoint intact. Resuming never trusts `latest`: it takes the complete step directory with
the highest step, so a crash between the commit's rename and the `latest` update loses nothing. Directories leave
by a rename too (to `.trash-*`, then deleted), so a crash mid-delete never leaves a half-deleted `step_*` that
still looks complete.
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


def _step_of(directory: Path) -> int:
    return int(directory.name[len(_PREFIX) :])


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

    def remove_debris(self) -> None:
        """Remove what interrupted saves and deletions left: staging directories of any step, `.trash-*`
        directories, temporary `latest` files."""
        if not self.root.is_dir():
            return
        for path in self.root.iterdir():
            if path.name.startswith((".tmp-", ".trash-")) and path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            elif path.name.startswith(".latest.tmp-"):
                path.unlink(missing_ok=True)

    def stage(self, step: int) -> Path:
        """Create an empty staging directory for `step` (removing any a crashed save left behind, of any step)."""
        self.remove_debris()
        staging = self.staging_dir(step)
        staging.mkdir(parents=True)
        return staging

    def abort(self, step: int) -> None:
        """Drop a staged save that failed (it may fill the disk the next one needs)."""
        shutil.rmtree(self.staging_dir(step), ignore_errors=True)

    def commit(self, step: int, metadata: dict[str, Any] | None = None) -> Path:
        """Mark the staged checkpoint complete, rename it into place, point `latest` at it, prune old ones."""
        staging = self.staging_dir(step)
        assert staging.is_dir(), f"commit({step}) without stage({step})"
        marker = {"step": step, "time": time.time(), **(metadata or {})}
        (staging / COMPLETE_MARKER).write_text(json.dumps(marker))
        final = self.root / _step_dir_name(step)
        if final.exists():  # re-saving a step (e.g. after resuming from it): replace the old copy
            self._discard(final)
        os.replace(staging, final)
        self._write_latest(final.name)
        self._prune()
        return final

    def _discard(self, directory: Path) -> None:
        trash = self.root / f".trash-{directory.name}-{os.getpid()}"
        os.replace(directory, trash)  # atomic: from here on it is not a checkpoint
        shutil.rmtree(trash, ignore_errors=True)

    def _write_latest(self, name: str) -> None:
        tmp = self.root / f".latest.tmp-{os.getpid()}"
        tmp.write_text(name + "\n")
        os.replace(tmp, self.root / "latest")

    def committed(self) -> list[Path]:
        """Committed checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        found = [
            p
            for p in self.root.iterdir()
            if p.name.startswith(_PREFIX) and p.name[len(_PREFIX) :].isdigit() and (p / COMPLETE_MARKER).is_file()
        ]
        return sorted(found, key=_step_of)

    def latest(self) -> Path | None:
        """The complete checkpoint of the highest step (the `latest` file may lag a crash behind it)."""
        committed = self.committed()
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

    def supersede_after(self, step: int) -> list[Path]:
        """Move the committed checkpoints of steps after `step` (where this run starts: 0 afresh) into
        `superseded-<UTC time>/`; returns where they went. Left in place they would belong to another run and
        outrank this one's: pruning by step would delete this run's saves as the oldest, and `resume: auto`
        would pick the earlier run's highest step. Moved, not deleted: they are an earlier run's work."""
        later = [path for path in self.committed() if _step_of(path) > step]
        if not later:
            return []
        folder = self.root / f"superseded-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{os.getpid()}"
        folder.mkdir()
        moved = []
        for path in later:
            os.replace(path, folder / path.name)  # atomic per checkpoint: a crash leaves each whole on one side
            moved.append(folder / path.name)
        newest = self.latest()
        if newest is not None:
            self._write_latest(newest.name)
        else:
            (self.root / "latest").unlink(missing_ok=True)
        return moved

    def _prune(self) -> None:
        for old in self.committed()[: -self.keep_last]:
            self._discard(old)


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

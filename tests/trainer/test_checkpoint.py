"""Checkpoint directories are committed atomically, survive crashes mid-save, and resume finds the right one."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from lmmrl_megatron.trainer.checkpoint import CheckpointManager, capture_rng_state, restore_rng_state


def save(manager: CheckpointManager, step: int, payload: str) -> Path:
    staging = manager.stage(step)
    (staging / "weights.txt").write_text(payload)
    return manager.commit(step, {"payload": payload})


def test_commit_rename_latest_and_prune(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path / "ckpt", keep_last=2)
    assert manager.latest() is None and manager.resolve_resume("auto") is None
    for step in (10, 20, 30):
        save(manager, step, f"w{step}")
    assert [p.name for p in manager.committed()] == ["step_00000020", "step_00000030"]
    assert manager.latest().name == "step_00000030"
    assert (manager.latest() / "weights.txt").read_text() == "w30"


def test_crash_mid_save_leaves_previous_checkpoint(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path / "ckpt")
    save(manager, 10, "good")
    staging = manager.stage(20)
    (staging / "weights.txt").write_text("half-writ")  # the process dies here: no commit
    assert manager.latest().name == "step_00000010"
    assert manager.resolve_resume("auto").name == "step_00000010"
    # The next save, of any step, clears the debris and commits cleanly.
    save(manager, 30, "whole")
    assert (manager.latest() / "weights.txt").read_text() == "whole"
    assert not manager.staging_dir(20).exists()
    assert sorted(p.name for p in manager.root.iterdir()) == ["latest", "step_00000010", "step_00000030"]


def test_debris_is_removed_at_start(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path / "ckpt")
    save(manager, 1, "a")
    manager.stage(2)
    (manager.root / ".trash-step_00000000-123").mkdir()
    (manager.root / ".latest.tmp-123").write_text("x")
    manager.remove_debris()
    assert sorted(p.name for p in manager.root.iterdir()) == ["latest", "step_00000001"]


def test_a_kill_between_rename_and_latest_loses_no_step(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path / "ckpt")
    save(manager, 1, "a")
    staging = manager.stage(2)
    (staging / "weights.txt").write_text("b")
    (staging / "COMPLETE").write_text("{}")
    staging.rename(manager.root / "step_00000002")  # commit's rename, then the process dies: `latest` says step 1
    assert (manager.root / "latest").read_text().strip() == "step_00000001"
    assert manager.resolve_resume("auto").name == "step_00000002"


def test_replacing_a_step_never_leaves_a_half_deleted_complete_one(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path / "ckpt", keep_last=1)
    save(manager, 1, "old")
    save(manager, 1, "new")  # re-saving a step (after resuming from it): the old copy leaves by a rename first
    save(manager, 2, "next")  # pruning too
    assert [p.name for p in manager.committed()] == ["step_00000002"]
    assert sorted(p.name for p in manager.root.iterdir()) == ["latest", "step_00000002"]


def test_stale_latest_pointer_falls_back_to_newest_complete(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path / "ckpt", keep_last=3)
    save(manager, 1, "a")
    save(manager, 2, "b")
    (manager.root / "latest").write_text("step_00000099\n")
    assert manager.latest().name == "step_00000002"


def test_resume_policies(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path / "ckpt")
    path = save(manager, 5, "x")
    assert manager.resolve_resume("none") is None
    assert manager.resolve_resume(str(path)) == path
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        manager.resolve_resume(str(tmp_path / "nowhere"))


def test_rng_state_round_trip() -> None:
    state = capture_rng_state()
    first = (random.random(), np.random.rand(), torch.rand(3))
    restore_rng_state(state)
    second = (random.random(), np.random.rand(), torch.rand(3))
    assert first[0] == second[0] and first[1] == second[1] and torch.equal(first[2], second[2])


def test_a_fresh_run_moves_an_earlier_runs_checkpoints_aside_and_keeps_its_own(tmp_path: Path) -> None:
    earlier = CheckpointManager(tmp_path / "ckpt", keep_last=2)
    for step in (40, 60):
        save(earlier, step, f"old{step}")
    fresh = CheckpointManager(tmp_path / "ckpt", keep_last=2)
    moved = fresh.supersede_after(0)  # checkpoint.resume=none: the run starts at step 0
    assert [p.name for p in moved] == ["step_00000040", "step_00000060"]
    assert moved[0].parent.name.startswith("superseded-") and moved[0].parent.parent == fresh.root
    assert (moved[1] / "weights.txt").read_text() == "old60"  # moved whole, not deleted
    assert fresh.committed() == [] and fresh.resolve_resume("auto") is None
    assert not (fresh.root / "latest").exists()
    save(fresh, 4, "new4")  # not pruned as the oldest, and what resume=auto finds
    assert [p.name for p in fresh.committed()] == ["step_00000004"]
    assert fresh.resolve_resume("auto").name == "step_00000004"
    assert (fresh.root / "latest").read_text().strip() == "step_00000004"
    fresh.remove_debris()  # a later start keeps the superseded folder
    assert (moved[0] / "weights.txt").read_text() == "old40"


def test_a_run_resumed_from_an_earlier_step_supersedes_only_the_later_ones(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path / "ckpt", keep_last=3)
    for step in (10, 20, 30):
        save(manager, step, f"w{step}")
    assert [p.name for p in manager.supersede_after(10)] == ["step_00000020", "step_00000030"]
    assert [p.name for p in manager.committed()] == ["step_00000010"]
    assert (manager.root / "latest").read_text().strip() == "step_00000010"
    assert manager.supersede_after(10) == []  # resume=auto from the newest: nothing is later

"""The checkpoint folder's checks at start, and save failures explained in one line."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch

from lmmrl_megatron.trainer.errors import CheckpointStorageError
from lmmrl_megatron.trainer.storage import check_checkpoint_storage, explain_save_failure


def test_a_writable_folder_with_room_passes(tmp_path: Path) -> None:
    check_checkpoint_storage(tmp_path / "run" / "checkpoints", expected_bytes=1024, keep_last=2)
    assert (tmp_path / "run" / "checkpoints").is_dir()
    assert not list((tmp_path / "run" / "checkpoints").iterdir())  # the write test leaves nothing


def test_too_little_space_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointStorageError, match=r"not enough free space for a checkpoint in .*: .* free, a "):
        check_checkpoint_storage(tmp_path, expected_bytes=2**62, keep_last=1)


def test_an_unwritable_folder_is_refused(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(CheckpointStorageError, match="is not writable"):
        check_checkpoint_storage(blocker / "checkpoints", expected_bytes=0, keep_last=1)


def test_a_real_full_disk_write_is_explained(tmp_path: Path) -> None:
    """torch's zip writer on a full device (/dev/full): no errno survives, only "unexpected pos"."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    with pytest.raises(Exception) as raised:
        torch.save({"w": torch.zeros(1 << 16)}, "/dev/full")
    explained = explain_save_failure(raised.value, tmp_path / ".tmp-step_00000003", step=3)
    assert explained is not None
    message = str(explained)
    assert message.startswith(f"cannot save the checkpoint of step 3 to {tmp_path}: No space left on device (")
    assert "\n" not in message


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (OSError(errno.ENOSPC, "No space left on device"), "No space left on device"),
        (OSError(errno.EROFS, "Read-only file system"), "Read-only file system"),
        # A Ray task error keeps only the remote traceback's text, wrapped in Megatron's CheckpointException.
        (RuntimeError("CheckpointException ranks:dict_keys([0]) ... OSError: [Errno 28] No space left on device"),
         "No space left on device"),
        (RuntimeError("[enforce fail at inline_container.cc:671] . unexpected pos 3072 vs 2964"), "No space left"),
    ],
)
def test_save_failures_name_their_cause(tmp_path: Path, error: Exception, expected: str) -> None:
    try:
        raise RuntimeError("save failed") from error
    except RuntimeError as exc:
        explained = explain_save_failure(exc, tmp_path / ".tmp-step_00000001", step=1)
    assert explained is not None and expected in str(explained)


def test_other_failures_are_left_alone(tmp_path: Path) -> None:
    assert explain_save_failure(KeyError("model.layers.0"), tmp_path, step=1) is None


def test_a_write_failure_that_lost_its_cause_is_a_full_disk_when_no_checkpoint_fits(tmp_path: Path) -> None:
    lost = RuntimeError("Worker failure: An error is caught while starting worker 0, error: <class 'RuntimeError'>")
    assert explain_save_failure(lost, tmp_path, step=2, expected_bytes=1024) is None  # room enough: not the disk
    explained = explain_save_failure(lost, tmp_path, step=2, expected_bytes=2**62)
    assert explained is not None and "No space left on device" in str(explained)

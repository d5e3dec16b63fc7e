"""Write a checkpoint directory aside and rename it into place, so a crash never leaves one that looks complete.

    with atomic_output_dir(out) as tmp:
        ...write every file under tmp...
    # here `out` exists and is complete; before this line it did not exist at all

The staging directory is `OUT.tmp-<pid>` beside `OUT` (same file system, so the final `os.replace` is atomic). An
exception inside the block removes the staging directory; a hard kill (SIGKILL, power loss) leaves it behind, but
under a name no loader takes for a checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator


def staging_dir_for(out_dir: Path, pid: int | None = None) -> Path:
    """The name `out_dir` is written under until it is complete."""
    return out_dir.parent / f"{out_dir.name}.tmp-{os.getpid() if pid is None else pid}"


def check_output_dir(out_dir: Path, overwrite: bool) -> None:
    """Refuse to replace an existing output unless asked to; refuse a path that is a file."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"output {out_dir} exists and is not a directory")
    if out_dir.exists() and not overwrite:
        raise ValueError(f"output directory {out_dir} already exists; pass overwrite (--overwrite) to replace it")


def publish_dir(staging: Path, out_dir: Path) -> None:
    """Move a completed staging directory to `out_dir`, replacing an old one only after the new one is whole."""
    _fsync_dir(staging)
    if out_dir.exists():
        # os.replace cannot swap non-empty directories: move the old one aside first, then delete it.
        retired = out_dir.parent / f"{out_dir.name}.old-{os.getpid()}"
        os.replace(out_dir, retired)
        os.replace(staging, out_dir)
        shutil.rmtree(retired)
    else:
        os.replace(staging, out_dir)
    _fsync_dir(out_dir.parent)


@contextlib.contextmanager
def atomic_output_dir(out_dir: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty staging directory; on normal exit it becomes `out_dir`, on an exception it is removed."""
    out = Path(out_dir).absolute()
    check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_dir_for(out)
    if staging.exists():  # left by an earlier process that had our pid and was killed
        shutil.rmtree(staging)
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    publish_dir(staging, out)


def _fsync_dir(path: Path) -> None:
    """Flush a directory entry so the rename survives a power loss (a no-op where the OS does not allow it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)

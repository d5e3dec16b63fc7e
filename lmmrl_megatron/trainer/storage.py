"""The checkpoint folder can take the run's checkpoints: checked when a run starts, explained when a save fails.

`check_checkpoint_storage` runs before any worker is built: the folder must be writable (a file is written and
removed, which catches read-only mounts even for root) and have room for one more checkpoint of the estimated
size. `explain_save_failure` turns what a failed save raises (Megatron's `CheckpointException`, torch's
`[enforce fail at inline_container.cc] unexpected pos`, a Ray task error wrapping either) into one line that
names the folder and the cause, e.g. "No space left on device".
"""

from __future__ import annotations

import errno
import logging
import math
import os
import shutil
from pathlib import Path

from lmmrl_megatron.config.schema import RunConfig
from lmmrl_megatron.trainer.errors import CheckpointStorageError, WorkerDiedError

logger = logging.getLogger(__name__)

# Per trained parameter: fp32 main parameter and Adam's two fp32 moments, beside the weight in the model's dtype.
_OPTIMIZER_BYTES_PER_PARAM = 12
_DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
_HEADROOM = 1.1  # per-tensor metadata, file-system blocks
_FIXED_BYTES = 2**20  # the checkpoint index, the trainer state, the config

# The texts the failure names when it carries no errno (a Ray task error keeps only the remote traceback's text).
_STRERRORS = {code: os.strerror(code) for code in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EFBIG)}
# torch's zip writer reports a short write (a full disk) as a position mismatch, without an errno.
_SHORT_WRITE_MARKERS = ("unexpected pos", "PytorchStreamWriter failed writing")
# What a failed checkpoint write says when its cause got lost on the way.
_WRITE_FAILURE_MARKERS = ("CheckpointException", "Worker failure", "write")


def _human(num_bytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(num_bytes) < 1024 or unit == "TiB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024
    raise AssertionError


def expected_checkpoint_bytes(config: RunConfig) -> int:
    """About how many bytes one checkpoint of this run takes (0 when the model's size cannot be read)."""
    from lmmrl_megatron.convert.hf_io import expected_hf_specs

    try:
        num_params = sum(math.prod(spec.shape) for spec in expected_hf_specs(Path(config.model.pretrain)).values())
    except Exception:  # noqa: BLE001 - the model loader reports a broken checkpoint better, later
        return 0
    weight_bytes = _DTYPE_BYTES.get(config.model.dtype, 4)
    roles = 1 + int(config.algorithm.needs_critic)
    total = roles * num_params * (weight_bytes + _OPTIMIZER_BYTES_PER_PARAM)
    if config.checkpoint.save_hf:
        total += num_params * weight_bytes
    return int(total * _HEADROOM) + _FIXED_BYTES


def _free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


def check_checkpoint_storage(root: Path, expected_bytes: int, keep_last: int) -> None:
    """Raise CheckpointStorageError unless `root` (created if missing) is writable and has room for one more
    checkpoint of `expected_bytes`; warn when it has room for fewer than a run keeps at its peak."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".write-test-{os.getpid()}"
        with open(probe, "wb") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as exc:
        raise CheckpointStorageError(
            f"the checkpoint folder {root} is not writable: {exc.strerror or exc} (checkpoint.save_path)"
        ) from exc
    free = _free_bytes(root)
    if free < expected_bytes:
        raise CheckpointStorageError(
            f"not enough free space for a checkpoint in {root}: {_human(free)} free, a checkpoint of this run "
            f"takes about {_human(expected_bytes)} (checkpoint.save_path)"
        )
    peak = (keep_last + 1) * expected_bytes  # a new save is written before the oldest kept one is pruned
    if free < peak:
        logger.warning(
            "the checkpoint folder %s has %s free: room for %d checkpoint(s) of about %s; keep_last=%d needs %s",
            root, _human(free), free // max(expected_bytes, 1), _human(expected_bytes), keep_last, _human(peak),
        )


def _chain(exc: BaseException):
    seen = set()
    stack = [exc]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        stack += [current.__cause__, current.__context__, getattr(current, "cause", None)]
        failures = getattr(current, "failures", None)  # torch.distributed.checkpoint.CheckpointException
        if isinstance(failures, dict):
            stack += [f for f in failures.values() if isinstance(f, BaseException)]


def explain_save_failure(
    exc: BaseException, directory: Path, step: int, expected_bytes: int = 0
) -> CheckpointStorageError | None:
    """A one-line CheckpointStorageError for a save that failed for want of space or permission; None when the
    failure is something else (the caller re-raises it as it is). Call it before removing the failed save's
    files: a write failure whose cause got lost (Megatron's writer reports a failed write thread as "Worker
    failure ... <class 'RuntimeError'>") is a full disk when less than a checkpoint's `expected_bytes` is free."""
    if any(isinstance(link, WorkerDiedError) for link in _chain(exc)):
        return None  # a death mid-save is reported as the death
    where = directory
    while not where.exists() and where != where.parent:
        where = where.parent
    code = None
    for link in _chain(exc):
        if isinstance(link, OSError) and link.errno in _STRERRORS:
            code = link.errno
            break
    text = " ".join(str(link) for link in _chain(exc))
    if code is None:
        code = next((c for c, message in _STRERRORS.items() if message in text), None)
    if code is None and any(marker in text for marker in _SHORT_WRITE_MARKERS):
        code = errno.ENOSPC  # a short write: a full disk, as good as always
    if code is None and any(marker in text for marker in _WRITE_FAILURE_MARKERS) and _free_bytes(where) < expected_bytes:
        code = errno.ENOSPC
    if code is None:
        return None
    free = f" ({_human(_free_bytes(where))} free)" if code in (errno.ENOSPC, errno.EDQUOT) else ""
    return CheckpointStorageError(
        f"cannot save the checkpoint of step {step} to {directory.parent}: {os.strerror(code)}{free}; "
        f"the last complete checkpoint is kept"
    )


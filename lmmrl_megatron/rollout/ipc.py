"""The receiving end of a CUDA IPC weight bucket: open the sender's buffer on this GPU, view its tensors."""

from __future__ import annotations

from typing import Any

import torch

# (name, dtype name, shape, byte offset) of each tensor in a bucket's byte buffer
BucketMetadata = list[tuple[str, str, tuple[int, ...], int]]


def device_uuid(device: torch.device) -> str:
    return str(torch.cuda.get_device_properties(device).uuid) if device.type == "cuda" else "cpu"


def _open_buffer(handle: Any, device: torch.device) -> torch.Tensor:
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    args = list(handle)
    # The sender's device index means nothing in this process.
    args[6] = device.index if device.index is not None else torch.cuda.current_device()
    return rebuild_cuda_tensor(*args)


class IpcBuffers:
    """The sender's buffers this process has opened, one per slot, kept open across syncs.

    A sender that reuses its buffers (the trainer's two slots) sends the same handle again; opening it again would
    map the memory again (and, through torch's IPC reference counting, keep every old mapping's block alive in the
    sender). A slot's buffer is reopened only when a different handle arrives for it, and the old one is dropped."""

    def __init__(self) -> None:
        self._open: dict[int, tuple[tuple[Any, ...], torch.Tensor]] = {}

    def get(self, slot: int, handle: Any, device: torch.device) -> torch.Tensor:
        # reduce_tensor's arguments 7 to 9: the storage's IPC handle, its size and the buffer's offset in it
        key = (handle[7], handle[8], handle[9])
        cached = self._open.get(slot)
        if cached is None or cached[0] != key:
            self._open.pop(slot, None)
            self._open[slot] = (key, _open_buffer(handle, device))
        return self._open[slot][1]


def open_ipc_bucket(
    handles: dict[str, Any], metadata: BucketMetadata, device: torch.device, slot: int | None = None,
    opened: IpcBuffers | None = None,
) -> list[tuple[str, torch.Tensor]]:
    """`handles` maps GPU UUIDs to `reduce_tensor` arguments of the bucket buffer on that GPU; this takes the one
    on `device`. The views are valid while the sender keeps its buffer (until the receiver returns). With a `slot`
    and `opened`, a buffer the sender reuses is opened once (`IpcBuffers`)."""
    handle = handles[device_uuid(device)]
    buffer = _open_buffer(handle, device) if slot is None or opened is None else opened.get(slot, handle, device)
    return bucket_views(buffer, metadata)


def bucket_views(buffer: torch.Tensor, metadata: BucketMetadata) -> list[tuple[str, torch.Tensor]]:
    """The named tensors inside a bucket's flat uint8 buffer."""
    bucket = []
    for name, dtype_name, shape, offset in metadata:
        dtype = getattr(torch, dtype_name)
        num_bytes = dtype.itemsize * int(torch.Size(shape).numel())
        bucket.append((name, buffer[offset : offset + num_bytes].view(dtype).view(shape)))
    return bucket

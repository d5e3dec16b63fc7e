"""The receiving end of a CUDA IPC weight bucket: open the sender's buffer on this GPU, view its tensors."""

from __future__ import annotations

from typing import Any

import torch

# (name, dtype name, shape, byte offset) of each tensor in a bucket's byte buffer
BucketMetadata = list[tuple[str, str, tuple[int, ...], int]]


def device_uuid(device: torch.device) -> str:
    return str(torch.cuda.get_device_properties(device).uuid) if device.type == "cuda" else "cpu"


def open_ipc_bucket(handles: dict[str, Any], metadata: BucketMetadata, device: torch.device) -> list[tuple[str, torch.Tensor]]:
    """`handles` maps GPU UUIDs to `reduce_tensor` arguments of the bucket buffer on that GPU; this takes the one
    on `device`. The views are valid while the sender keeps its buffer (until the receiver returns)."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    args = list(handles[device_uuid(device)])
    # The sender's device index means nothing in this process.
    args[6] = device.index if device.index is not None else torch.cuda.current_device()
    return bucket_views(rebuild_cuda_tensor(*args), metadata)


def bucket_views(buffer: torch.Tensor, metadata: BucketMetadata) -> list[tuple[str, torch.Tensor]]:
    """The named tensors inside a bucket's flat uint8 buffer."""
    bucket = []
    for name, dtype_name, shape, offset in metadata:
        dtype = getattr(torch, dtype_name)
        num_bytes = dtype.itemsize * int(torch.Size(shape).numel())
        bucket.append((name, buffer[offset : offset + num_bytes].view(dtype).view(shape)))
    return bucket

"""A broadcast group between the trainer's sending rank and every rollout-engine worker, for engines on devices
of their own: each bucket goes out once from the sender's buffer (NCCL on GPUs, gloo on CPU) and lands in a
buffer on each worker's device, with no host copy and no object store.

The group is its own: a TCPStore the sender hosts and a ProcessGroupNCCL / ProcessGroupGloo built on it, apart
from the trainer's torch.distributed world and from vLLM's, so neither side's collectives can interleave with it.
Rank 0 is the sender; engine e's TP worker w is rank 1 + e * engine_tp + w.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch

from lmmrl_megatron.rollout.ipc import BucketMetadata, bucket_views

TIMEOUT = datetime.timedelta(minutes=10)


@dataclass(frozen=True)
class GroupAddress:
    host: str
    port: int
    world_size: int
    backend: str  # "nccl" or "gloo"


def join_group(address: GroupAddress, rank: int):
    """This process's member of the group; blocks until all world_size members have joined."""
    import torch.distributed as dist

    store = dist.TCPStore(address.host, address.port, address.world_size, is_master=rank == 0, timeout=TIMEOUT)
    if address.backend == "nccl":
        return dist.ProcessGroupNCCL(store, rank, address.world_size)
    return dist.ProcessGroupGloo(store, rank, address.world_size, TIMEOUT)


def receive_bucket(group, metadata: BucketMetadata, num_bytes: int, device: torch.device) -> list[tuple[str, torch.Tensor]]:
    """The next bucket the sender broadcasts, as named tensors on `device` (valid until the next bucket)."""
    buffer = torch.empty(num_bytes, dtype=torch.uint8, device=device)
    group.broadcast(buffer, 0).wait()
    return bucket_views(buffer, metadata)

"""Weight sync, trainer side: the TP x PP export's Hugging Face buckets carried to the rollout engines.

The export (`convert/export.py`) makes the buckets; a transport only decides how their bytes reach the engines.
Every sync is framed by `begin_weight_update(manifest)` / `finish_weight_update()` on each engine, so an engine
checks it received every tensor the plan names, exactly once, and drops caches built on the old weights.

- `object_store`: one model replica (data-parallel rank 0) exports to its first rank, which puts each bucket in
  Ray's object store as host tensors; every engine loads it. Works everywhere (CPU runs, engines on GPUs of
  their own) at host-copy speed.
- `broadcast`: engines on devices of their own. The replica's first rank and every engine worker form a group of
  their own (`rollout/broadcast.py`, NCCL or gloo); each bucket is broadcast once from the sender's buffer.
- `cuda_ipc`: engines colocated with the trainer on the same GPUs. Every replica exports with the bucket
  broadcast to all its ranks, so each GPU holds each bucket; each rank shares its bucket buffer by CUDA IPC and
  the engine worker on that GPU reads it in place: no host copy, no object store. The buffers are kept across
  syncs, so each engine worker opens them once.

Every sender keeps the export plan of its first sync (`_CachedPlan`).
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import torch

from lmmrl_megatron.convert.export import BucketPlan, ShardsToHF, export_hf_weights, plan_export
from lmmrl_megatron.rollout.ipc import device_uuid


def _bucket_metadata(views: Sequence[tuple[str, torch.Tensor]]) -> tuple[torch.Tensor, list[tuple[str, str, tuple[int, ...], int]]]:
    """The flat byte buffer under a bucket's views, and each view's (name, dtype, shape, byte offset) in it."""
    storage = views[0][1].untyped_storage()
    buffer = torch.empty(0, dtype=torch.uint8, device=views[0][1].device).set_(storage)
    base = storage.data_ptr()
    metadata = [(name, str(t.dtype).removeprefix("torch."), tuple(t.shape), t.data_ptr() - base) for name, t in views]
    return buffer, metadata


class _CachedPlan:
    """The export plan, made once: names, shapes and byte offsets never change during a run (the values are read
    afresh at every export). Planning runs the mapping on meta tensors for every parameter and gathers over the PP
    group: on a 3B model that costs as much host time as filling the buckets, so no sync after the first pays it."""

    def __init__(self) -> None:
        self._key: tuple[int, ...] | None = None
        self.plan: list[BucketPlan] = []
        self.manifest: list[str] = []

    def get(self, chunks, shards_to_hf: ShardsToHF, bucket_bytes: int) -> list[BucketPlan]:
        key = (bucket_bytes, *(id(chunk) for chunk in chunks))
        if key != self._key:
            self.plan = plan_export(chunks, shards_to_hf, bucket_bytes)
            self.manifest = [spec.name for bucket in self.plan for param in bucket.params for spec in param.hf_specs]
            self._key = key
        return self.plan


def _sync_from_first_rank(
    plans: _CachedPlan, chunks, shards_to_hf: ShardsToHF, engines: list[Any], bucket_bytes: int, send, prepare=None
) -> dict[str, float]:
    """The frame of the transports whose sender is one replica's first rank: data-parallel rank 0 exports to it,
    `prepare()` runs there once before the sync, `send(bucket)` hands each bucket to the engines and returns when
    they have loaded it (the bucket's buffer is reused for the next one)."""
    import ray
    from megatron.core import parallel_state as ps

    if ps.get_data_parallel_rank() != 0:
        return {}
    plan = plans.get(chunks, shards_to_hf, bucket_bytes)
    is_sender = ps.get_pipeline_model_parallel_rank() == 0 and ps.get_tensor_model_parallel_rank() == 0
    if is_sender:
        if prepare is not None:
            prepare()
        ray.get([engine.begin_weight_update.remote(plans.manifest) for engine in engines])
    num_tensors, num_bytes = 0, 0
    for bucket in export_hf_weights(chunks, shards_to_hf, bucket_bytes, receivers="first_rank", plan=plan):
        send(bucket)
        num_tensors += len(bucket)
        num_bytes += sum(t.numel() * t.element_size() for _, t in bucket)
    if not is_sender:
        return {}
    ray.get([engine.finish_weight_update.remote() for engine in engines])
    return {"sync/num_tensors": float(num_tensors), "sync/bytes": float(num_bytes)}


class ObjectStoreSender:
    def __init__(self) -> None:
        self.plans = _CachedPlan()

    def sync(self, chunks, shards_to_hf: ShardsToHF, engines: list[Any], bucket_bytes: int) -> dict[str, float]:
        import ray

        def send(bucket) -> None:
            ref = ray.put([(name, tensor.cpu()) for name, tensor in bucket])
            ray.get([engine.update_weights.remote(ref) for engine in engines])

        return _sync_from_first_rank(self.plans, chunks, shards_to_hf, engines, bucket_bytes, send)


class CudaIpcSender:
    """Colocated engines read the trainer's bucket buffers in place. Collective over every trainer rank; global
    rank 0 drives the engines.

    Two buffers per rank (slots), each the size of the largest bucket, are allocated at the first sync and kept:
    bucket i is filled into slot i % 2, so the engines read bucket i while the ranks fill bucket i + 1, and each
    engine worker opens a slot's CUDA IPC handle once for the whole run (`rollout/ipc.py` keeps it open). Handles
    are exchanged only when a slot is (re)allocated. A rank refills a slot only after every engine has loaded the
    bucket in it (rank 0 waits for the loads, then a barrier). The slots hold 2 x the largest bucket of GPU memory
    for the run: what the caching allocator held after each sync before they were kept."""

    NUM_SLOTS = 2

    def __init__(self) -> None:
        self.plans = _CachedPlan()
        self.slots: list[torch.Tensor] = []
        self.handles: list[dict[str, Any]] = []  # per slot: GPU UUID -> that rank's handle of the slot
        self.metadata: dict[int, Any] = {}  # bucket index -> its tensors' (name, dtype, shape, offset in the slot)
        self._metadata_plan: list[BucketPlan] | None = None  # the plan `metadata` was made for

    def _ensure_slots(self, plan: list[BucketPlan], device: torch.device) -> None:
        from torch.multiprocessing.reductions import reduce_tensor

        if plan is not self._metadata_plan:
            self.metadata, self._metadata_plan = {}, plan
        size = max(bucket.num_bytes for bucket in plan)
        if self.slots and self.slots[0].numel() >= size:
            return
        self.slots = [torch.empty(size, dtype=torch.uint8, device=device) for _ in range(self.NUM_SLOTS)]
        self.metadata = {}
        uuid = device_uuid(device)
        gathered: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, [(uuid, reduce_tensor(slot)[1]) for slot in self.slots])
        self.handles = [{rank_slots[i][0]: rank_slots[i][1] for rank_slots in gathered} for i in range(self.NUM_SLOTS)]

    def sync(self, chunks, shards_to_hf: ShardsToHF, engines: list[Any], bucket_bytes: int) -> dict[str, float]:
        import ray

        is_driver = torch.distributed.get_rank() == 0
        plan = self.plans.get(chunks, shards_to_hf, bucket_bytes)
        self._ensure_slots(plan, torch.device("cuda", torch.cuda.current_device()))
        if is_driver:
            ray.get([engine.begin_weight_update.remote(self.plans.manifest) for engine in engines])
        num_tensors, num_bytes, export_s, wait_s = 0, 0, 0.0, 0.0
        buckets = export_hf_weights(
            chunks, shards_to_hf, bucket_bytes, receivers="all_ranks", plan=plan,
            buffer_for=lambda index: self.slots[index % self.NUM_SLOTS],
        )
        in_flight: list[Any] = []  # the engines' loads of the previous bucket
        for index in range(len(plan) + 1):
            start = time.perf_counter()
            bucket = next(buckets, None)
            export_s += time.perf_counter() - start
            if index > 0:
                start = time.perf_counter()
                ray.get(in_flight)
                wait_s += time.perf_counter() - start
                torch.distributed.barrier()  # no rank refills a slot before every engine has read it
                in_flight = []
            if bucket is None:
                break
            if index not in self.metadata:  # the same views of the same slot every sync
                self.metadata[index] = _bucket_metadata(bucket)[1]
            metadata = self.metadata[index]
            torch.cuda.current_stream().synchronize()  # the bucket is complete before another process reads it
            if is_driver:
                slot = index % self.NUM_SLOTS
                in_flight = [engine.update_weights_ipc.remote(self.handles[slot], metadata, slot) for engine in engines]
                num_tensors += len(bucket)
                num_bytes += sum(t.numel() * t.element_size() for _, t in bucket)
        assert next(buckets, None) is None
        if not is_driver:
            return {}
        ray.get([engine.finish_weight_update.remote() for engine in engines])
        return {
            "sync/num_tensors": float(num_tensors), "sync/bytes": float(num_bytes),
            "sync/export_s": export_s, "sync/engine_wait_s": wait_s,
        }


class BroadcastSender:
    """The sending end of the broadcast transport; the group is formed at the first sync and kept."""

    def __init__(self, engine_tp: int) -> None:
        self.engine_tp = engine_tp
        self.group = None
        self.plans = _CachedPlan()

    def _form_group(self, engines: list[Any], device: torch.device) -> None:
        import ray

        from lmmrl_megatron.rollout.broadcast import GroupAddress, join_group
        from lmmrl_megatron.trainer.policy_worker import free_port

        host = ray.util.get_node_ip_address() if device.type == "cuda" else "127.0.0.1"
        world_size = 1 + len(engines) * self.engine_tp
        address = GroupAddress(host, free_port(), world_size, "nccl" if device.type == "cuda" else "gloo")
        joined = [engine.join_broadcast_group.remote(address, 1 + i * self.engine_tp) for i, engine in enumerate(engines)]
        self.group = join_group(address, 0)
        ray.get(joined)

    def sync(self, chunks, shards_to_hf: ShardsToHF, engines: list[Any], bucket_bytes: int) -> dict[str, float]:
        import ray

        def prepare() -> None:
            if self.group is None:
                self._form_group(engines, next(chunks[0].parameters()).device)

        def send(bucket) -> None:
            buffer, metadata = _bucket_metadata(bucket)
            receiving = [engine.update_weights_broadcast.remote(metadata, buffer.numel()) for engine in engines]
            self.group.broadcast(buffer, 0).wait()
            ray.get(receiving)

        return _sync_from_first_rank(self.plans, chunks, shards_to_hf, engines, bucket_bytes, send, prepare)

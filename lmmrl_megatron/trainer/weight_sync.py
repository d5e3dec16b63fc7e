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
  the engine worker on that GPU reads it in place: no host copy, no object store.
"""

from __future__ import annotations

import time
from typing import Any, Literal, Sequence

import torch

from lmmrl_megatron.convert.export import ShardsToHF, export_hf_weights, plan_export
from lmmrl_megatron.rollout.ipc import device_uuid

Transport = Literal["cuda_ipc", "broadcast", "object_store"]


def choose_transport(requested: str, use_gpu: bool, colocated: bool) -> Transport:
    """`auto`: CUDA IPC when engines share the trainer's GPUs, a broadcast when they have GPUs of their own, the
    object store on CPU."""
    if requested == "auto":
        if not use_gpu:
            return "object_store"
        return "cuda_ipc" if colocated else "broadcast"
    assert requested != "cuda_ipc" or (use_gpu and colocated), "RunConfig refuses cuda_ipc without colocated GPUs"
    return requested  # type: ignore[return-value]


def _manifest(plan) -> list[str]:
    return [spec.name for bucket in plan for param in bucket.params for spec in param.hf_specs]


def _bucket_metadata(views: Sequence[tuple[str, torch.Tensor]]) -> tuple[torch.Tensor, list[tuple[str, str, tuple[int, ...], int]]]:
    """The flat byte buffer under a bucket's views, and each view's (name, dtype, shape, byte offset) in it."""
    storage = views[0][1].untyped_storage()
    buffer = torch.empty(0, dtype=torch.uint8, device=views[0][1].device).set_(storage)
    base = storage.data_ptr()
    metadata = [(name, str(t.dtype).removeprefix("torch."), tuple(t.shape), t.data_ptr() - base) for name, t in views]
    return buffer, metadata


def _sync_from_first_rank(chunks, shards_to_hf: ShardsToHF, engines: list[Any], bucket_bytes: int, send, prepare=None) -> dict[str, float]:
    """The frame of the transports whose sender is one replica's first rank: data-parallel rank 0 exports to it,
    `prepare()` runs there once before the sync, `send(bucket)` hands each bucket to the engines and returns when
    they have loaded it (the bucket's buffer is reused for the next one)."""
    import ray
    from megatron.core import parallel_state as ps

    if ps.get_data_parallel_rank() != 0:
        return {}
    plan = plan_export(chunks, shards_to_hf, bucket_bytes)
    is_sender = ps.get_pipeline_model_parallel_rank() == 0 and ps.get_tensor_model_parallel_rank() == 0
    if is_sender:
        if prepare is not None:
            prepare()
        ray.get([engine.begin_weight_update.remote(_manifest(plan)) for engine in engines])
    num_tensors, num_bytes = 0, 0
    for bucket in export_hf_weights(chunks, shards_to_hf, bucket_bytes, receivers="first_rank", plan=plan):
        send(bucket)
        num_tensors += len(bucket)
        num_bytes += sum(t.numel() * t.element_size() for _, t in bucket)
    if not is_sender:
        return {}
    ray.get([engine.finish_weight_update.remote() for engine in engines])
    return {"sync/num_tensors": float(num_tensors), "sync/bytes": float(num_bytes)}


def sync_object_store(chunks, shards_to_hf: ShardsToHF, engines: list[Any], bucket_bytes: int) -> dict[str, float]:
    import ray

    def send(bucket) -> None:
        ref = ray.put([(name, tensor.cpu()) for name, tensor in bucket])
        ray.get([engine.update_weights.remote(ref) for engine in engines])

    return _sync_from_first_rank(chunks, shards_to_hf, engines, bucket_bytes, send)


def sync_cuda_ipc(chunks, shards_to_hf: ShardsToHF, engines: list[Any], bucket_bytes: int) -> dict[str, float]:
    """Collective over every trainer rank; global rank 0 drives the engines.

    Two buckets are alive at a time: the engines read bucket i while the ranks fill bucket i + 1, and a rank lets
    bucket i go only after every engine has loaded it (a barrier after rank 0 has seen them finish)."""
    import ray
    from torch.multiprocessing.reductions import reduce_tensor

    is_driver = torch.distributed.get_rank() == 0
    uuid = device_uuid(torch.device("cuda", torch.cuda.current_device()))
    plan = plan_export(chunks, shards_to_hf, bucket_bytes)
    if is_driver:
        ray.get([engine.begin_weight_update.remote(_manifest(plan)) for engine in engines])
    num_tensors, num_bytes, export_s, wait_s = 0, 0, 0.0, 0.0
    buckets = export_hf_weights(chunks, shards_to_hf, bucket_bytes, receivers="all_ranks", plan=plan)
    in_flight: list[Any] = []  # the engines' loads of the previous bucket
    previous = None  # that bucket's views: they keep its buffer alive until the loads are done
    while True:
        start = time.perf_counter()
        bucket = next(buckets, None)
        export_s += time.perf_counter() - start
        if previous is not None:
            start = time.perf_counter()
            ray.get(in_flight)
            wait_s += time.perf_counter() - start
            torch.distributed.barrier()  # no rank frees its buffer before every engine has read it
            previous, in_flight = None, []
        if bucket is None:
            break
        buffer, metadata = _bucket_metadata(bucket)
        torch.cuda.current_stream().synchronize()  # the bucket is complete before another process reads it
        handles: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(handles, (uuid, reduce_tensor(buffer)[1]))
        if is_driver:
            by_gpu = dict(handles)
            in_flight = [engine.update_weights_ipc.remote(by_gpu, metadata) for engine in engines]
            num_tensors += len(bucket)
            num_bytes += sum(t.numel() * t.element_size() for _, t in bucket)
        previous = bucket
        del buffer
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

        return _sync_from_first_rank(chunks, shards_to_hf, engines, bucket_bytes, send, prepare)

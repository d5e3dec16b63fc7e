"""Methods added to every vLLM worker (vLLM's `worker_extension_cls`): the receiving end of a weight sync.

vLLM calls them through `collective_rpc`, so each TP worker runs them on its own device. Their names carry an
`lmmrl_` prefix: an extension must not shadow the Worker's own methods (`update_weights`, `sleep`, ...).

A sync is `lmmrl_begin_update(manifest)`, then buckets, then `lmmrl_finish_update()`, which checks that every
manifest name arrived exactly once. How a bucket is loaded depends on the platform:
- GPU: `model.load_weights` per bucket, straight from the received tensors (vLLM keeps unquantized weights in
  checkpoint layout, only sharded over TP, so nothing needs re-processing).
- CPU: vLLM repacks linear weights for its CPU kernels after loading, and `load_weights` on the live model writes
  into tensors no kernel reads any more. The buckets are kept until the end of the sync and loaded with
  `model_runner.reload_weights`, which restores the checkpoint layout, loads and repacks layer by layer; it must
  see every tensor of each layer it touches, which a whole sync does.
"""

from __future__ import annotations

from typing import Any

import torch

from lmmrl_megatron.rollout.broadcast import GroupAddress, join_group, receive_bucket
from lmmrl_megatron.rollout.ipc import BucketMetadata, IpcBuffers, device_uuid, open_ipc_bucket


class WeightReceiver:
    """Mixed into vLLM's Worker class; `self` is the worker (`self.model_runner`, `self.device`)."""

    def lmmrl_begin_update(self, manifest: list[str]) -> None:
        self._lmmrl_manifest = set(manifest)
        self._lmmrl_received: set[str] = set()
        self._lmmrl_held: list[tuple[str, torch.Tensor]] = []

    def _lmmrl_account(self, names: list[str]) -> None:
        manifest = getattr(self, "_lmmrl_manifest", None)
        assert manifest is not None, "lmmrl_begin_update must start a weight sync"
        unknown = [n for n in names if n not in manifest]
        repeated = [n for n in names if n in self._lmmrl_received]
        if unknown or repeated:
            raise ValueError(f"weight sync: names not in the manifest {unknown[:5]}, received twice {repeated[:5]}")
        self._lmmrl_received.update(names)

    def _lmmrl_load(self, bucket: list[tuple[str, torch.Tensor]]) -> int:
        self._lmmrl_account([name for name, _ in bucket])
        if self.device.type == "cpu":
            self._lmmrl_held.extend(bucket)
        else:
            self.model_runner.get_model().load_weights(bucket)
        return len(bucket)

    def lmmrl_load_tensors(self, bucket: list[tuple[str, torch.Tensor]]) -> int:
        if self.device.type == "cpu":
            # The caller may reuse its tensors after this returns; the CPU path holds them to the end of the sync.
            bucket = [(name, tensor.clone()) for name, tensor in bucket]
        return self._lmmrl_load(bucket)

    def lmmrl_load_ipc_bucket(self, handles: dict[str, Any], metadata: BucketMetadata, slot: int | None = None) -> int:
        """Open the sender's bucket buffer on this GPU by CUDA IPC (once per slot the sender reuses) and load the
        tensors it holds."""
        if not hasattr(self, "_lmmrl_ipc_buffers"):
            self._lmmrl_ipc_buffers = IpcBuffers()
        bucket = open_ipc_bucket(handles, metadata, self.device, slot, self._lmmrl_ipc_buffers)
        num_loaded = self._lmmrl_load(bucket)
        torch.cuda.current_stream().synchronize()  # the sender frees or refills the buffer once this returns
        return num_loaded

    def lmmrl_join_group(self, address: GroupAddress, engine_first_rank: int) -> None:
        """Join the trainer's broadcast group (rollout/broadcast.py) as rank engine_first_rank + this TP rank."""
        self._lmmrl_group = join_group(address, engine_first_rank + self.rank)

    def lmmrl_receive_bucket(self, metadata: BucketMetadata, num_bytes: int) -> int:
        return self._lmmrl_load(receive_bucket(self._lmmrl_group, metadata, num_bytes, self.device))

    def lmmrl_finish_update(self) -> int:
        missing = self._lmmrl_manifest - self._lmmrl_received
        if missing:
            raise ValueError(f"weight sync ended without {len(missing)} tensors, e.g. {sorted(missing)[:5]}")
        if self._lmmrl_held:
            self.model_runner.reload_weights(weights_iterator=iter(self._lmmrl_held), is_checkpoint_format=True)
        num_received = len(self._lmmrl_received)
        del self._lmmrl_manifest, self._lmmrl_received, self._lmmrl_held
        return num_received

    def lmmrl_device_uuid(self) -> str:
        return device_uuid(self.device)

"""The weight-sync transports' pure parts: choosing a transport, and a bucket's flat buffer and offsets, which the
CUDA IPC receiver turns back into the same named tensors (the IPC hand-over itself runs on GPUs only)."""

from __future__ import annotations

import torch

from lmmrl_megatron.config import RunConfig, load_config
from lmmrl_megatron.config.validate import run_config_problems
from lmmrl_megatron.convert.export import BucketPlan, ParamExport, _views
from lmmrl_megatron.convert.hf_io import TensorSpec
from lmmrl_megatron.rollout.ipc import bucket_views
from lmmrl_megatron.rollout.transport import choose_transport
from lmmrl_megatron.trainer.weight_sync import _bucket_metadata


def test_auto_picks_ipc_when_colocated_broadcast_when_separate_host_copies_on_cpu() -> None:
    assert choose_transport("auto", use_gpu=True, colocated=True) == "cuda_ipc"
    assert choose_transport("auto", use_gpu=True, colocated=False) == "broadcast"
    assert choose_transport("auto", use_gpu=False, colocated=True) == "object_store"
    assert choose_transport("object_store", use_gpu=True, colocated=True) == "object_store"


def test_the_config_validator_refuses_cuda_ipc_without_colocated_gpus() -> None:
    config = load_config(RunConfig, None, ["rollout.weight_transport=cuda_ipc", "trainer.num_gpus_per_node=0"])
    assert any("weight_transport=cuda_ipc needs GPUs" in p for p in run_config_problems(config))


def test_bucket_metadata_round_trips_through_the_receivers_views() -> None:
    specs = [
        TensorSpec("a.weight", (3, 5), torch.float32),
        TensorSpec("a.bias", (3,), torch.bfloat16),
        TensorSpec("b.weight", (2, 2, 2), torch.float16),
    ]
    bucket = BucketPlan(0, (ParamExport(0, 0, "a", "a", tuple(specs[:2])), ParamExport(0, 0, "b", "b", (specs[2],))))
    buffer = torch.zeros(bucket.num_bytes, dtype=torch.uint8)
    views = _views(buffer, bucket)
    for i, (_, view) in enumerate(views):
        view.copy_(torch.arange(view.numel()).reshape(view.shape) * (i + 1))
    flat, metadata = _bucket_metadata(views)
    assert flat.data_ptr() == buffer.data_ptr() and flat.numel() == buffer.numel()
    assert [m[0] for m in metadata] == [s.name for s in specs]
    assert [m[3] % 16 for m in metadata] == [0, 0, 0]  # the export aligns every tensor to 16 bytes
    for (name, sent), (got_name, got) in zip(views, bucket_views(flat, metadata), strict=True):
        assert name == got_name and got.dtype == sent.dtype and torch.equal(got, sent)

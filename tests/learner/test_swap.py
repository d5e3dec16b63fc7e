"""The colocated swap (learner/swap.py): optimizer state to host chunks and back, training unchanged bit for bit.

Two real Megatron learners per dtype over gloo (2 data-parallel ranks, the distributed optimizer sharding the
state): one offloads and onloads around every step, as a colocated run does, one never does. Losses, grad norms,
weights and optimizer state must be identical after three steps. Host chunks of a few KiB make storages span chunks.
"""

from __future__ import annotations

import pytest
import torch

from lmmrl_megatron.config.sections import OptimizerConfig
from lmmrl_megatron.learner.micro_batch import collate
from lmmrl_megatron.learner.swap import HostSwap, optimizer_state_tensors
from lmmrl_megatron.parallel.local_ranks import run_distributed
from lmmrl_megatron.testing.tiny_gpt import VOCAB
from tests.learner.test_megatron_learner import gpt_forward, make_batch

STEPS = 3
CHUNK_BYTES = 4093  # odd, small: storages span chunks and chunk boundaries fall inside elements


def _build(bf16: bool, chunk_bytes: int):
    from lmmrl_megatron.learner.megatron_learner import MegatronLearner
    from lmmrl_megatron.testing.tiny_gpt import build_tiny_gpt

    model = build_tiny_gpt()
    if bf16:  # what a bf16 run holds: bf16 weights, fp32 main params in the optimizer (those are swapped too)
        model = model.bfloat16()
        model.config.bf16, model.config.params_dtype = True, torch.bfloat16
    config = OptimizerConfig(lr=1e-2, clip_grad=1.0, weight_decay=0.1)
    return MegatronLearner([model], gpt_forward, VOCAB, config, bf16=bf16, swap_chunk_bytes=chunk_bytes)


def _state(learner) -> list[torch.Tensor]:
    return [t.detach().clone() for t in optimizer_state_tensors(learner.optimizer)]


def swap_worker() -> dict[str, object]:
    from megatron.core import parallel_state as ps

    batch = make_batch()
    mine = batch.shard(ps.get_data_parallel_rank(), ps.get_data_parallel_world_size())
    micro_batches = [collate(batch, mine[:2]), collate(batch, mine[2:])]
    global_tokens = int(batch.response_mask.sum())

    def loss_fn(logprobs, entropy, mb):
        loss = -(logprobs * mb.advantages * mb.loss_mask).sum() / global_tokens
        return loss, {"loss": loss.item()}

    out: dict[str, object] = {}
    for dtype in ("fp32", "bf16"):
        plain, swapped = _build(dtype == "bf16", CHUNK_BYTES), _build(dtype == "bf16", CHUNK_BYTES)
        swapped.offload()  # as at a colocated run's start: no Adam moments yet, the host chunks grow later
        swapped.onload()
        record: dict[str, list] = {"plain": [], "swapped": [], "bytes": [], "freed": [], "chunk_ptrs": []}
        for _ in range(STEPS):
            record["plain"].append(plain.train_step(micro_batches, loss_fn))
            record["swapped"].append(swapped.train_step(micro_batches, loss_fn))
            state_before = _state(swapped)
            stats = swapped.offload()
            record["bytes"].append(stats.bytes)
            keep = swapped._weight_storages()
            record["freed"].append(all(
                t.untyped_storage().nbytes() == 0
                for t in optimizer_state_tensors(swapped.optimizer)
                if t.untyped_storage().data_ptr() not in keep
            ))
            record["chunk_ptrs"].append([c.data_ptr() for c in swapped.host_swap.chunks])
            swapped.onload()
            record["state_roundtrip"] = all(torch.equal(a, b) for a, b in zip(state_before, _state(swapped)))
        record["weights_equal"] = all(
            torch.equal(a, b) for a, b in zip(plain.model[0].parameters(), swapped.model[0].parameters())
        )
        record["state_equal"] = all(torch.equal(a, b) for a, b in zip(_state(plain), _state(swapped)))
        record["state_bytes"] = sum(t.numel() * t.element_size() for t in _state(plain))
        record["weight_dtype"] = str(next(plain.model[0].parameters()).dtype)
        out[dtype] = record
    return out


@pytest.fixture(scope="module")
def runs() -> list[dict]:
    return run_distributed(swap_worker, world_size=2)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_training_with_the_swap_is_bit_exact(runs, dtype: str) -> None:
    for rank in runs:
        r = rank[dtype]
        assert r["weight_dtype"] == {"fp32": "torch.float32", "bf16": "torch.bfloat16"}[dtype]
        assert [m["loss"] for m in r["swapped"]] == [m["loss"] for m in r["plain"]]
        assert [m["grad_norm"] for m in r["swapped"]] == [m["grad_norm"] for m in r["plain"]]
        assert r["plain"][0]["loss"] != r["plain"][-1]["loss"]  # the steps did train
        assert r["weights_equal"] and r["state_equal"] and r["state_roundtrip"]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_the_swap_frees_the_state_and_reuses_its_host_chunks(runs, dtype: str) -> None:
    for rank in runs:
        r = rank[dtype]
        assert all(r["freed"])
        # fp32: the Adam moments (the optimizer steps views of the weights); bf16: the fp32 main params too
        assert r["bytes"][0] > 0 and len(set(r["bytes"])) == 1
        assert r["chunk_ptrs"][0] == r["chunk_ptrs"][-1] and len(r["chunk_ptrs"][0]) > 1


def test_host_swap_round_trips_views_and_dtypes() -> None:
    """Storages shared by views are moved once; every byte comes back; the chunks are allocated once."""
    base = torch.randn(300, dtype=torch.float64)
    tensors = [base[10:50], base[100:], torch.randint(0, 255, (77,), dtype=torch.uint8), torch.randn(5, 3).bfloat16()]
    kept = torch.randn(9)
    expected = [t.clone() for t in tensors + [kept]]
    swap = HostSwap(torch.device("cpu"), chunk_bytes=1000)
    chunk_ptrs = None
    for _ in range(2):
        stats = swap.offload(tensors + [kept], keep={kept.untyped_storage().data_ptr()})
        assert stats.bytes == 300 * 8 + 77 + 15 * 2
        assert all(t.untyped_storage().nbytes() == 0 for t in tensors) and kept.untyped_storage().nbytes() == 36
        chunk_ptrs = chunk_ptrs or [c.data_ptr() for c in swap.chunks]
        assert [c.data_ptr() for c in swap.chunks] == chunk_ptrs and len(chunk_ptrs) == 3
        assert swap.onload().bytes == stats.bytes
        assert all(torch.equal(t, e) for t, e in zip(tensors + [kept], expected))
        assert tensors[0].untyped_storage().data_ptr() == tensors[1].untyped_storage().data_ptr()

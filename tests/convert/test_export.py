"""Bucketed live weight export from a model sharded over TP x PP, on the GPT test bed of gpt_fixture.

The known failure modes of other frameworks each have a check here: the vocabulary padding must not leak into the
exported embedding / lm_head; a tied embedding (held by the first and the last stage under PP) is exported once;
a second and third export after in-place updates must send the new values (no stale per-stage cache); a tensor
larger than the bucket travels alone; and every rank meant to receive gets exactly the HF state dict.
"""

from __future__ import annotations

import functools

import pytest
import torch

from lmmrl_megatron.convert.export import BucketPlan, ParamExport, export_hf_weights, plan_buckets, plan_export
from lmmrl_megatron.convert.hf_io import TensorSpec
from lmmrl_megatron.parallel.local_ranks import run_distributed
from tests.convert.gpt_fixture import (
    HIDDEN,
    VOCAB,
    build_gpt,
    gpt_shards_to_hf,
    init_by_global_name,
    reference_hf_state,
)

BUCKET_BYTES = 6000  # smaller than the 60 x 32 fp32 embedding (7680 bytes): it must travel alone


def _collect(model, tied: bool, receivers: str, reuse: dict | None = None) -> dict[str, object]:
    """One export's HF state. With `reuse`, the weight sync's way: one plan for every export and two buffers
    (slots) that the buckets take in turn, kept across exports."""
    mapping = functools.partial(gpt_shards_to_hf, tied=tied)
    state: dict[str, torch.Tensor] = {}
    buckets: list[tuple[list[str], int]] = []
    extra = {}
    if reuse is not None:
        if "plan" not in reuse:
            reuse["plan"] = plan_export([model], mapping, BUCKET_BYTES)
            size = max(bucket.num_bytes for bucket in reuse["plan"])
            reuse["slots"] = [torch.full((size,), 255, dtype=torch.uint8) for _ in range(2)]
        extra = dict(plan=reuse["plan"], buffer_for=lambda index: reuse["slots"][index % 2])
    for bucket in export_hf_weights([model], mapping, bucket_bytes=BUCKET_BYTES, receivers=receivers, **extra):
        names = [name for name, _ in bucket]
        assert not set(names) & set(state), "a tensor was exported twice"
        # numpy, not torch: tensors returned from a worker travel through shared memory that dies with the worker
        state.update({name: tensor.numpy().copy() for name, tensor in bucket})
        buckets.append((names, sum(t.numel() * t.element_size() for _, t in bucket)))
    return {"state": state, "buckets": buckets}


def export_after_updates(tied: bool, salts: list[str], receivers: str, reuse: bool = False) -> list[dict[str, object]]:
    """Worker: export once per salt, each time after overwriting every parameter in place with that salt's model."""
    model = build_gpt(tied=tied)
    exports = []
    kept: dict | None = {} if reuse else None
    for salt in salts:
        if salt.startswith("new storage"):  # parameters given new tensors: kept views of the old must not be sent
            for param in model.parameters():
                param.data = param.data.clone()
        init_by_global_name(model, salt=salt)
        exports.append(_collect(model, tied, receivers, kept))
    return exports


def _assert_equal_states(got: dict[str, object], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for name in want:
        assert torch.equal(torch.from_numpy(got[name]), want[name]), name


@pytest.mark.parametrize(
    "tp,pp,tied",
    [(1, 1, False), (2, 1, True), (1, 2, True), (2, 2, False)],
    ids=["tp1pp1", "tp2-tied", "pp2-tied", "tp2pp2"],
)
@pytest.mark.parametrize("reuse", [False, True], ids=["fresh", "kept-plan-and-slots"])
def test_every_rank_receives_the_hf_state_dict_and_new_values_after_each_update(
    tp: int, pp: int, tied: bool, reuse: bool
) -> None:
    salts = ["", "update 1", "new storage, update 2"]
    results = run_distributed(export_after_updates, tp * pp, tp, pp, args=(tied, salts, "all_ranks", reuse))
    for rank_exports in results:
        for salt, export in zip(salts, rank_exports):
            want = reference_hf_state(tied=tied, salt=salt)
            _assert_equal_states(export["state"], want)
            # Padding rows never leave the trainer, and a tied embedding is exported once, as HF ties it.
            assert export["state"]["model.embed_tokens.weight"].shape == (VOCAB, HIDDEN)
            assert ("lm_head.weight" in export["state"]) == (not tied)
            for names, num_bytes in export["buckets"]:
                assert num_bytes <= BUCKET_BYTES or len(names) == 1 or _is_one_param(names), (names, num_bytes)
    # The embedding (7680 bytes) exceeds the bucket and is sent alone.
    assert ["model.embed_tokens.weight"] in [names for names, _ in results[0][0]["buckets"]]


def _is_one_param(names: list[str]) -> bool:
    """q/k/v (or gate/up) of one Megatron parameter always travel together."""
    prefixes = {name.rsplit(".", 2)[0].replace("self_attn", "attn").rsplit(".", 1)[0] for name in names}
    return len(prefixes) == 1


def test_first_rank_receivers_get_everything_and_others_nothing() -> None:
    results = run_distributed(export_after_updates, 4, 2, 2, args=(False, ["", "update 1"], "first_rank"))
    for salt, export in zip(["", "update 1"], results[0]):
        _assert_equal_states(export["state"], reference_hf_state(salt=salt))
    for rank_exports in results[1:]:
        assert all(export["state"] == {} for export in rank_exports)


def _param(stage: int, name: str, num_bytes: int) -> ParamExport:
    spec = TensorSpec(name, (num_bytes // 4,), torch.float32)
    return ParamExport(stage, 0, name, name, (spec,))


def test_bucket_plan_respects_the_limit_order_and_stages() -> None:
    stage0 = [_param(0, "a", 64), _param(0, "b", 32), _param(0, "c", 48), _param(0, "big", 400), _param(0, "d", 16)]
    stage1 = [_param(1, "e", 16), _param(1, "f", 96)]
    buckets = plan_buckets([stage0, stage1], bucket_bytes=112)
    as_names = [(b.stage, [p.global_name for p in b.params]) for b in buckets]
    assert as_names == [(0, ["a", "b"]), (0, ["c"]), (0, ["big"]), (0, ["d"]), (1, ["e", "f"])]
    assert all(b.num_bytes <= 112 for b in buckets if len(b.params) > 1)
    assert BucketPlan(0, (stage0[3],)).num_bytes == 400


def test_bucket_plan_aligns_every_tensor_and_rejects_a_zero_budget() -> None:
    odd = ParamExport(0, 0, "odd", "odd", (TensorSpec("odd", (3,), torch.float16),))  # 6 bytes -> 16 aligned
    assert odd.num_bytes == 16
    assert [len(b.params) for b in plan_buckets([[odd, odd, odd]], bucket_bytes=32)] == [2, 1]
    with pytest.raises(ValueError, match="bucket_bytes"):
        plan_buckets([[odd]], bucket_bytes=0)

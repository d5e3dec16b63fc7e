"""Store replicated KV heads once, so a distributed checkpoint does not depend on the TP size that saved it.

With fewer KV heads than TP ranks the decoder holds `R = tp / num_kv_heads` copies of each KV head (see
`config.kv_replication`): each rank's fused `linear_qkv` is one query group [its query heads; k; v], so Megatron's
own sharded state dict would describe a global tensor of `tp` groups, whose shape changes with TP. Here the fused
qkv weight and bias of such a model are described instead as pieces of the *unreplicated* tensor, the one a model
with `num_query_groups = num_kv_heads` holds at TP=1: for each KV head j, its `num_heads / num_kv_heads` query heads,
then k_j, then v_j. Rank r (KV head j = r // R, copy c = r % R) holds query heads c * (num_heads / tp) ... of group
j, which it writes as its own pieces, and k_j, v_j, which only copy c = 0 writes (the others are replicas). On
load every copy reads k_j and v_j back, so the copies start equal, as they do from HF weights.

The pieces are one head (`head_dim` rows) each, a regular grid Megatron's save validation checks; a checkpoint so
written has the same keys and global shapes as one saved without replication, and either loads into the other,
at any TP/PP (the distributed checkpoint loader reads whatever chunks overlap). The optimizer's model-space state
goes through the same factory (Megatron hands it the optimizer's tensors in place of the parameter).
"""

from __future__ import annotations

from typing import Any

import torch

from lmmrl_megatron.models.qwen_vl.config import TextConfig, kv_replication

# The language decoder's fused qkv (the vision tower's attention has as many KV heads as query heads).
DECODER_QKV_KEYS = tuple(f"language_model.decoder.layers.self_attention.linear_qkv.{p}" for p in ("weight", "bias"))


def _kv_copy_replica_id(replica_id: Any, copy: int) -> Any:
    """The replica id of a KV piece on copy `copy` of its head: the original id when copy 0, never main otherwise."""
    if copy == 0:
        return replica_id
    if isinstance(replica_id, int):
        return (replica_id, copy)
    assert len(replica_id) == 3 and replica_id[1] == 0, f"unexpected replica id {replica_id} of a TP-split tensor"
    return (replica_id[0], copy, replica_id[2])


def unreplicated_qkv_factory(sh_ten, text: TextConfig, tp_rank: int, tp_size: int):
    """A `ShardedTensorFactory` that writes this rank's fused qkv shard `sh_ten` as pieces of the unreplicated
    tensor (see the module docstring) and reads it back from them."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    replication = kv_replication(text.num_key_value_heads, tp_size)
    assert replication > 1, "only models with replicated KV heads need the factory"
    head_dim, prepend = text.head_dim, sh_ten.prepend_axis_num
    heads_per_kv = text.num_attention_heads // text.num_key_value_heads  # query heads of one unreplicated group
    heads_per_rank = text.num_attention_heads // tp_size
    kv_head, copy = divmod(tp_rank, replication)
    group_start = kv_head * (heads_per_kv + 2)  # in units of heads: the grid along the fused axis
    num_pieces = text.num_key_value_heads * (heads_per_kv + 2)
    assert tuple(sh_ten.local_shape[:1]) == ((heads_per_rank + 2) * head_dim,), (sh_ten.key, sh_ten.local_shape)
    # The layer axis Megatron prepends (one slice per decoder layer) stays as it is.
    layer_offsets = [(axis, sh_ten.global_offset[axis], sh_ten.global_shape[axis]) for axis in range(prepend)]
    # (local head slot, global head slot, is a KV piece)
    slots = [(i, group_start + copy * heads_per_rank + i, False) for i in range(heads_per_rank)]
    slots += [(heads_per_rank, group_start + heads_per_kv, True), (heads_per_rank + 1, group_start + heads_per_kv + 1, True)]

    @torch.no_grad()
    def build(key: str, tensor: torch.Tensor, replica_id: Any, flattened_range: slice | None) -> list[Any]:
        assert flattened_range is None, "flattened (dp_zero) optimizer states are not supported; use fully_reshardable"
        return [
            ShardedTensor.from_rank_offsets(
                key,
                tensor[local * head_dim : (local + 1) * head_dim],
                *layer_offsets,
                (prepend, slot, num_pieces),
                replica_id=_kv_copy_replica_id(replica_id, copy) if is_kv else replica_id,
                prepend_axis_num=prepend,
            )
            for local, slot, is_kv in slots
        ]

    def merge(pieces: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(pieces, dim=0)

    return ShardedTensorFactory(sh_ten.key, sh_ten.data, build, merge, sh_ten.replica_id)


def store_kv_heads_unreplicated(
    sharded_state_dict: dict[str, Any], text: TextConfig, tp_rank: int, tp_size: int
) -> dict[str, Any]:
    """`sharded_state_dict` with every fused qkv tensor replaced by its unreplicated factory (a no-op when KV heads
    are not replicated at this TP size)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    if kv_replication(text.num_key_value_heads, tp_size) == 1:
        return sharded_state_dict
    out = dict(sharded_state_dict)
    for name, value in sharded_state_dict.items():
        if isinstance(value, ShardedTensor) and value.key.endswith(DECODER_QKV_KEYS):
            out[name] = unreplicated_qkv_factory(value, text, tp_rank, tp_size)
    return out

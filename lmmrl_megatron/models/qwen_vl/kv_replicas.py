"""Keep replicated KV heads identical: their gradients are summed across the TP ranks holding copies.

With fewer KV heads than TP ranks, the decoder holds `R = tp / num_kv_heads` copies of each KV head, one per rank
whose query heads read it (`num_query_groups = tp`, so each rank's fused `linear_qkv` holds one group:
[its query heads; k; v]). The loss depends on the one shared head through all R copies, so the shared head's
gradient is the sum of the copies' gradients. Each copy must receive that sum: then the copies, which start equal
(loaded from the same HF tensor), get the same update from any element-wise optimizer and stay equal.

`attach_kv_replica_grad_sync(model)` registers a gradient hook on every `linear_qkv` weight and bias of the chunk:
the hook all-reduces (sums) the K and V rows of the gradient over the TP group, each rank contributing its rows in
its head's slot of a [num_kv_heads, 2 * head_dim, ...] buffer, and writes each rank's slot back. It runs as the
gradient is produced, before it is accumulated, so it composes with gradient accumulation over micro-batches and
with Megatron's DDP (which reads the accumulated gradient later). Query rows are untouched.

Limitation: a backend that writes weight gradients straight into `main_grad` bypassing autograd hooks
(`gradient_accumulation_fusion`, which needs apex or transformer-engine) would skip the hook; the model refuses that
combination.
"""

from __future__ import annotations

from typing import Callable

import torch
from megatron.core import parallel_state
from torch import Tensor


def _kv_sum_hook(
    kv_rows: slice, kv_head: int, num_kv_heads: int, group: torch.distributed.ProcessGroup
) -> Callable[[Tensor], Tensor]:
    def hook(grad: Tensor) -> Tensor:
        rows = grad[kv_rows]
        buffer = grad.new_zeros(num_kv_heads, *rows.shape)
        buffer[kv_head] = rows
        torch.distributed.all_reduce(buffer, group=group)
        summed = grad.clone()
        summed[kv_rows] = buffer[kv_head]
        return summed

    return hook


def attach_kv_replica_grad_sync(
    qkv_params: list[torch.nn.Parameter], num_heads: int, num_kv_heads: int, head_dim: int
) -> int:
    """Register the replica-sum hook on each fused qkv parameter of this rank; returns how many were hooked.

    Does nothing (returns 0) when every KV head lives on exactly one rank.
    """
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    if num_kv_heads >= tp_size:
        return 0
    assert tp_size % num_kv_heads == 0, f"tp={tp_size} is not a multiple of num_kv_heads={num_kv_heads}"
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    group = parallel_state.get_tensor_model_parallel_group()
    query_rows = (num_heads // tp_size) * head_dim
    kv_rows = slice(query_rows, query_rows + 2 * head_dim)
    kv_head = tp_rank // (tp_size // num_kv_heads)
    for param in qkv_params:
        assert param.shape[0] == query_rows + 2 * head_dim, f"unexpected fused qkv shard shape {tuple(param.shape)}"
        param.register_hook(_kv_sum_hook(kv_rows, kv_head, num_kv_heads, group))
    return len(qkv_params)

"""Reducing per-token losses to one scalar, correctly across micro-batches and data-parallel ranks.

A global batch is split over data-parallel ranks and, on each rank, into micro-batches whose gradients are
accumulated. Each mode is a sum over tokens or sequences divided by a count over the *global* batch, so each
micro-batch contributes its own sum divided by that global count (`normaliser`), and summing the micro-batch
losses over micro-batches and ranks gives exactly the loss of the whole global batch:

    token_mean               sum_{valid tokens} l_t                              / num_valid_tokens(global)
    seq_mean_token_mean      sum_{sequences} (sum_t l_t / num_valid_tokens(seq))  / num_sequences(global)
    seq_mean_token_sum       sum_{sequences} sum_t l_t                           / num_sequences(global)
    seq_mean_token_sum_norm  sum_{sequences} sum_t l_t                           / (num_sequences(global) * L)

A sequence counts when it has at least one valid token, so all-padding rows change nothing. Dividing by each
micro-batch's own count instead would weight a token of a short micro-batch more than one of a long micro-batch.

`seq_mean_token_sum_norm` is Dr. GRPO's constant normaliser, under verl's name: the token sum is divided by a
length `L` that never changes during training (Dr. GRPO's MAX_TOKENS; the trainer passes the rollout's
`max_new_tokens`), so no response is weighted by its own length and the loss keeps the scale of `token_mean`.
verl divides by the padded width of the batch (`loss_mask.shape[-1]`, a TODO there says it should be constant);
that width is what `max_response_length=None` falls back to for padded inputs.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from lmmrl_megatron.algorithms.config import LossAggMode
from lmmrl_megatron.algorithms.masked import as_bool_mask, masked_sum
from lmmrl_megatron.algorithms.packing import per_sequence_count, per_sequence_sum

Normaliser = float | int | Tensor


def _norm_length(mask: Tensor, cu_seqlens: Tensor | None, max_response_length: int | None) -> int:
    if max_response_length is not None:
        if max_response_length < 1:
            raise ValueError(f"max_response_length must be >= 1, got {max_response_length}")
        return int(max_response_length)
    if cu_seqlens is not None:
        raise ValueError("loss_agg_mode 'seq_mean_token_sum_norm' on packed inputs needs max_response_length")
    return int(mask.shape[-1])  # verl's choice: the padded width


def aggregation_count(
    mask: Tensor, mode: LossAggMode, cu_seqlens: Tensor | None = None, max_response_length: int | None = None
) -> Tensor:
    """This batch's contribution to the normaliser of `mode`: its valid tokens, its non-empty sequences, or (for
    `seq_mean_token_sum_norm`) its non-empty sequences times the constant length `max_response_length`.

    Sum it over the micro-batches of a rank and all-reduce it over the data-parallel group (see
    `global_aggregation_count`) to get the `normaliser` every micro-batch of the step then uses.
    """
    bool_mask = as_bool_mask(mask)
    if mode == "token_mean":
        return bool_mask.sum()
    if mode in ("seq_mean_token_mean", "seq_mean_token_sum"):
        return (per_sequence_count(bool_mask, cu_seqlens) > 0).sum()
    if mode == "seq_mean_token_sum_norm":
        num_sequences = (per_sequence_count(bool_mask, cu_seqlens) > 0).sum()
        return num_sequences * _norm_length(bool_mask, cu_seqlens, max_response_length)
    raise ValueError(f"unknown loss_agg_mode {mode!r}")


def global_aggregation_count(
    masks: list[Tensor],
    mode: LossAggMode,
    cu_seqlens: list[Tensor | None] | None = None,
    process_group: dist.ProcessGroup | None = None,
    max_response_length: int | None = None,
) -> Tensor:
    """Normaliser for one optimizer step: the counts of this rank's micro-batches, summed over `process_group`.

    `max_response_length` is the constant length of `seq_mean_token_sum_norm` (ignored by the other modes)."""
    seqlens = cu_seqlens if cu_seqlens is not None else [None] * len(masks)
    if len(seqlens) != len(masks):
        raise ValueError(f"got {len(masks)} masks but {len(seqlens)} cu_seqlens")
    counts = [aggregation_count(mask, mode, cu, max_response_length) for mask, cu in zip(masks, seqlens)]
    total = torch.stack(counts).sum() if counts else torch.zeros((), dtype=torch.long)
    if process_group is not None:
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=process_group)
    return total


def aggregate(
    token_values: Tensor,
    mask: Tensor,
    mode: LossAggMode,
    normaliser: Normaliser | None = None,
    cu_seqlens: Tensor | None = None,
) -> Tensor:
    """Reduce per-token values ([batch, seq] padded, or 1-D packed with `cu_seqlens`) to this batch's share.

    `normaliser` is the global count of the mode (`global_aggregation_count`); None means this batch is the
    whole global batch (and, for `seq_mean_token_sum_norm`, that the constant length is the padded width).
    Masked positions never contribute, whatever they hold.
    """
    if normaliser is None:
        normaliser = aggregation_count(mask, mode, cu_seqlens).clamp(min=1)
    elif isinstance(normaliser, (int, float)) and not normaliser > 0:
        raise ValueError(f"loss normaliser must be > 0 (a global token or sequence count), got {normaliser}")
    if mode == "token_mean":
        return masked_sum(token_values, mask) / normaliser
    sequence_sums = per_sequence_sum(token_values, mask, cu_seqlens)
    if mode in ("seq_mean_token_sum", "seq_mean_token_sum_norm"):
        return sequence_sums.sum() / normaliser
    if mode == "seq_mean_token_mean":
        sequence_lengths = per_sequence_count(mask, cu_seqlens).clamp(min=1)
        return (sequence_sums / sequence_lengths).sum() / normaliser
    raise ValueError(f"unknown loss_agg_mode {mode!r}")

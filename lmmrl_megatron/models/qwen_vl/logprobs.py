"""Per-token log-probabilities from vocabulary-parallel logits, with Megatron's padded vocabulary rows masked out.

The output layer holds `padded_vocab_size` rows split over TP ranks; rows at and past the real `vocab_size` are
padding. Their logits are replaced by `PADDED_LOGIT` (-1e30, or the dtype's lowest value where that is higher)
before any softmax: exp() of it underflows to exactly 0, so padding never changes a log-probability; unlike -inf,
p * log p stays 0 (not NaN) in an entropy, and unlike the dtype's lowest value it stays finite when a caller
divides the logits by a sampling temperature below 1.

    logits = mask_padded_vocab(vocab_parallel_logits, vocab_size)          # [..., V_pad / tp] on each TP rank
    log_probs = vocab_parallel_log_probs(logits, labels)                   # [...]; 0 where labels < 0
    full = gather_vocab_parallel_logits(logits, vocab_size)                 # [..., vocab_size] on every rank
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state, tensor_parallel
from torch import Tensor
from torch.distributed import ProcessGroup


PADDED_LOGIT = -1e30


def padded_logit(dtype: torch.dtype) -> float:
    """The logit given to padded vocabulary columns in `dtype`."""
    return max(PADDED_LOGIT, torch.finfo(dtype).min)


def _tp(group: ProcessGroup | None) -> tuple[ProcessGroup, int, int]:
    group = group if group is not None else parallel_state.get_tensor_model_parallel_group()
    return group, torch.distributed.get_rank(group), torch.distributed.get_world_size(group)


def mask_padded_vocab(logits: Tensor, vocab_size: int, tp_group: ProcessGroup | None = None) -> Tensor:
    """`logits` (this rank's vocab slice) with the columns of padded vocabulary rows set to `padded_logit`."""
    _, tp_rank, _ = _tp(tp_group)
    columns = logits.shape[-1]
    first_column = tp_rank * columns
    if first_column + columns <= vocab_size:
        return logits
    is_real = torch.arange(first_column, first_column + columns, device=logits.device) < vocab_size
    return logits.masked_fill(~is_real, padded_logit(logits.dtype))


def vocab_parallel_log_probs(
    logits: Tensor, labels: Tensor, tp_group: ProcessGroup | None = None, keep_logits: bool = True
) -> Tensor:
    """log p(label) from vocab-parallel logits [..., V / tp] (padding already masked); fp32, shaped like labels.

    Labels < 0 (ignore index) give 0. Computed with Megatron's vocab-parallel cross entropy (one all-reduce of
    the max and one of the sum over TP ranks; a memory-light custom backward). That function overwrites fp32
    logits in place: pass `keep_logits=False` to allow it (saves a copy of the logits) when the caller does not
    read `logits` afterwards.
    """
    group, _, _ = _tp(tp_group)
    ignored = labels < 0
    safe_labels = labels.masked_fill(ignored, 0)
    if logits.dtype != torch.float32:
        logits_fp32 = logits.float()  # a copy already
    else:
        logits_fp32 = logits.clone() if keep_logits else logits
    loss = tensor_parallel.vocab_parallel_cross_entropy(logits_fp32, safe_labels, tp_group=group)
    return torch.where(ignored, torch.zeros_like(loss), -loss)


def gather_vocab_parallel_logits(logits: Tensor, vocab_size: int, tp_group: ProcessGroup | None = None) -> Tensor:
    """All TP ranks' vocab slices concatenated, padding columns dropped: [..., vocab_size] (no autograd)."""
    group, _, tp_size = _tp(tp_group)
    if tp_size == 1:
        return logits[..., :vocab_size]
    parts = [torch.empty_like(logits) for _ in range(tp_size)]
    torch.distributed.all_gather(parts, logits.contiguous(), group=group)
    return torch.cat(parts, dim=-1)[..., :vocab_size]

"""Packed (1-D, `cu_seqlens`) and padded ([batch, seq]) token layouts: per-sequence reductions and conversions.

A packed tensor holds sequences back to back: sequence i is `values[cu_seqlens[i]:cu_seqlens[i + 1]]`, with
`cu_seqlens = [0, len_0, len_0 + len_1, ...]` as in flash-attention and Megatron's THD format. Padding a packed
sequence (e.g. to a multiple of the TP size) is fine as long as the padding lies inside some sequence's range and
is masked out.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lmmrl_megatron.algorithms.masked import as_bool_mask, masked_fill_invalid


def check_cu_seqlens(cu_seqlens: Tensor, num_tokens: int) -> None:
    """ValueError unless `cu_seqlens` is a 1-D non-decreasing offset vector from 0 to `num_tokens`."""
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D with at least 2 entries, got shape {tuple(cu_seqlens.shape)}")
    if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != num_tokens:
        raise ValueError(
            f"cu_seqlens must start at 0 and end at the number of packed tokens ({num_tokens}), "
            f"got {cu_seqlens[0].item()}..{cu_seqlens[-1].item()}"
        )
    if bool((cu_seqlens[1:] < cu_seqlens[:-1]).any()):
        raise ValueError("cu_seqlens must be non-decreasing")


def sequence_index(cu_seqlens: Tensor, num_tokens: int) -> Tensor:
    """For each packed token, the index of the sequence it belongs to ([num_tokens], long)."""
    check_cu_seqlens(cu_seqlens, num_tokens)
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    return torch.repeat_interleave(torch.arange(lengths.numel(), device=cu_seqlens.device), lengths)


def per_sequence_sum(values: Tensor, mask: Tensor, cu_seqlens: Tensor | None = None) -> Tensor:
    """Sum of the valid values of each sequence: [batch] from padded [batch, seq], or [num_seqs] from packed."""
    cleaned = masked_fill_invalid(values, mask)
    if cu_seqlens is None:
        return cleaned.sum(dim=-1)
    if values.dim() != 1:
        raise ValueError(f"packed values (with cu_seqlens) must be 1-D, got shape {tuple(values.shape)}")
    index = sequence_index(cu_seqlens, values.numel())
    sums = torch.zeros(cu_seqlens.numel() - 1, dtype=cleaned.dtype, device=cleaned.device)
    return sums.index_add(0, index, cleaned)  # out-of-place index_add keeps autograd simple


def per_sequence_count(mask: Tensor, cu_seqlens: Tensor | None = None) -> Tensor:
    """Number of valid tokens of each sequence (long)."""
    bool_mask = as_bool_mask(mask)
    return per_sequence_sum(bool_mask.long(), bool_mask, cu_seqlens)


def padded_to_packed(values: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Pack the valid tokens of each row of a padded [batch, seq] tensor: (packed [num_valid], cu_seqlens).

    Only valid tokens are kept, in row order, so this is for masks that are contiguous or for any per-token
    quantity whose order within a sequence is all that matters.
    """
    bool_mask = as_bool_mask(mask)
    lengths = bool_mask.sum(dim=-1)
    cu_seqlens = torch.zeros(lengths.numel() + 1, dtype=torch.int32, device=values.device)
    cu_seqlens[1:] = torch.cumsum(lengths, dim=0)
    return values[bool_mask], cu_seqlens


def packed_to_padded(values: Tensor, cu_seqlens: Tensor, fill: float = 0.0) -> tuple[Tensor, Tensor]:
    """Unpack a packed tensor into (padded [num_seqs, max_len], bool mask), padding each row on the right."""
    index = sequence_index(cu_seqlens, values.numel())
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    max_len = int(lengths.max()) if lengths.numel() else 0
    position = torch.arange(values.numel(), device=values.device) - cu_seqlens.long()[index]
    padded = torch.full((lengths.numel(), max_len), fill, dtype=values.dtype, device=values.device)
    padded[index, position] = values
    mask = torch.arange(max_len, device=values.device)[None, :] < lengths[:, None]
    return padded, mask

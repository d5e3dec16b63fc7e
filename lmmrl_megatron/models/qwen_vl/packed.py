"""Padded batch <-> one packed sequence without padding, for attention that never crosses a sample boundary.

A padded batch [B, S] with an attention mask becomes one row [1, T] of its real tokens (T = number of real
tokens), row-major, with `cu_seqlens` marking where each sample starts. Position ids travel with their tokens,
so the 3D rotary positions are unchanged; attention runs per segment (`PackedSeqParams`, `qkv_format="sbhd"`,
batch 1, which `SdpaAttention` supports and which keeps Megatron's per-token rotary application). No compute is
spent on padding. With sequence parallelism T is padded to a multiple of the TP size by one extra segment of
dummy tokens whose outputs are dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.packed_seq_params import PackedSeqParams
from torch import Tensor


@dataclass(frozen=True)
class PackedBatch:
    """One packed row of a padded batch, and what is needed to put results back in the padded layout."""

    input_ids: Tensor  # [1, T]
    position_ids: Tensor  # [3, 1, T]
    labels: Tensor | None  # [1, T]
    params: PackedSeqParams
    valid: Tensor  # [B, S] bool: which padded positions the packed tokens came from
    num_real_tokens: int


def pack_padded_batch(
    input_ids: Tensor,
    attention_mask: Tensor | None,
    position_ids: Tensor,
    labels: Tensor | None = None,
    pad_to_multiple_of: int = 1,
) -> PackedBatch:
    """Pack the real tokens of a padded batch into one row (see the module docstring)."""
    valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask != 0
    lengths = valid.sum(dim=1)
    num_real = int(lengths.sum())
    num_dummy = (-num_real) % pad_to_multiple_of
    ids = input_ids[valid]
    positions = position_ids[:, valid]
    packed_labels = labels[valid] if labels is not None else None
    if num_dummy:
        ids = torch.cat([ids, ids.new_zeros(num_dummy)])
        positions = torch.cat([positions, positions.new_zeros(3, num_dummy)], dim=1)
        if packed_labels is not None:
            packed_labels = torch.cat([packed_labels, packed_labels.new_full((num_dummy,), -100)])
        lengths = torch.cat([lengths, lengths.new_tensor([num_dummy])])
    lengths = lengths[lengths > 0]  # an all-padding row is no segment at all
    cu_seqlens = torch.zeros(lengths.numel() + 1, dtype=torch.int32, device=input_ids.device)
    cu_seqlens[1:] = torch.cumsum(lengths, 0)
    max_len = int(lengths.max()) if lengths.numel() else 0
    params = PackedSeqParams(
        qkv_format="sbhd",
        cu_seqlens_q=cu_seqlens,
        cu_seqlens_kv=cu_seqlens,
        max_seqlen_q=max_len,
        max_seqlen_kv=max_len,
    )
    return PackedBatch(
        input_ids=ids.unsqueeze(0),
        position_ids=positions.unsqueeze(1),
        labels=packed_labels.unsqueeze(0) if packed_labels is not None else None,
        params=params,
        valid=valid,
        num_real_tokens=num_real,
    )


def unpack_to_padded(values: Tensor, batch: PackedBatch, fill: float = 0.0) -> Tensor:
    """Per-token values [1, T, ...] of a packed row back to the padded layout [B, S, ...] (`fill` at padding)."""
    real = values[0, : batch.num_real_tokens]
    out = real.new_full((*batch.valid.shape, *real.shape[1:]), fill)
    return out.index_put((*torch.nonzero(batch.valid, as_tuple=True),), real)

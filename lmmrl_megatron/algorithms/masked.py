"""Statistics over the valid tokens of a batch, and whitening with optionally global (data-parallel) statistics.

Every function here reads values only where the mask is true: masked positions may hold anything (padding
garbage, NaN, inf) without changing a result. Masks are validity masks (bool, or float 0/1 read as `!= 0`), not
weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


def as_bool_mask(mask: Tensor) -> Tensor:
    """A bool view of a bool or 0/1 float mask."""
    return mask if mask.dtype == torch.bool else mask != 0


def masked_fill_invalid(values: Tensor, mask: Tensor, fill: float = 0.0) -> Tensor:
    """`values` with every masked position replaced by `fill`.

    `torch.where` rather than `values * mask`: 0 * NaN is NaN, and a zero gradient reaches masked positions.
    """
    return torch.where(as_bool_mask(mask), values, torch.full_like(values, fill))


def masked_sum(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    cleaned = masked_fill_invalid(values, mask)
    return cleaned.sum() if dim is None else cleaned.sum(dim)


def masked_mean(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean over valid positions; 0 where there is none (an empty row has no mean, and 0 keeps sums finite)."""
    bool_mask = as_bool_mask(mask)
    count = bool_mask.sum() if dim is None else bool_mask.sum(dim)
    return masked_sum(values, bool_mask, dim) / count.clamp(min=1)


@dataclass(frozen=True)
class MaskedMoments:
    """Mean and population standard deviation of the valid values of a (possibly global) batch.

    `is_constant` is true when every valid value is equal (or there is none): whitening then returns exact zeros
    rather than rounding noise divided by eps.
    """

    mean: Tensor
    std: Tensor
    is_constant: Tensor


def masked_moments(values: Tensor, mask: Tensor, process_group: dist.ProcessGroup | None = None) -> MaskedMoments:
    """Moments of the valid values, reduced over `process_group` when given (each rank passes its own shard)."""
    bool_mask = as_bool_mask(mask)
    values = values.to(torch.float64)  # sums of many tokens across ranks: keep the variance from cancelling
    count = bool_mask.sum().to(torch.float64)
    total = masked_sum(values, bool_mask)
    # +inf/-inf where no valid value, so an empty shard never wins the max/min reduction
    max_value = torch.where(bool_mask, values, torch.full_like(values, -torch.inf)).max()
    min_value = torch.where(bool_mask, values, torch.full_like(values, torch.inf)).min()
    if process_group is not None:
        sums = torch.stack([count, total])
        extremes = torch.stack([max_value, -min_value])
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=process_group)
        dist.all_reduce(extremes, op=dist.ReduceOp.MAX, group=process_group)
        count, total = sums[0], sums[1]
        max_value, min_value = extremes[0], -extremes[1]
    mean = total / count.clamp(min=1)
    # The second pass uses the global mean, so the variance is exact rather than E[x^2] - E[x]^2.
    squared_deviation = masked_sum((values - mean) ** 2, bool_mask)
    if process_group is not None:
        dist.all_reduce(squared_deviation, op=dist.ReduceOp.SUM, group=process_group)
    std = (squared_deviation / count.clamp(min=1)).sqrt()
    is_constant = (count == 0) | (max_value == min_value)
    return MaskedMoments(mean=mean.float(), std=std.float(), is_constant=is_constant)


def whiten(values: Tensor, mask: Tensor, moments: MaskedMoments, eps: float) -> Tensor:
    """(x - mean) / (std + eps) at valid positions, 0 elsewhere; all zeros when the valid values are constant."""
    whitened = (values - moments.mean) / (moments.std + eps)
    whitened = torch.where(moments.is_constant, torch.zeros_like(whitened), whitened)
    return masked_fill_invalid(whitened, mask)

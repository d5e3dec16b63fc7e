"""Batch statistics for logging (advantages, returns, scores) and summing metric shares over micro-batches."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, is_dataclass, replace
from typing import TypeVar

import torch
from torch import Tensor

from lmmrl_megatron.algorithms.advantages import AdvantageOutput
from lmmrl_megatron.algorithms.masked import as_bool_mask

MetricsT = TypeVar("MetricsT")


@dataclass(frozen=True)
class TensorStats:
    """Mean, population std, min and max of the valid values (all 0 when there is none)."""

    mean: Tensor
    std: Tensor
    min: Tensor
    max: Tensor


@dataclass(frozen=True)
class AdvantageMetrics:
    advantages: TensorStats  # over valid tokens
    returns: TensorStats  # over valid tokens
    scores: TensorStats  # over sequences: the score each sequence is credited with after its group baseline


def masked_stats(values: Tensor, mask: Tensor) -> TensorStats:
    bool_mask = as_bool_mask(mask)
    valid = values.detach().float()[bool_mask]
    if valid.numel() == 0:
        zero = torch.zeros((), device=values.device)
        return TensorStats(mean=zero, std=zero, min=zero, max=zero)
    return TensorStats(mean=valid.mean(), std=valid.std(unbiased=False), min=valid.min(), max=valid.max())


def advantage_metrics(output: AdvantageOutput, mask: Tensor) -> AdvantageMetrics:
    scores = output.shaped_scores
    return AdvantageMetrics(
        advantages=masked_stats(output.advantages, mask),
        returns=masked_stats(output.returns, mask),
        scores=masked_stats(scores, torch.ones_like(scores, dtype=torch.bool)),
    )


def sum_metric_shares(shares: Sequence[MetricsT]) -> MetricsT:
    """Field-wise sum of metric dataclasses (e.g. PolicyLossMetrics of every micro-batch); None stays None.

    Loss metrics are shares of the global mean, so their sum over a step's micro-batches (then an all-reduce
    SUM over data-parallel ranks) is the step's value."""
    if not shares:
        raise ValueError("sum_metric_shares needs at least one metrics object")
    total = shares[0]
    for share in shares[1:]:
        updates = {field.name: _add(getattr(total, field.name), getattr(share, field.name)) for field in fields(total)}
        total = replace(total, **updates)
    return total


def _add(total: Tensor | None, share: Tensor | None) -> Tensor | None:
    if total is None or share is None:
        assert total is None and share is None, "a metric is None in some micro-batches only"
        return None
    return total + share


def metrics_to_dict(metrics: object, prefix: str) -> dict[str, float]:
    """Flatten a (nested) metrics dataclass to {"prefix/field[/sub]": float}, skipping None fields; for loggers."""
    assert is_dataclass(metrics), f"expected a metrics dataclass, got {type(metrics).__name__}"
    flat: dict[str, float] = {}
    for field in fields(metrics):
        value = getattr(metrics, field.name)
        key = f"{prefix}/{field.name}"
        if value is None:
            continue
        if is_dataclass(value):
            flat.update(metrics_to_dict(value, key))
        else:
            flat[key] = float(value)
    return flat

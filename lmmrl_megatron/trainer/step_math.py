"""Small pure pieces of the RL step: response padding, group filtering, and the step's logged metrics."""

from __future__ import annotations

import torch
from torch import Tensor

from lmmrl_megatron.algorithms import AdvantageOutput, token_mean_kl
from lmmrl_megatron.engine.micro_batch import Sample


def pad_responses(values: list[Tensor]) -> Tensor:
    """Stack per-response 1-D tensors into [N, max_len], zero-padded on the right."""
    out = torch.zeros(len(values), max((v.numel() for v in values), default=0), dtype=torch.float32)
    for row, v in enumerate(values):
        out[row, : v.numel()] = v.float()
    return out


def scatter_rows(padded: Tensor, samples: list[Sample]) -> list[Tensor]:
    """Cut [N, max_len] back into each sample's response length."""
    return [padded[row, : s.response_ids.numel()].clone() for row, s in enumerate(samples)]


def step_metrics(
    raw_scores: Tensor,
    samples: list[Sample],
    mask: Tensor,
    kl: Tensor,
    entropy: Tensor,
    train_metrics: list[dict[str, float]],
    advantages: AdvantageOutput,
    kl_coef: float,
    kept: list[int],
) -> dict[str, float]:
    """The figures logged for one step. Rewards are over every generated response, before any filtering."""
    num_tokens = mask.sum().clamp(min=1)
    lengths = torch.tensor([float(s.response_ids.numel()) for s in samples])
    metrics = {
        "reward/mean": float(raw_scores.mean()),
        "reward/std": float(raw_scores.std(unbiased=False)),
        "response_length/mean": float(lengths.mean()) if len(samples) else 0.0,
        "response_length/max": float(lengths.max()) if len(samples) else 0.0,
        "kl": token_mean_kl(kl, mask),  # what the KL controller observes
        "kl_coef": kl_coef,
        "entropy": float((entropy * mask).sum() / num_tokens),
        "advantage/mean": float((advantages.advantages * mask).sum() / num_tokens),
        "num_samples_trained": float(len(kept)),
    }
    # One optimizer step per mini-batch: report their mean.
    keys = sorted({k for m in train_metrics for k in m})
    for key in keys:
        values = [m[key] for m in train_metrics if key in m]
        metrics[key] = sum(values) / len(values)
    return metrics

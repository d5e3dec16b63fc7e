"""The figures logged for one RL step, from its whole [N, R] tensors."""

from __future__ import annotations

from torch import Tensor

from lmmrl_megatron.algorithms import AdvantageOutput, token_mean_kl


def step_metrics(
    raw_scores: Tensor,
    response_lengths: Tensor,
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
    lengths = response_lengths.float()
    metrics = {
        "reward/mean": float(raw_scores.mean()),
        "reward/std": float(raw_scores.std(unbiased=False)),
        "response_length/mean": float(lengths.mean()) if len(lengths) else 0.0,
        "response_length/max": float(lengths.max()) if len(lengths) else 0.0,
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

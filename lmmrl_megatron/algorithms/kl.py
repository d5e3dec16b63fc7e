"""Per-token estimators of KL(pi || pi_ref) from log-probs of tokens sampled from pi, and the KL reward penalty.

With r = log pi(y) - log pi_ref(y) for a token y ~ pi (Schulman, "Approximating KL divergence", 2020):

    k1 = r                      unbiased, but any single value can be negative; high variance
    k2 = r^2 / 2                biased (it is the f-divergence for f = (log x)^2 / 2), always >= 0, low variance
    k3 = exp(-r) - 1 + r        unbiased: E_pi[pi_ref / pi] = 1, so E[k3] = E[r] = KL; and >= 0 everywhere,
                                because x - 1 - log x >= 0 for x = pi_ref / pi > 0; low variance

As a *loss term* on on-policy samples what matters is the gradient, E_pi[grad k]: for k1 it is E[grad log pi] = 0,
for k2 it is E[r grad log pi] = grad KL(pi || pi_ref), for k3 it is grad KL(pi_ref || pi) (the forward KL).
docs/algorithms.md discusses the choice.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lmmrl_megatron.algorithms.config import KLEstimatorName
from lmmrl_megatron.algorithms.masked import masked_fill_invalid


def kl_estimate(
    log_probs: Tensor, ref_log_probs: Tensor, estimator: KLEstimatorName, clamp: float | None = None
) -> Tensor:
    """Per-token KL estimate, same shape as the inputs.

    `clamp` bounds the log-ratio r to [-clamp, clamp] *before* the estimator: clamping k3 afterwards would still
    evaluate exp(-r), which overflows to inf, and inf * 0 in the backward pass is NaN.
    """
    log_ratio = log_probs.float() - ref_log_probs.float()
    if clamp is not None:
        log_ratio = log_ratio.clamp(min=-clamp, max=clamp)
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.square()
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio  # expm1: exact near r = 0, where k3 ~ r^2 / 2 is tiny
    raise ValueError(f"unknown KL estimator {estimator!r}; expected one of 'k1', 'k2', 'k3'")


def kl_reward_penalty(
    log_probs: Tensor,
    ref_log_probs: Tensor,
    mask: Tensor,
    estimator: KLEstimatorName,
    kl_coef: float,
    clamp: float | None = None,
) -> Tensor:
    """Per-token reward -kl_coef * KL_t at valid tokens, 0 elsewhere; no gradient (it is a reward)."""
    with torch.no_grad():
        safe_log_probs = masked_fill_invalid(log_probs.float(), mask)
        safe_ref_log_probs = masked_fill_invalid(ref_log_probs.float(), mask)
        kl = kl_estimate(safe_log_probs, safe_ref_log_probs, estimator, clamp)
        return masked_fill_invalid(-kl_coef * kl, mask)

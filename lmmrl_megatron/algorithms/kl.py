"""Per-token estimators of KL(pi || pi_ref) from log-probs of tokens sampled from pi, and the KL reward penalty.

With r = log pi(y) - log pi_ref(y) for a token y ~ pi (Schulman, "Approximating KL divergence", 2020):

    k1 = r                      unbiased, but any single value can be negative; high variance
    k2 = r^2 / 2                biased (it is the f-divergence for f = (log x)^2 / 2), always >= 0, low variance
    k3 = exp(-r) - 1 + r        unbiased: E_pi[pi_ref / pi] = 1, so E[k3] = E[r] = KL; and >= 0 everywhere,
                                because x - 1 - log x >= 0 for x = pi_ref / pi > 0; low variance

As a *loss term* on on-policy samples what matters is the gradient, E_pi[grad k]: for k1 it is E[grad log pi] = 0,
for k2 it is E[r grad log pi] = grad KL(pi || pi_ref), for k3 it is grad KL(pi_ref || pi) (the forward KL).
docs/algorithms.md discusses the choice.

Bounds. `clamp` (`algorithm.kl_clamp`, default 10) bounds each token's *estimate* to [-clamp, clamp], as OpenRLHF's
`compute_approx_kl` does for every estimator and verl's `low_var_kl` does for k3: a token whose estimate hits the
bound contributes a constant, and so no gradient, as a loss term. For k1 the estimate is the log-ratio, so this is
a clamp of r. Inside k3, r is first held to [-20, 20] (as verl does) so that exp(-r) stays finite: exp(200) is inf
in fp32, and inf * 0 in the backward pass is NaN.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lmmrl_megatron.algorithms.config import KLEstimatorName
from lmmrl_megatron.algorithms.masked import masked_fill_invalid


# k3 evaluates exp(-r); beyond |r| = 20 (exp(20) ~ 4.9e8) nothing is gained and fp32 is near overflow.
_MAX_K3_LOG_RATIO = 20.0


def kl_estimate(
    log_probs: Tensor, ref_log_probs: Tensor, estimator: KLEstimatorName, clamp: float | None = None
) -> Tensor:
    """Per-token KL estimate, same shape as the inputs, bounded to [-clamp, clamp] when `clamp` is set.

    Bounding the value (not only the log-ratio) is what keeps k2 and k3 in range: with only r clamped to +-10, k3
    of a token the reference finds e^10 times likelier is e^10 - 11 ~ 2.2e4, and its loss gradient is e^10 - 1.
    """
    log_ratio = log_probs.float() - ref_log_probs.float()
    if estimator == "k1":
        kl = log_ratio
    elif estimator == "k2":
        kl = 0.5 * log_ratio.square()
    elif estimator == "k3":
        log_ratio = log_ratio.clamp(min=-_MAX_K3_LOG_RATIO, max=_MAX_K3_LOG_RATIO)
        kl = torch.expm1(-log_ratio) + log_ratio  # expm1: exact near r = 0, where k3 ~ r^2 / 2 is tiny
    else:
        raise ValueError(f"unknown KL estimator {estimator!r}; expected one of 'k1', 'k2', 'k3'")
    if clamp is not None:
        kl = kl.clamp(min=-clamp, max=clamp)
    return kl


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

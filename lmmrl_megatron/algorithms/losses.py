"""Actor (policy) and critic (value) losses, per token, aggregated by `aggregation.aggregate`.

Each loss returns this micro-batch's *share* of the global loss (see aggregation.py) and a metrics dataclass whose
fields are shares too, aggregated the same way: summing losses or metrics over micro-batches and data-parallel
ranks gives the global value. Metrics are detached 0-d tensors, so reading them costs no sync until logged.
Masked positions may hold anything, NaN included: inputs are zeroed there first, so they get zero gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lmmrl_megatron.algorithms.aggregation import Normaliser, aggregate
from lmmrl_megatron.algorithms.config import AlgorithmConfig, LossAggMode
from lmmrl_megatron.algorithms.kl import kl_estimate
from lmmrl_megatron.algorithms.masked import as_bool_mask, masked_fill_invalid

# exp(20) ~ 5e8 is far outside any clip range; beyond it exp() would overflow to inf in fp32/bf16 and turn the
# backward pass into inf * 0 = NaN.
_MAX_LOG_RATIO = 20.0


@dataclass(frozen=True)
class PolicyLossInputs:
    """Per-token tensors, all [batch, seq] padded or 1-D packed (then with `cu_seqlens`)."""

    log_probs: Tensor  # log pi_theta(y_t), with gradient
    old_log_probs: Tensor  # log pi_old(y_t): the trainer's log-probs under the weights that generated the rollout
    advantages: Tensor
    mask: Tensor  # tokens trained on
    rollout_log_probs: Tensor | None = None  # log-probs the rollout engine reported (for tis_cap)
    ref_log_probs: Tensor | None = None  # reference policy (for use_kl_loss)
    entropy: Tensor | None = None  # per-token entropy of pi_theta, with gradient (for entropy_coef / metrics)
    cu_seqlens: Tensor | None = None  # packed layout offsets; None for padded


@dataclass(frozen=True)
class PpoTokenTerms:
    losses: Tensor  # per-token clipped surrogate loss (before importance weights)
    ratio: Tensor  # pi_theta / pi_old
    is_clipped: Tensor  # the clipped term was the larger loss: the token's gradient is cut off
    is_dual_clipped: Tensor  # the dual-clip bound replaced the loss (negative advantages only)


@dataclass(frozen=True)
class PolicyLossMetrics:
    """Shares of global means, aggregated like the loss; None where the feature is off."""

    pg_loss: Tensor
    clip_frac: Tensor
    approx_kl: Tensor  # k3 estimate of KL(pi_old || pi_theta): how far this update has moved the policy
    ratio: Tensor
    dual_clip_frac: Tensor | None = None
    tis_weight: Tensor | None = None
    tis_clip_frac: Tensor | None = None  # tokens whose importance weight hit tis_cap
    entropy: Tensor | None = None
    kl_loss: Tensor | None = None  # KL to the reference (before kl_coef)


@dataclass(frozen=True)
class ValueLossMetrics:
    value_loss: Tensor
    clip_frac: Tensor  # tokens where the clipped value error was the larger one
    value_mean: Tensor


def ppo_clip_token_losses(
    log_probs: Tensor,
    old_log_probs: Tensor,
    advantages: Tensor,
    eps_clip_low: float,
    eps_clip_high: float,
    dual_clip: float | None = None,
) -> PpoTokenTerms:
    """PPO's pessimistic surrogate (Schulman et al., 2017), with clip-higher and dual-clip:

        loss_t = max(-A_t * rho_t, -A_t * clip(rho_t, 1 - eps_low, 1 + eps_high))
        if dual_clip and A_t < 0:  loss_t = min(loss_t, -A_t * dual_clip)

    For A < 0 the first line is unbounded as rho grows (a token the old policy found unlikely); dual-clip
    (Ye et al., 2020) caps it at dual_clip * |A|. A separate eps_high > eps_low (DAPO's clip-higher) lets
    unlikely tokens with positive advantage gain more probability per step.
    """
    log_ratio = (log_probs.float() - old_log_probs.float()).clamp(min=-_MAX_LOG_RATIO, max=_MAX_LOG_RATIO)
    ratio = torch.exp(log_ratio)
    advantages = advantages.float()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(min=1.0 - eps_clip_low, max=1.0 + eps_clip_high)
    losses = torch.maximum(unclipped, clipped)
    is_clipped = clipped > unclipped
    is_dual_clipped = torch.zeros_like(is_clipped)
    if dual_clip is not None:
        dual_bound = -advantages * dual_clip
        is_dual_clipped = (advantages < 0) & (losses > dual_bound)
        losses = torch.where(is_dual_clipped, dual_bound, losses)
    return PpoTokenTerms(losses=losses, ratio=ratio, is_clipped=is_clipped, is_dual_clipped=is_dual_clipped)


def truncated_is_weights(old_log_probs: Tensor, rollout_log_probs: Tensor, cap: float) -> Tensor:
    """min(pi_old / pi_rollout, cap), detached (Yao et al., 2025).

    The rollout engine (vLLM, other kernels, other precision) samples from pi_rollout, slightly different from the
    trainer's pi_old for the same weights; this importance weight corrects the PPO gradient for that mismatch,
    and the cap bounds its variance. It is a constant of the loss, hence detached.
    """
    log_weight = (old_log_probs.float() - rollout_log_probs.float()).clamp(max=_MAX_LOG_RATIO)
    return torch.exp(log_weight).clamp(max=cap).detach()


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Per-position entropy -sum_v p_v log p_v = logsumexp(z) - sum_v p_v z_v, over the last (vocab) dim.

    For full (not vocab-parallel) logits; tensor-parallel logits need their reductions across TP ranks."""
    logits = logits.float()
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(dim=-1)


def _clean(tensor: Tensor, mask: Tensor) -> Tensor:
    return masked_fill_invalid(tensor.float(), mask)


def _check_policy_inputs(inputs: PolicyLossInputs, config: AlgorithmConfig, kl_coef: float) -> None:
    if config.tis_cap is not None and inputs.rollout_log_probs is None:
        raise ValueError("algorithm.tis_cap is set but PolicyLossInputs.rollout_log_probs is None")
    if config.use_kl_loss and kl_coef > 0 and inputs.ref_log_probs is None:
        raise ValueError("algorithm.use_kl_loss with kl_coef > 0 needs PolicyLossInputs.ref_log_probs")
    if config.entropy_coef > 0 and inputs.entropy is None:
        raise ValueError("algorithm.entropy_coef > 0 needs PolicyLossInputs.entropy")
    shape = inputs.mask.shape
    optional = (
        ("rollout_log_probs", inputs.rollout_log_probs),
        ("ref_log_probs", inputs.ref_log_probs),
        ("entropy", inputs.entropy),
    )
    required = (
        ("log_probs", inputs.log_probs),
        ("old_log_probs", inputs.old_log_probs),
        ("advantages", inputs.advantages),
    )
    for name, tensor in required + optional:
        if tensor is not None and tensor.shape != shape:
            raise ValueError(
                f"PolicyLossInputs.{name} must have the mask's shape {tuple(shape)}, got {tuple(tensor.shape)}"
            )


def policy_loss(
    inputs: PolicyLossInputs,
    config: AlgorithmConfig,
    normaliser: Normaliser | None = None,
    kl_coef: float | None = None,
) -> tuple[Tensor, PolicyLossMetrics]:
    """Actor loss = agg(w_t * ppo_t) + kl_coef * agg(KL_t) [use_kl_loss] - entropy_coef * agg(H_t).

    w_t is the truncated importance weight (1 without tis_cap); `kl_coef` defaults to config.kl_coef (pass the
    KL controller's value when it adapts); `normaliser` is the global count for config.loss_agg_mode.
    """
    kl_coef = config.kl_coef if kl_coef is None else kl_coef
    _check_policy_inputs(inputs, config, kl_coef)
    mask = as_bool_mask(inputs.mask)
    log_probs, old_log_probs = _clean(inputs.log_probs, mask), _clean(inputs.old_log_probs, mask)
    advantages = _clean(inputs.advantages, mask)
    terms = ppo_clip_token_losses(
        log_probs, old_log_probs, advantages, config.eps_clip_low, config.eps_clip_high, config.dual_clip
    )

    def agg(values: Tensor) -> Tensor:
        return aggregate(values, mask, config.loss_agg_mode, normaliser, inputs.cu_seqlens)

    token_losses, tis_weights = terms.losses, None
    if config.tis_cap is not None:
        assert inputs.rollout_log_probs is not None  # checked above
        tis_weights = truncated_is_weights(old_log_probs, _clean(inputs.rollout_log_probs, mask), config.tis_cap)
        token_losses = token_losses * tis_weights
    pg_loss = agg(token_losses)
    loss = pg_loss

    kl_loss = None
    if config.use_kl_loss and kl_coef > 0:
        assert inputs.ref_log_probs is not None  # checked above
        kl = kl_estimate(log_probs, _clean(inputs.ref_log_probs, mask), config.kl_estimator, config.kl_clamp)
        kl_loss = agg(kl)
        loss = loss + kl_coef * kl_loss
    entropy = None if inputs.entropy is None else agg(_clean(inputs.entropy, mask))
    if entropy is not None and config.entropy_coef > 0:
        loss = loss - config.entropy_coef * entropy

    with torch.no_grad():
        ratio = terms.ratio.detach()
        metrics = PolicyLossMetrics(
            pg_loss=pg_loss.detach(),
            clip_frac=agg(terms.is_clipped.float()),
            approx_kl=agg(ratio - 1.0 - torch.log(ratio)),  # k3 with samples from pi_old: >= 0, unbiased
            ratio=agg(ratio),
            dual_clip_frac=agg(terms.is_dual_clipped.float()) if config.dual_clip is not None else None,
            tis_weight=agg(tis_weights) if tis_weights is not None else None,
            tis_clip_frac=agg((tis_weights >= config.tis_cap).float()) if tis_weights is not None else None,
            entropy=entropy.detach() if entropy is not None else None,
            kl_loss=kl_loss.detach() if kl_loss is not None else None,
        )
    return loss, metrics


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    value_clip: float | None,
    loss_agg_mode: LossAggMode,
    normaliser: Normaliser | None = None,
    cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, ValueLossMetrics]:
    """Critic loss 0.5 * max((V - R)^2, (V_clip - R)^2), V_clip = V_old + clip(V - V_old, -c, c) (c = value_clip;
    without it, 0.5 * (V - R)^2). Clipping keeps the critic from moving far from the values the advantages used."""
    bool_mask = as_bool_mask(mask)
    values, old_values, returns = (masked_fill_invalid(t.float(), bool_mask) for t in (values, old_values, returns))
    unclipped = (values - returns).square()
    if value_clip is None:
        token_losses, is_clipped = 0.5 * unclipped, torch.zeros_like(bool_mask)
    else:
        clipped_values = old_values + (values - old_values).clamp(min=-value_clip, max=value_clip)
        clipped = (clipped_values - returns).square()
        token_losses, is_clipped = 0.5 * torch.maximum(unclipped, clipped), clipped > unclipped

    def agg(token_values: Tensor) -> Tensor:
        return aggregate(token_values, bool_mask, loss_agg_mode, normaliser, cu_seqlens)

    loss = agg(token_losses)
    with torch.no_grad():
        metrics = ValueLossMetrics(value_loss=loss.detach(), clip_frac=agg(is_clipped.float()), value_mean=agg(values))
    return loss, metrics

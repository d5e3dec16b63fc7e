"""Advantage estimators, selected by `AlgorithmConfig.advantage_estimator` through `ADVANTAGE_ESTIMATORS`.

Inputs are padded: per-sequence outcome scores [batch], a response mask [batch, seq] (true on the tokens the
policy generated and is trained on), optional per-token KL reward penalties and critic values [batch, seq].
Group estimators need the `n_samples_per_prompt` answers of a prompt contiguous in the batch:
[p0a0, p0a1, ..., p0a(n-1), p1a0, ...]. Packed data can go through `packing.packed_to_padded` first.
Masked positions may hold anything; every result is 0 there.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from lmmrl_megatron.algorithms.config import AdvantageEstimatorName, AlgorithmConfig
from lmmrl_megatron.algorithms.masked import MaskedMoments, as_bool_mask, masked_fill_invalid, masked_moments, whiten


@dataclass(frozen=True)
class AdvantageInputs:
    scores: Tensor  # [batch] outcome reward of each sequence (after reward normalisation/clipping)
    mask: Tensor  # [batch, seq] response tokens
    kl_rewards: Tensor | None = None  # [batch, seq] per-token KL reward penalty (-kl_coef * KL), or None
    values: Tensor | None = None  # [batch, seq] critic values V(s_t) (gae only)


@dataclass(frozen=True)
class AdvantageParams:
    gamma: float = 1.0
    lambd: float = 1.0
    n_samples_per_prompt: int = 1
    eps: float = 1e-6


@dataclass(frozen=True)
class AdvantageOutput:
    advantages: Tensor  # [batch, seq], 0 at masked positions
    returns: Tensor  # [batch, seq] targets: GAE lambda-returns for the critic, discounted returns otherwise
    shaped_scores: Tensor  # [batch] each sequence's score after its group baseline (the raw score without one)


AdvantageEstimator = Callable[[AdvantageInputs, AdvantageParams], AdvantageOutput]


# ---- building blocks ------------------------------------------------------------------------------------------


def place_on_last_token(scores: Tensor, mask: Tensor) -> Tensor:
    """[batch, seq] zeros with each sequence's score on its last valid token (rows without one stay 0)."""
    bool_mask = as_bool_mask(mask)
    positions = torch.arange(bool_mask.shape[-1], device=bool_mask.device).expand_as(bool_mask)
    last_position = torch.where(bool_mask, positions, -1).max(dim=-1, keepdim=True).values
    is_last = (positions == last_position) & bool_mask
    return torch.where(is_last, scores.float()[:, None], 0.0)


def discounted_returns(token_rewards: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """G_t = r_t + gamma * G_next over valid tokens, where `next` skips masked positions (holes in a multi-turn
    response mask add no discount)."""
    bool_mask = as_bool_mask(mask)
    rewards = masked_fill_invalid(token_rewards.float(), bool_mask)
    if gamma == 1.0:
        # Masked positions carry reward 0, so a reverse cumulative sum is exactly the undiscounted return.
        return masked_fill_invalid(rewards.flip(-1).cumsum(-1).flip(-1), bool_mask)
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[-1])):
        running = torch.where(bool_mask[:, t], rewards[:, t] + gamma * running, running)
        returns[:, t] = running
    return masked_fill_invalid(returns, bool_mask)


def gae_advantages(
    token_rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lambd: float
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al., 2016): (advantages, lambda-returns).

        delta_t = r_t + gamma * V_next - V_t       (V after the last valid token is 0: the episode ends)
        A_t     = delta_t + gamma * lambd * A_next
        R_t     = A_t + V_t
    """
    bool_mask = as_bool_mask(mask)
    rewards = masked_fill_invalid(token_rewards.float(), bool_mask)
    values = masked_fill_invalid(values.float(), bool_mask)
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[-1])):
        valid = bool_mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = torch.where(valid, delta + gamma * lambd * running, running)
        next_value = torch.where(valid, values[:, t], next_value)
        advantages[:, t] = running
    advantages = masked_fill_invalid(advantages, bool_mask)
    return advantages, masked_fill_invalid(advantages + values, bool_mask)


def group_view(scores: Tensor, n_samples_per_prompt: int, estimator: str) -> Tensor:
    """Scores reshaped to [num_prompts, n]; ValueError for a group of one or a batch that is not whole groups."""
    if n_samples_per_prompt < 2:
        raise ValueError(
            f"advantage estimator {estimator!r} is a group estimator and needs n_samples_per_prompt >= 2: "
            f"a group of one sample has no baseline (got n_samples_per_prompt={n_samples_per_prompt})"
        )
    if scores.dim() != 1 or scores.numel() % n_samples_per_prompt != 0:
        raise ValueError(
            f"advantage estimator {estimator!r}: scores must be 1-D with whole groups of n_samples_per_prompt="
            f"{n_samples_per_prompt} contiguous answers, got shape {tuple(scores.shape)}"
        )
    return scores.float().view(-1, n_samples_per_prompt)


def nonconstant_group_mask(scores: Tensor, n_samples_per_prompt: int) -> Tensor:
    """[batch] bool: true for the answers of prompts whose scores are not all equal.

    A group with equal scores has zero advantage under every group estimator, so it carries no learning signal;
    the trainer can use this to drop such prompts before training."""
    grouped = group_view(scores, n_samples_per_prompt, "group filter")
    is_constant = (grouped == grouped[:, :1]).all(dim=-1, keepdim=True)
    return (~is_constant).expand_as(grouped).flatten()


def _zero_constant_groups(grouped_scores: Tensor, shaped: Tensor) -> Tensor:
    """Exact 0 for groups whose scores are all equal: r - mean(r) may otherwise round to +-1e-17, not 0."""
    is_constant = (grouped_scores == grouped_scores[:, :1]).all(dim=-1, keepdim=True)
    return torch.where(is_constant, torch.zeros_like(shaped), shaped).flatten()


def group_mean_baseline(scores: Tensor, n_samples_per_prompt: int, estimator: str = "group") -> Tensor:
    """r_i - mean_j r_j over the answers of the same prompt."""
    grouped = group_view(scores, n_samples_per_prompt, estimator)
    return _zero_constant_groups(grouped, grouped - grouped.mean(dim=-1, keepdim=True))


def leave_one_out_baseline(scores: Tensor, n_samples_per_prompt: int, estimator: str = "rloo") -> Tensor:
    """r_i - mean_{j != i} r_j: the baseline of each answer is the mean of the other n - 1 (Kool et al., 2019)."""
    grouped = group_view(scores, n_samples_per_prompt, estimator)
    others_mean = (grouped.sum(dim=-1, keepdim=True) - grouped) / (n_samples_per_prompt - 1)
    return _zero_constant_groups(grouped, grouped - others_mean)


def group_normalized(scores: Tensor, n_samples_per_prompt: int, eps: float, estimator: str = "grpo") -> Tensor:
    """(r_i - mean_j r_j) / (std_j r_j + eps), std with Bessel's correction (n - 1), as in GRPO (Shao et al., 2024)."""
    grouped = group_view(scores, n_samples_per_prompt, estimator)
    mean = grouped.mean(dim=-1, keepdim=True)
    std = grouped.std(dim=-1, keepdim=True, unbiased=True)
    return _zero_constant_groups(grouped, (grouped - mean) / (std + eps))


# ---- estimators (uniform signature, one per config name) --------------------------------------------------------


def _token_rewards(shaped_scores: Tensor, inputs: AdvantageInputs) -> Tensor:
    """The sequence score on the last valid token, plus the per-token KL penalty where there is one."""
    rewards = place_on_last_token(shaped_scores, inputs.mask)
    if inputs.kl_rewards is not None:
        rewards = rewards + masked_fill_invalid(inputs.kl_rewards.float(), inputs.mask)
    return rewards


def _returns_as_advantages(shaped_scores: Tensor, inputs: AdvantageInputs, params: AdvantageParams) -> AdvantageOutput:
    """Critic-free estimators: the advantage of a token is its discounted return of shaped token rewards."""
    returns = discounted_returns(_token_rewards(shaped_scores, inputs), inputs.mask, params.gamma)
    return AdvantageOutput(advantages=returns, returns=returns, shaped_scores=shaped_scores)


def gae(inputs: AdvantageInputs, params: AdvantageParams) -> AdvantageOutput:
    if inputs.values is None:
        raise ValueError("advantage estimator 'gae' needs critic values (AdvantageInputs.values)")
    advantages, returns = gae_advantages(
        _token_rewards(inputs.scores.float(), inputs), inputs.values, inputs.mask, params.gamma, params.lambd
    )
    return AdvantageOutput(advantages=advantages, returns=returns, shaped_scores=inputs.scores.float())


def reinforce(inputs: AdvantageInputs, params: AdvantageParams) -> AdvantageOutput:
    """REINFORCE++ (Hu, 2025): no baseline here; the global whitening in `compute_advantages` centres it."""
    return _returns_as_advantages(inputs.scores.float(), inputs, params)


def reinforce_baseline(inputs: AdvantageInputs, params: AdvantageParams) -> AdvantageOutput:
    shaped = group_mean_baseline(inputs.scores, params.n_samples_per_prompt, "reinforce_baseline")
    return _returns_as_advantages(shaped, inputs, params)


def rloo(inputs: AdvantageInputs, params: AdvantageParams) -> AdvantageOutput:
    shaped = leave_one_out_baseline(inputs.scores, params.n_samples_per_prompt, "rloo")
    return _returns_as_advantages(shaped, inputs, params)


def grpo(inputs: AdvantageInputs, params: AdvantageParams) -> AdvantageOutput:
    shaped = group_normalized(inputs.scores, params.n_samples_per_prompt, params.eps, "grpo")
    return _returns_as_advantages(shaped, inputs, params)


def dr_grpo(inputs: AdvantageInputs, params: AdvantageParams) -> AdvantageOutput:
    """Dr. GRPO (Liu et al., 2025): GRPO without the std division (its length normalisation is removed by the
    loss aggregation `seq_mean_token_sum`)."""
    shaped = group_mean_baseline(inputs.scores, params.n_samples_per_prompt, "dr_grpo")
    return _returns_as_advantages(shaped, inputs, params)


ADVANTAGE_ESTIMATORS: dict[AdvantageEstimatorName, AdvantageEstimator] = {
    "gae": gae,
    "reinforce": reinforce,
    "reinforce_baseline": reinforce_baseline,
    "rloo": rloo,
    "grpo": grpo,
    "dr_grpo": dr_grpo,
}


def check_advantage_inputs(inputs: AdvantageInputs) -> None:
    mask_shape = tuple(inputs.mask.shape)
    if len(mask_shape) != 2:
        raise ValueError(f"advantage inputs: mask must be [batch, seq], got shape {mask_shape}")
    if tuple(inputs.scores.shape) != mask_shape[:1]:
        raise ValueError(f"advantage inputs: scores must be [batch]={mask_shape[:1]}, got {tuple(inputs.scores.shape)}")
    for name, tensor in (("kl_rewards", inputs.kl_rewards), ("values", inputs.values)):
        if tensor is not None and tuple(tensor.shape) != mask_shape:
            raise ValueError(
                f"advantage inputs: {name} must have the mask's shape {mask_shape}, got {tuple(tensor.shape)}"
            )


@torch.no_grad()
def compute_advantages(
    config: AlgorithmConfig,
    inputs: AdvantageInputs,
    n_samples_per_prompt: int,
    whiten_moments: MaskedMoments | None = None,
    process_group: dist.ProcessGroup | None = None,
) -> AdvantageOutput:
    """Run the configured estimator, then whiten the advantages over the global batch if the config says so.

    `n_samples_per_prompt` is the group size (the rollout's); group estimators need it >= 2.

    Whitening statistics: `whiten_moments` if given (global moments of the *un-whitened* advantages, computed by the
    caller), else reduced over `process_group` (every data-parallel rank calls this with its shard), else this batch.
    """
    check_advantage_inputs(inputs)
    params = AdvantageParams(
        gamma=config.gamma, lambd=config.lambd, n_samples_per_prompt=n_samples_per_prompt, eps=config.advantage_eps
    )
    output = ADVANTAGE_ESTIMATORS[config.advantage_estimator](inputs, params)
    if not config.whitens_advantages:
        return output
    moments = whiten_moments
    if moments is None:
        moments = masked_moments(output.advantages, inputs.mask, process_group)
    return replace(output, advantages=whiten(output.advantages, inputs.mask, moments, config.advantage_eps))

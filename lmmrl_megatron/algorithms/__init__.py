"""RL algorithm library: advantage estimators, KL, policy and value losses, reward shaping, their metrics.

Pure torch functions on padded [batch, seq] token tensors with a validity mask (losses also take packed 1-D
tensors with `cu_seqlens`). docs/algorithms.md gives every formula with its config name.
"""

from lmmrl_megatron.algorithms.advantages import (
    ADVANTAGE_ESTIMATORS,
    AdvantageEstimator,
    AdvantageInputs,
    AdvantageOutput,
    AdvantageParams,
    compute_advantages,
    discounted_returns,
    gae_advantages,
    group_mean_baseline,
    group_normalized,
    leave_one_out_baseline,
    nonconstant_group_mask,
    place_on_last_token,
)
from lmmrl_megatron.algorithms.aggregation import aggregate, aggregation_count, global_aggregation_count
from lmmrl_megatron.algorithms.config import (
    AdvantageEstimatorName,
    AlgorithmConfig,
    KLEstimatorName,
    LossAggMode,
)
from lmmrl_megatron.algorithms.kl import kl_estimate, kl_reward_penalty
from lmmrl_megatron.algorithms.kl_controller import (
    AdaptiveKLController,
    FixedKLController,
    KLController,
    make_kl_controller,
    token_mean_kl,
)
from lmmrl_megatron.algorithms.losses import (
    PolicyLossInputs,
    PolicyLossMetrics,
    ValueLossMetrics,
    entropy_from_logits,
    policy_loss,
    ppo_clip_token_losses,
    truncated_is_weights,
    value_loss,
)
from lmmrl_megatron.algorithms.masked import MaskedMoments, masked_mean, masked_moments, masked_sum, whiten
from lmmrl_megatron.algorithms.metrics import (
    AdvantageMetrics,
    TensorStats,
    advantage_metrics,
    metrics_to_dict,
    sum_metric_shares,
)
from lmmrl_megatron.algorithms.packing import packed_to_padded, padded_to_packed, per_sequence_sum
from lmmrl_megatron.algorithms.rewards import RunningMoments, make_reward_moments, shape_scores

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "AdaptiveKLController",
    "AdvantageEstimator",
    "AdvantageEstimatorName",
    "AdvantageInputs",
    "AdvantageMetrics",
    "AdvantageOutput",
    "AdvantageParams",
    "AlgorithmConfig",
    "FixedKLController",
    "KLController",
    "KLEstimatorName",
    "LossAggMode",
    "MaskedMoments",
    "PolicyLossInputs",
    "PolicyLossMetrics",
    "RunningMoments",
    "TensorStats",
    "ValueLossMetrics",
    "advantage_metrics",
    "aggregate",
    "aggregation_count",
    "compute_advantages",
    "discounted_returns",
    "entropy_from_logits",
    "gae_advantages",
    "global_aggregation_count",
    "group_mean_baseline",
    "group_normalized",
    "kl_estimate",
    "kl_reward_penalty",
    "leave_one_out_baseline",
    "make_kl_controller",
    "make_reward_moments",
    "masked_mean",
    "masked_moments",
    "masked_sum",
    "metrics_to_dict",
    "nonconstant_group_mask",
    "packed_to_padded",
    "padded_to_packed",
    "per_sequence_sum",
    "place_on_last_token",
    "policy_loss",
    "ppo_clip_token_losses",
    "shape_scores",
    "sum_metric_shares",
    "token_mean_kl",
    "truncated_is_weights",
    "value_loss",
    "whiten",
]

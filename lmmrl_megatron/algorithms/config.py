"""`AlgorithmConfig`: the RL algorithm section of the config (advantage estimator, KL, PPO loss, rewards)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

AdvantageEstimatorName = Literal["gae", "reinforce", "reinforce_baseline", "rloo", "grpo", "dr_grpo"]
KLEstimatorName = Literal["k1", "k2", "k3"]
LossAggMode = Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm"]

# Estimators whose baseline comes from the other answers of the same prompt: they need >= 2 answers per prompt.
GROUP_ESTIMATORS: frozenset[str] = frozenset({"reinforce_baseline", "rloo", "grpo", "dr_grpo"})

# Whether advantages are whitened over the global batch when `normalize_advantages` is None. PPO and
# REINFORCE++(-baseline) normalise by definition; RLOO, GRPO and Dr. GRPO already have their group baseline
# (and GRPO its group std), and Dr. GRPO exists precisely to avoid dividing by a std.
NORMALIZES_ADVANTAGES_BY_DEFAULT: dict[str, bool] = {
    "gae": True,
    "reinforce": True,
    "reinforce_baseline": True,
    "rloo": False,
    "grpo": False,
    "dr_grpo": False,
}


def _check_choice(field: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"algorithm.{field} must be one of {list(allowed)}, got {value!r}")


def _check_optional_positive(field: str, value: float | None) -> None:
    if value is not None and not value > 0:
        raise ValueError(f"algorithm.{field} must be > 0 or null (off), got {value}")


@dataclass
class AlgorithmConfig:
    """Which RL algorithm to run and its hyper-parameters. docs/algorithms.md gives every formula."""

    advantage_estimator: AdvantageEstimatorName = "rloo"
    gamma: float = 1.0  # discount of per-token rewards
    lambd: float = 0.95  # GAE lambda (gae only)
    normalize_advantages: bool | None = None  # whiten advantages over the global batch; None: estimator default
    advantage_eps: float = 1e-6  # added to a std before dividing by it (GRPO group std, whitening)

    kl_coef: float = 0.01  # initial KL coefficient; 0 disables the KL and the reference model
    kl_estimator: KLEstimatorName = "k1"
    use_kl_loss: bool = False  # True: KL is a loss term (GRPO style); False: a per-token reward penalty
    kl_target: float | None = None  # adaptive KL controller's target, a per-token KL (the logged `kl`); None: fixed
    kl_horizon: int = 10000  # adaptive KL controller's horizon, in samples
    kl_clamp: float | None = 10.0  # bound each token's KL estimate to [-c, c] (OpenRLHF, verl); None: unbounded

    eps_clip_low: float = 0.2  # PPO ratio lower clip: 1 - eps_clip_low
    eps_clip_high: float = 0.2  # PPO ratio upper clip: 1 + eps_clip_high (> low is "clip-higher")
    dual_clip: float | None = None  # dual-clip constant c > 1 for negative advantages; None: off
    tis_cap: float | None = None  # truncated importance sampling cap on pi_old/pi_rollout; None: off
    entropy_coef: float = 0.0  # entropy bonus coefficient
    loss_agg_mode: LossAggMode = "token_mean"  # seq_mean_token_sum_norm divides by rollout.max_new_tokens
    ppo_epochs: int = 1  # passes over each rollout batch

    value_clip: float | None = 0.2  # critic value clip around the old values; None: unclipped
    reward_clip: float | None = None  # clamp outcome rewards to [-c, c]; None: no clamp
    normalize_reward: bool = False  # standardise outcome rewards with running mean/std over all steps

    def __post_init__(self) -> None:
        _check_choice("advantage_estimator", self.advantage_estimator, get_args(AdvantageEstimatorName))
        _check_choice("kl_estimator", self.kl_estimator, get_args(KLEstimatorName))
        _check_choice("loss_agg_mode", self.loss_agg_mode, get_args(LossAggMode))
        for name, value in (("gamma", self.gamma), ("lambd", self.lambd)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"algorithm.{name} must be in [0, 1], got {value}")
        if not self.advantage_eps > 0:
            raise ValueError(f"algorithm.advantage_eps must be > 0, got {self.advantage_eps}")
        if self.kl_coef < 0:
            raise ValueError(f"algorithm.kl_coef must be >= 0, got {self.kl_coef}")
        _check_optional_positive("kl_target", self.kl_target)
        if self.kl_target is not None and self.kl_coef == 0:
            raise ValueError("algorithm.kl_target needs kl_coef > 0: the adaptive controller scales kl_coef")
        if self.kl_horizon < 1:
            raise ValueError(f"algorithm.kl_horizon must be >= 1, got {self.kl_horizon}")
        _check_optional_positive("kl_clamp", self.kl_clamp)
        if not 0.0 <= self.eps_clip_low < 1.0:
            raise ValueError(f"algorithm.eps_clip_low must be in [0, 1), got {self.eps_clip_low}")
        if self.eps_clip_high < 0:
            raise ValueError(f"algorithm.eps_clip_high must be >= 0, got {self.eps_clip_high}")
        if self.dual_clip is not None and not self.dual_clip > 1.0:
            raise ValueError(f"algorithm.dual_clip must be > 1 or null (off), got {self.dual_clip}")
        _check_optional_positive("tis_cap", self.tis_cap)
        if self.entropy_coef < 0:
            raise ValueError(f"algorithm.entropy_coef must be >= 0, got {self.entropy_coef}")
        if self.ppo_epochs < 1:
            raise ValueError(f"algorithm.ppo_epochs must be >= 1, got {self.ppo_epochs}")
        _check_optional_positive("value_clip", self.value_clip)
        _check_optional_positive("reward_clip", self.reward_clip)

    def check_samples_per_prompt(self, n_samples_per_prompt: int, key: str = "rollout.n_samples_per_prompt") -> None:
        """ValueError unless the group size suits the estimator; `key` names where the value came from.

        The group size is the rollout's `n_samples_per_prompt` (one source of truth); the run schema calls this
        because the check spans two sections."""
        if n_samples_per_prompt < 1:
            raise ValueError(f"{key} must be >= 1, got {n_samples_per_prompt}")
        if self.is_group_estimator and n_samples_per_prompt < 2:
            raise ValueError(
                f"{key} must be >= 2 for the group estimator algorithm.advantage_estimator="
                f"{self.advantage_estimator!r}: a group of one sample has no baseline (got {n_samples_per_prompt})"
            )

    @property
    def is_group_estimator(self) -> bool:
        return self.advantage_estimator in GROUP_ESTIMATORS

    @property
    def needs_critic(self) -> bool:
        return self.advantage_estimator == "gae"

    @property
    def needs_reference(self) -> bool:
        return self.kl_coef > 0

    @property
    def kl_in_reward(self) -> bool:
        """The KL enters as a per-token reward penalty (rather than as a loss term, or not at all); the trainer
        reads this, not `use_kl_loss`, to decide."""
        return self.kl_coef > 0 and not self.use_kl_loss

    @property
    def whitens_advantages(self) -> bool:
        if self.normalize_advantages is not None:
            return self.normalize_advantages
        return NORMALIZES_ADVANTAGES_BY_DEFAULT[self.advantage_estimator]

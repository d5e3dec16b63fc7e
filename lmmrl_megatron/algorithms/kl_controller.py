"""KL coefficient controllers: fixed, or adaptive towards a target KL (Ziegler et al., 2019, section 2.2).

Units. The KL a controller observes, and so the unit of `algorithm.kl_target`, is the **per-token** KL: the mean of
the per-token estimate over every valid response token of the step (`token_mean_kl`), the figure the trainer logs
as `kl`. verl and OpenRLHF feed their controllers a per-token figure too (the mean over sequences of each
sequence's token mean), so their targets carry over; a per-sequence target (Ziegler et al. sum the KL over an
episode) must be divided by the typical response length first.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from lmmrl_megatron.algorithms.config import AlgorithmConfig
from lmmrl_megatron.algorithms.masked import as_bool_mask, masked_fill_invalid

# The adaptive controller moves the coefficient by at most 20% of (num_samples / horizon) per update, so one
# noisy KL measurement cannot swing it far.
_MAX_PROPORTIONAL_ERROR = 0.2


@dataclass
class FixedKLController:
    """A constant coefficient."""

    value: float

    def update(self, observed_kl: float, num_samples: int) -> None:
        """Nothing to adapt; present so the trainer calls every controller the same way."""

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


@dataclass
class AdaptiveKLController:
    """Multiplicative proportional controller on the KL coefficient.

        error = clip(observed_kl / target - 1, -0.2, 0.2)
        value <- value * (1 + error * num_samples / horizon)

    `observed_kl` is the per-token KL of the step (`token_mean_kl`), the unit of `target`; `num_samples` is the
    number of sequences the measurement covers, so the horizon is counted in sequences.
    """

    value: float
    target: float
    horizon: int

    def update(self, observed_kl: float, num_samples: int) -> None:
        error = min(max(observed_kl / self.target - 1.0, -_MAX_PROPORTIONAL_ERROR), _MAX_PROPORTIONAL_ERROR)
        self.value *= 1.0 + error * num_samples / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


KLController = FixedKLController | AdaptiveKLController


def token_mean_kl(kl: Tensor, mask: Tensor) -> float:
    """The KL a controller observes: sum of the per-token estimates over valid tokens / number of valid tokens.

    `kl` and `mask` are [batch, seq] (or 1-D packed); masked positions are ignored whatever they hold; 0.0 for a
    batch without a valid token."""
    bool_mask = as_bool_mask(mask)
    total = masked_fill_invalid(kl.float(), bool_mask).sum()
    return float(total / bool_mask.sum().clamp(min=1))


def make_kl_controller(config: AlgorithmConfig) -> KLController:
    """Adaptive when `kl_target` is set, otherwise fixed at `kl_coef`."""
    if config.kl_target is None:
        return FixedKLController(value=config.kl_coef)
    return AdaptiveKLController(value=config.kl_coef, target=config.kl_target, horizon=config.kl_horizon)

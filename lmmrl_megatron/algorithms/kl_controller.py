"""KL coefficient controllers: fixed, or adaptive towards a target KL (Ziegler et al., 2019, section 2.2)."""

from __future__ import annotations

from dataclasses import dataclass

from lmmrl_megatron.algorithms.config import AlgorithmConfig

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

    `observed_kl` must be in the units of `target` (e.g. the batch mean of each sequence's summed KL);
    `num_samples` is the number of sequences the measurement covers, so the horizon is counted in samples.
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


def make_kl_controller(config: AlgorithmConfig) -> KLController:
    """Adaptive when `kl_target` is set, otherwise fixed at `kl_coef`."""
    if config.kl_target is None:
        return FixedKLController(value=config.kl_coef)
    return AdaptiveKLController(value=config.kl_coef, target=config.kl_target, horizon=config.kl_horizon)

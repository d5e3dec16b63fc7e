"""Outcome reward shaping before the advantage estimator: running standardisation, then clipping.

Applies to every reward source the same way (rule-based, reward model, remote server), because it acts on the
per-sequence scores after they are collected rather than inside a reward model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor

from lmmrl_megatron.algorithms.config import AlgorithmConfig


@dataclass
class RunningMoments:
    """Mean and variance of every score seen so far (over all steps), merged batch by batch.

    Chan et al.'s parallel update merges the stored (count, mean, m2) with a batch's own moments, in float64,
    without the cancellation of a sum-of-squares formula; a resumed run (via state_dict) continues identically.
    """

    count: float = 0.0
    mean: float = 0.0
    m2: float = 0.0  # sum of squared deviations from the mean

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.count) if self.count > 0 else 0.0

    def update(self, values: Tensor) -> None:
        batch = values.detach().double().flatten()
        batch_count = batch.numel()
        if batch_count == 0:
            return
        batch_mean = float(batch.mean())
        batch_m2 = float(((batch - batch_mean) ** 2).sum())
        total = self.count + batch_count
        delta = batch_mean - self.mean
        self.mean += delta * batch_count / total
        self.m2 += batch_m2 + delta**2 * self.count * batch_count / total
        self.count = total

    def state_dict(self) -> dict[str, float]:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.count, self.mean, self.m2 = float(state["count"]), float(state["mean"]), float(state["m2"])


def shape_scores(
    scores: Tensor, moments: RunningMoments | None, reward_clip: float | None, eps: float = 1e-6
) -> Tensor:
    """Standardise with the running moments (updated with this batch first), then clamp to [-clip, clip].

        s' = (s - running_mean) / (running_std + eps)     if moments is given (normalize_reward)
        s' = clamp(s', -reward_clip, reward_clip)         if reward_clip is given
    """
    shaped = scores.float()
    if moments is not None:
        moments.update(scores)
        shaped = (shaped - moments.mean) / (moments.std + eps)
    if reward_clip is not None:
        shaped = shaped.clamp(min=-reward_clip, max=reward_clip)
    return shaped


def make_reward_moments(config: AlgorithmConfig) -> RunningMoments | None:
    """The running moments to keep (and checkpoint) when the config normalises rewards, else None."""
    return RunningMoments() if config.normalize_reward else None

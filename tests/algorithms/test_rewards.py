import math

import pytest
import torch

from lmmrl_megatron.algorithms.config import AlgorithmConfig
from lmmrl_megatron.algorithms.rewards import RunningMoments, make_reward_moments, shape_scores


def test_running_moments_merge_batches_exactly():
    moments = RunningMoments()
    moments.update(torch.tensor([1.0, 2.0, 3.0]))
    moments.update(torch.tensor([4.0, 5.0]))
    # all five: mean 3, sum of squared deviations 4 + 1 + 0 + 1 + 4 = 10
    assert moments.count == 5 and moments.mean == pytest.approx(3.0) and moments.m2 == pytest.approx(10.0)
    assert moments.std == pytest.approx(math.sqrt(2.0))


def test_clip_only():
    shaped = shape_scores(torch.tensor([-2.0, 0.5, 3.0]), moments=None, reward_clip=1.0)
    assert shaped.tolist() == [-1.0, 0.5, 1.0]


def test_normalise_with_running_statistics_then_clip():
    moments = RunningMoments()
    first = shape_scores(torch.tensor([1.0, 3.0]), moments, reward_clip=None, eps=0.0)
    assert first.tolist() == [-1.0, 1.0]  # mean 2, std 1
    second = shape_scores(torch.tensor([5.0]), moments, reward_clip=None, eps=0.0)
    # moments of all scores so far [1, 3, 5]: mean 3, std sqrt(8 / 3)
    assert second.item() == pytest.approx(2.0 / math.sqrt(8 / 3), rel=1e-6)
    clipped = shape_scores(torch.tensor([100.0]), moments, reward_clip=1.5)
    assert clipped.item() == 1.5


def test_state_round_trip_continues_identically():
    original = RunningMoments()
    shape_scores(torch.tensor([0.0, 1.0, 1.0]), original, None)
    restored = RunningMoments()
    restored.load_state_dict(original.state_dict())
    batch = torch.tensor([0.0, 1.0])
    assert torch.equal(shape_scores(batch, original, None), shape_scores(batch, restored, None))


def test_moments_exist_only_when_configured():
    assert make_reward_moments(AlgorithmConfig()) is None
    assert make_reward_moments(AlgorithmConfig(normalize_reward=True)) == RunningMoments()

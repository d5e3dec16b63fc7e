import math
from dataclasses import replace
from typing import get_args

import pytest
import torch

from lmmrl_megatron.algorithms.advantages import (
    ADVANTAGE_ESTIMATORS,
    AdvantageInputs,
    compute_advantages,
    discounted_returns,
    gae_advantages,
    group_mean_baseline,
    group_normalized,
    leave_one_out_baseline,
    nonconstant_group_mask,
    place_on_last_token,
)
from lmmrl_megatron.algorithms.config import AdvantageEstimatorName, AlgorithmConfig
from lmmrl_megatron.algorithms.masked import masked_moments

EPS = 1e-6
GARBAGE = [float("nan"), float("inf"), -1e30, 7.0]


def _fill_masked(tensor: torch.Tensor, mask: torch.Tensor, seed: int) -> torch.Tensor:
    """Copy of `tensor` with garbage (NaN, inf, huge, plain) at masked positions."""
    generator = torch.Generator().manual_seed(seed)
    choices = torch.tensor(GARBAGE)[torch.randint(len(GARBAGE), tensor.shape, generator=generator)]
    return torch.where(mask.bool(), tensor, choices)


def test_registry_covers_every_config_name():
    assert set(ADVANTAGE_ESTIMATORS) == set(get_args(AdvantageEstimatorName))


def test_place_on_last_token():
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]])
    placed = place_on_last_token(torch.tensor([2.0, -1.0, 5.0]), mask)
    assert torch.equal(placed, torch.tensor([[0.0, 2.0, 0.0, 0.0], [0.0, 0.0, -1.0, 0.0], [0.0, 0.0, 0.0, 0.0]]))


def test_discounted_returns_by_hand():
    rewards = torch.tensor([[1.0, 2.0, 3.0], [1.0, 100.0, 3.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 1]])
    returns = discounted_returns(rewards, mask, gamma=0.5)
    # row 0: G2 = 3, G1 = 2 + 0.5 * 3 = 3.5, G0 = 1 + 0.5 * 3.5 = 2.75
    # row 1: the hole at t=1 is skipped (no reward, no discount): G2 = 3, G0 = 1 + 0.5 * 3 = 2.5
    assert torch.allclose(returns, torch.tensor([[2.75, 3.5, 3.0], [2.5, 0.0, 3.0]]))
    undiscounted = discounted_returns(rewards, mask, gamma=1.0)
    assert torch.allclose(undiscounted, torch.tensor([[6.0, 5.0, 3.0], [4.0, 0.0, 3.0]]))


def test_gae_by_hand():
    # gamma = 0.9, lambda = 0.8, so gamma * lambda = 0.72
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 1, 0]])
    values = torch.tensor([[0.5, 1.0, 1.5, 99.0], [0.5, 99.0, 1.5, 99.0]])
    # row 0: score 1 on the last token plus KL rewards -> r = [-0.1, -0.2, 1 - 0.3]
    # row 1: score 2 on t=2, t=1 is a hole
    rewards = torch.tensor([[-0.1, -0.2, 0.7, 5.0], [0.0, 5.0, 2.0, 5.0]])
    advantages, returns = gae_advantages(rewards, values, mask, gamma=0.9, lambd=0.8)
    # row 0: delta2 = 0.7 - 1.5 = -0.8; delta1 = -0.2 + 0.9*1.5 - 1.0 = 0.15; delta0 = -0.1 + 0.9*1.0 - 0.5 = 0.3
    #        A2 = -0.8; A1 = 0.15 + 0.72*(-0.8) = -0.426; A0 = 0.3 + 0.72*(-0.426) = -0.00672
    # row 1: delta2 = 2 - 1.5 = 0.5; delta0 = 0 + 0.9*1.5 - 0.5 = 0.85; A0 = 0.85 + 0.72*0.5 = 1.21
    expected_advantages = torch.tensor([[-0.00672, -0.426, -0.8, 0.0], [1.21, 0.0, 0.5, 0.0]])
    expected_returns = torch.tensor([[0.49328, 0.574, 0.7, 0.0], [1.71, 0.0, 2.0, 0.0]])
    assert torch.allclose(advantages, expected_advantages, atol=1e-6)
    assert torch.allclose(returns, expected_returns, atol=1e-6)


def test_gae_estimator_places_score_and_kl_then_whitens():
    config = AlgorithmConfig(advantage_estimator="gae", gamma=1.0, lambd=1.0)
    mask = torch.tensor([[1, 1]])
    inputs = AdvantageInputs(
        scores=torch.tensor([1.0]),
        mask=mask,
        kl_rewards=torch.tensor([[-0.5, 0.0]]),
        values=torch.tensor([[0.25, 0.75]]),
    )
    raw = compute_advantages(replace(config, normalize_advantages=False), inputs, 1)
    # gamma = lambda = 1: A_t = (sum of rewards from t) - V_t: A0 = (-0.5 + 1) - 0.25 = 0.25, A1 = 1 - 0.75 = 0.25
    assert torch.allclose(raw.advantages, torch.tensor([[0.25, 0.25]]))
    assert torch.allclose(raw.returns, torch.tensor([[0.5, 1.0]]))
    # both advantages equal: whitening gives exact zeros, not (rounding noise) / eps
    assert torch.equal(compute_advantages(config, inputs, 1).advantages, torch.zeros(1, 2))


def test_gae_without_values_is_an_error():
    config = AlgorithmConfig(advantage_estimator="gae")
    with pytest.raises(ValueError, match="needs critic values"):
        compute_advantages(config, AdvantageInputs(scores=torch.ones(2), mask=torch.ones(2, 3)), 1)


def test_reinforce_plus_plus_by_hand():
    config = AlgorithmConfig(advantage_estimator="reinforce", gamma=1.0)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    inputs = AdvantageInputs(
        scores=torch.tensor([1.0, 0.0]),
        mask=mask,
        kl_rewards=torch.tensor([[-0.1, -0.1, 0.0], [-0.2, 0.0, -0.1]]),
    )
    output = compute_advantages(config, inputs, 1)
    # token rewards: row 0 [-0.1, 1 - 0.1], row 1 [-0.2, 0, -0.1]; returns: [0.8, 0.9], [-0.3, -0.1, -0.1]
    assert torch.allclose(output.returns, torch.tensor([[0.8, 0.9, 0.0], [-0.3, -0.1, -0.1]]))
    # whitened over the 5 valid tokens: mean 0.24, deviations [.56, .66, -.54, -.34, -.34], var 1.272 / 5
    std = math.sqrt(1.272 / 5)
    expected = torch.tensor([[0.56, 0.66, 0.0], [-0.54, -0.34, -0.34]]) / (std + EPS)
    assert torch.allclose(output.advantages, expected, atol=1e-5)


def test_reinforce_baseline_by_hand():
    config = AlgorithmConfig(advantage_estimator="reinforce_baseline", kl_coef=0.0)
    inputs = AdvantageInputs(scores=torch.tensor([1.0, 0.0, 3.0, 3.0]), mask=torch.ones(4, 2))
    output = compute_advantages(config, inputs, 2)
    # minus the group mean: [0.5, -0.5, 0, 0]; over 8 tokens mean 0, var (4 * 0.25) / 8 = 0.125
    assert torch.allclose(output.shaped_scores, torch.tensor([0.5, -0.5, 0.0, 0.0]))
    expected_row = torch.tensor([0.5, -0.5, 0.0, 0.0]) / (math.sqrt(0.125) + EPS)
    assert torch.allclose(output.advantages, expected_row[:, None].expand(4, 2), atol=1e-6)


def test_rloo_by_hand():
    scores = torch.tensor([1.0, 0.0, 0.0, 2.0, 4.0, 6.0])
    # group 1: 1 - mean(0, 0) = 1; 0 - mean(1, 0) = -0.5 (twice); group 2: 2 - 5, 4 - 4, 6 - 3
    expected = torch.tensor([1.0, -0.5, -0.5, -3.0, 0.0, 3.0])
    assert torch.allclose(leave_one_out_baseline(scores, 3), expected)
    config = AlgorithmConfig(advantage_estimator="rloo")
    output = compute_advantages(config, AdvantageInputs(scores=scores, mask=torch.ones(6, 2)), 3)
    assert torch.allclose(output.advantages, expected[:, None].expand(6, 2))  # not whitened by default


def test_grpo_by_hand():
    scores = torch.tensor([1.0, 0.0, 0.0, 2.0, 4.0, 6.0])
    # group 1: mean 1/3, unbiased std sqrt(((2/3)^2 + 2 (1/3)^2) / 2) = sqrt(1/3); group 2: mean 4, std 2
    std_1 = math.sqrt(1 / 3)
    group_1 = [(2 / 3) / (std_1 + EPS), (-1 / 3) / (std_1 + EPS), (-1 / 3) / (std_1 + EPS)]
    group_2 = [-2 / (2 + EPS), 0.0, 2 / (2 + EPS)]
    expected = torch.tensor(group_1 + group_2)
    assert torch.allclose(group_normalized(scores, 3, EPS), expected, atol=1e-6)


def test_dr_grpo_by_hand():
    scores = torch.tensor([1.0, 0.0, 0.0, 2.0, 4.0, 6.0])
    expected = torch.tensor([2 / 3, -1 / 3, -1 / 3, -2.0, 0.0, 2.0])
    assert torch.allclose(group_mean_baseline(scores, 3), expected)
    config = AlgorithmConfig(advantage_estimator="dr_grpo")
    output = compute_advantages(config, AdvantageInputs(scores=scores, mask=torch.ones(6, 1)), 3)
    assert torch.allclose(output.advantages[:, 0], expected)


def test_kl_reward_penalty_accumulates_into_group_estimator_returns():
    config = AlgorithmConfig(advantage_estimator="rloo")
    inputs = AdvantageInputs(
        scores=torch.tensor([1.0, 0.0]),
        mask=torch.ones(2, 3),
        kl_rewards=torch.tensor([[-0.1, -0.2, -0.3], [0.0, 0.0, -0.4]]),
    )
    output = compute_advantages(config, inputs, 2)
    # shaped scores [1, -1] on the last token, KL rewards per token, gamma = 1 reward-to-go
    assert torch.allclose(output.advantages, torch.tensor([[0.4, 0.5, 0.7], [-1.4, -1.4, -1.4]]))


GROUP_NAMES = ["reinforce_baseline", "rloo", "grpo", "dr_grpo"]


@pytest.mark.parametrize("name", GROUP_NAMES)
def test_constant_group_gives_exact_zero_not_nan(name):
    config = AlgorithmConfig(advantage_estimator=name, kl_coef=0.0)
    scores = torch.tensor([0.8847743272781372] * 3 + [0.7] * 3)
    grouped = scores.view(2, 3)
    # a naive r - mean(r) is rounding noise here, not 0 (and GRPO would divide it by eps)
    assert (grouped - grouped.mean(dim=-1, keepdim=True)).abs().max() > 0
    output = compute_advantages(config, AdvantageInputs(scores=scores, mask=torch.ones(6, 4)), 3)
    assert torch.equal(output.advantages, torch.zeros(6, 4))


@pytest.mark.parametrize("name", GROUP_NAMES)
def test_group_of_one_sample_is_a_named_error(name):
    config = AlgorithmConfig(advantage_estimator=name)
    inputs = AdvantageInputs(scores=torch.ones(4), mask=torch.ones(4, 2))
    with pytest.raises(ValueError, match=f"'{name}' is a group estimator.*group of one sample has no baseline"):
        compute_advantages(config, inputs, 1)


@pytest.mark.parametrize("name", GROUP_NAMES)
def test_batch_of_partial_groups_is_an_error(name):
    config = AlgorithmConfig(advantage_estimator=name)
    with pytest.raises(ValueError, match="whole groups"):
        compute_advantages(config, AdvantageInputs(scores=torch.ones(6), mask=torch.ones(6, 2)), 4)


def test_nonconstant_group_mask_marks_groups_with_signal():
    scores = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0])
    assert nonconstant_group_mask(scores, 2).tolist() == [False, False, True, True, False, False]


def test_rloo_is_zero_sum_within_each_group():
    generator = torch.Generator().manual_seed(0)
    for n in (2, 3, 5, 8):
        scores = torch.randn(4 * n, generator=generator)
        shaped = leave_one_out_baseline(scores, n).view(4, n)
        assert torch.allclose(shaped.sum(dim=-1), torch.zeros(4), atol=1e-5)
        # and equals n / (n - 1) times the mean-baseline advantage
        assert torch.allclose(shaped, group_mean_baseline(scores, n).view(4, n) * n / (n - 1), atol=1e-5)


def _random_batch(seed: int, num_prompts: int, n: int, seq_len: int) -> AdvantageInputs:
    generator = torch.Generator().manual_seed(seed)
    batch = num_prompts * n
    lengths = torch.randint(1, seq_len + 1, (batch,), generator=generator)
    mask = torch.arange(seq_len)[None, :] < lengths[:, None]
    return AdvantageInputs(
        scores=torch.randint(0, 3, (batch,), generator=generator).float(),
        mask=mask,
        kl_rewards=-0.01 * torch.rand(batch, seq_len, generator=generator),
        values=torch.randn(batch, seq_len, generator=generator),
    )


ALL_NAMES = list(get_args(AdvantageEstimatorName))


@pytest.mark.parametrize("name", ALL_NAMES)
@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_masked_positions_never_change_results(name, gamma):
    config = AlgorithmConfig(advantage_estimator=name, gamma=gamma)
    inputs = _random_batch(seed=1, num_prompts=3, n=4, seq_len=7)
    clean = compute_advantages(config, inputs, 4)
    garbage = replace(
        inputs,
        kl_rewards=_fill_masked(inputs.kl_rewards, inputs.mask, seed=2),
        values=_fill_masked(inputs.values, inputs.mask, seed=3),
    )
    dirty = compute_advantages(config, garbage, 4)
    assert torch.equal(dirty.advantages, clean.advantages)
    assert torch.equal(dirty.returns, clean.returns)
    assert not clean.advantages[~inputs.mask].any()
    # extra padding columns (with garbage) leave the valid part unchanged
    widened = AdvantageInputs(
        scores=inputs.scores,
        mask=torch.nn.functional.pad(inputs.mask, (0, 3), value=False),
        kl_rewards=torch.nn.functional.pad(inputs.kl_rewards, (0, 3), value=float("nan")),
        values=torch.nn.functional.pad(inputs.values, (0, 3), value=float("inf")),
    )
    padded = compute_advantages(config, widened, 4)
    assert torch.allclose(padded.advantages[:, :7], clean.advantages, atol=1e-6)
    assert torch.equal(padded.advantages[:, 7:], torch.zeros(12, 3))


@pytest.mark.parametrize("name", ALL_NAMES)
def test_permuting_groups_and_answers_permutes_advantages(name):
    config = AlgorithmConfig(advantage_estimator=name, gamma=0.95)
    inputs = _random_batch(seed=4, num_prompts=3, n=4, seq_len=6)
    generator = torch.Generator().manual_seed(5)
    group_order = torch.randperm(3, generator=generator)
    within = torch.stack([torch.randperm(4, generator=generator) for _ in range(3)])
    permutation = (group_order[:, None] * 4 + within).flatten()  # reorders groups and answers inside them
    permuted = AdvantageInputs(
        scores=inputs.scores[permutation],
        mask=inputs.mask[permutation],
        kl_rewards=inputs.kl_rewards[permutation],
        values=inputs.values[permutation],
    )
    original = compute_advantages(config, inputs, 4)
    reordered = compute_advantages(config, permuted, 4)
    assert torch.allclose(reordered.advantages, original.advantages[permutation], atol=1e-5)


def test_precomputed_moments_match_local_whitening():
    config = AlgorithmConfig(advantage_estimator="reinforce")
    inputs = _random_batch(seed=6, num_prompts=8, n=1, seq_len=5)
    raw = compute_advantages(replace(config, normalize_advantages=False), inputs, 1)
    moments = masked_moments(raw.advantages, inputs.mask)
    via_moments = compute_advantages(config, inputs, 1, whiten_moments=moments)
    assert torch.equal(via_moments.advantages, compute_advantages(config, inputs, 1).advantages)
    valid = via_moments.advantages[inputs.mask]
    assert abs(float(valid.mean())) < 1e-5 and abs(float(valid.std(unbiased=False)) - 1.0) < 1e-4


def test_shape_mismatch_is_an_error():
    config = AlgorithmConfig(advantage_estimator="reinforce")
    with pytest.raises(ValueError, match="scores must be"):
        compute_advantages(config, AdvantageInputs(scores=torch.ones(3), mask=torch.ones(2, 4)), 1)
    with pytest.raises(ValueError, match="kl_rewards must have"):
        bad_kl = AdvantageInputs(scores=torch.ones(2), mask=torch.ones(2, 4), kl_rewards=torch.ones(2, 3))
        compute_advantages(config, bad_kl, 1)

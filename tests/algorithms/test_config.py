from typing import get_args

import pytest

from lmmrl_megatron.algorithms.config import (
    GROUP_ESTIMATORS,
    NORMALIZES_ADVANTAGES_BY_DEFAULT,
    AdvantageEstimatorName,
    AlgorithmConfig,
)


def test_defaults_are_valid_and_self_consistent():
    config = AlgorithmConfig()
    assert config.advantage_estimator == "rloo"
    assert config.is_group_estimator and not config.needs_critic
    assert config.needs_reference and config.kl_in_reward
    assert config.whitens_advantages is False


def test_every_estimator_has_a_whitening_default():
    assert set(NORMALIZES_ADVANTAGES_BY_DEFAULT) == set(get_args(AdvantageEstimatorName))
    assert GROUP_ESTIMATORS < set(get_args(AdvantageEstimatorName))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"advantage_estimator": "ppo"}, "advantage_estimator"),
        ({"kl_estimator": "k4"}, "kl_estimator"),
        ({"loss_agg_mode": "seq_sum"}, "loss_agg_mode"),
        ({"gamma": 1.5}, "gamma"),
        ({"lambd": -0.1}, "lambd"),
        ({"advantage_eps": 0.0}, "advantage_eps"),
        ({"kl_coef": -0.1}, "kl_coef"),
        ({"kl_target": 0.0}, "kl_target"),
        ({"kl_target": 0.1, "kl_coef": 0.0}, "kl_target"),
        ({"kl_horizon": 0}, "kl_horizon"),
        ({"kl_clamp": -1.0}, "kl_clamp"),
        ({"eps_clip_low": 1.0}, "eps_clip_low"),
        ({"eps_clip_high": -0.1}, "eps_clip_high"),
        ({"dual_clip": 1.0}, "dual_clip"),
        ({"tis_cap": 0.0}, "tis_cap"),
        ({"entropy_coef": -0.01}, "entropy_coef"),
        ({"ppo_epochs": 0}, "ppo_epochs"),
        ({"value_clip": 0.0}, "value_clip"),
        ({"reward_clip": -5.0}, "reward_clip"),
    ],
)
def test_invalid_values_raise_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"algorithm\.{field}\b"):
        AlgorithmConfig(**kwargs)


@pytest.mark.parametrize("estimator", sorted(GROUP_ESTIMATORS))
def test_group_of_one_is_rejected_naming_the_key(estimator):
    config = AlgorithmConfig(advantage_estimator=estimator)
    with pytest.raises(ValueError, match=rf"rollout\.n_samples_per_prompt must be >= 2 .*'{estimator}'.*group of one"):
        config.check_samples_per_prompt(1)
    config.check_samples_per_prompt(2)


def test_non_group_estimators_accept_one_sample_per_prompt():
    for name in ("gae", "reinforce"):
        AlgorithmConfig(advantage_estimator=name).check_samples_per_prompt(1)
    with pytest.raises(ValueError, match=r"x\.n must be >= 1"):
        AlgorithmConfig(advantage_estimator="gae").check_samples_per_prompt(0, key="x.n")


@pytest.mark.parametrize(
    ("estimator", "override", "expected"),
    [
        ("gae", None, True),
        ("reinforce", None, True),
        ("grpo", None, False),
        ("grpo", True, True),
        ("gae", False, False),
    ],
)
def test_whitening_follows_estimator_unless_overridden(estimator, override, expected):
    config = AlgorithmConfig(advantage_estimator=estimator, normalize_advantages=override)
    assert config.whitens_advantages is expected


def test_kl_placement_properties():
    assert not AlgorithmConfig(kl_coef=0.0).needs_reference
    assert not AlgorithmConfig(kl_coef=0.0).kl_in_reward
    loss_config = AlgorithmConfig(kl_coef=0.1, use_kl_loss=True)
    assert loss_config.needs_reference and not loss_config.kl_in_reward
    assert AlgorithmConfig(advantage_estimator="gae").needs_critic

import pytest
import torch

from lmmrl_megatron.algorithms.config import AlgorithmConfig
from lmmrl_megatron.algorithms.kl_controller import (
    AdaptiveKLController,
    FixedKLController,
    make_kl_controller,
    token_mean_kl,
)


def test_fixed_controller_never_moves():
    controller = FixedKLController(value=0.05)
    controller.update(observed_kl=100.0, num_samples=1000)
    assert controller.value == 0.05


@pytest.mark.parametrize(
    ("observed_kl", "expected"),
    [
        (1.1, 0.1 * (1 + 0.1 * 10 / 100)),  # error 0.1
        (5.0, 0.1 * (1 + 0.2 * 10 / 100)),  # error 4.0 clipped to 0.2
        (0.0, 0.1 * (1 - 0.2 * 10 / 100)),  # error -1 clipped to -0.2
        (1.0, 0.1),  # on target
    ],
)
def test_adaptive_controller_by_hand(observed_kl, expected):
    controller = AdaptiveKLController(value=0.1, target=1.0, horizon=100)
    controller.update(observed_kl=observed_kl, num_samples=10)
    assert controller.value == pytest.approx(expected, rel=1e-12)


def test_adaptive_state_round_trip_continues_identically():
    first = AdaptiveKLController(value=0.1, target=0.5, horizon=50)
    first.update(0.9, 8)
    second = AdaptiveKLController(value=123.0, target=0.5, horizon=50)
    second.load_state_dict(first.state_dict())
    first.update(0.2, 8)
    second.update(0.2, 8)
    assert first.value == second.value != 0.1


def test_factory_follows_kl_target():
    assert make_kl_controller(AlgorithmConfig(kl_coef=0.02)) == FixedKLController(value=0.02)
    adaptive = make_kl_controller(AlgorithmConfig(kl_coef=0.02, kl_target=0.1, kl_horizon=500))
    assert adaptive == AdaptiveKLController(value=0.02, target=0.1, horizon=500)


def test_the_controller_observes_the_per_token_kl():
    """One sequence of 1 token with KL 0.4 and one of 3 tokens with KL 0.1 each (padding holds garbage)."""
    kl = torch.tensor([[0.4, float("nan"), 9.0], [0.1, 0.1, 0.1]])
    mask = torch.tensor([[1, 0, 0], [1, 1, 1]])
    # per token: (0.4 + 0.3) / 4 = 0.175; not the mean of the sequence sums (0.35), nor of the sequence means (0.25)
    assert token_mean_kl(kl, mask) == pytest.approx(0.175)
    assert token_mean_kl(torch.zeros(2, 3), torch.zeros(2, 3)) == 0.0
    # a target chosen in per-token units: 0.175 / 0.125 - 1 = 0.4, clipped to 0.2; 2 sequences, horizon 10
    controller = make_kl_controller(AlgorithmConfig(kl_coef=0.1, kl_target=0.125, kl_horizon=10))
    controller.update(token_mean_kl(kl, mask), num_samples=2)
    assert controller.value == pytest.approx(0.1 * (1 + 0.2 * 2 / 10))
    # the same target read as the docs used to describe it (sequence sums: 0.35) would not have been "on target"
    on_target = make_kl_controller(AlgorithmConfig(kl_coef=0.1, kl_target=0.175, kl_horizon=10))
    on_target.update(token_mean_kl(kl, mask), num_samples=2)
    assert on_target.value == pytest.approx(0.1)

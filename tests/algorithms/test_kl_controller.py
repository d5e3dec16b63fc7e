import pytest

from lmmrl_megatron.algorithms.config import AlgorithmConfig
from lmmrl_megatron.algorithms.kl_controller import AdaptiveKLController, FixedKLController, make_kl_controller


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

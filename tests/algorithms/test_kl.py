import math

import pytest
import torch

from lmmrl_megatron.algorithms.kl import kl_estimate, kl_reward_penalty

LOG2 = math.log(2.0)


def test_estimators_by_hand():
    # token 0: pi = 0.5, pi_ref = 0.25, r = log 2; token 1: pi = 0.25, pi_ref = 0.5, r = -log 2
    log_probs = torch.tensor([math.log(0.5), math.log(0.25)])
    ref_log_probs = torch.tensor([math.log(0.25), math.log(0.5)])
    expected = {
        "k1": [LOG2, -LOG2],
        "k2": [0.5 * LOG2**2, 0.5 * LOG2**2],
        "k3": [0.5 - 1 + LOG2, 2.0 - 1 - LOG2],  # pi_ref/pi - 1 - log(pi_ref/pi)
    }
    for name, values in expected.items():
        assert torch.allclose(kl_estimate(log_probs, ref_log_probs, name), torch.tensor(values), atol=1e-6), name


def test_k1_and_k3_are_unbiased_k2_is_not():
    # Exact expectation over a 3-token vocabulary, tokens drawn from p.
    p = torch.tensor([0.5, 0.3, 0.2])
    q = torch.tensor([0.2, 0.5, 0.3])
    true_kl = 0.5 * math.log(0.5 / 0.2) + 0.3 * math.log(0.3 / 0.5) + 0.2 * math.log(0.2 / 0.3)
    for name in ("k1", "k3"):
        expectation = float((p * kl_estimate(p.log(), q.log(), name)).sum())
        assert expectation == pytest.approx(true_kl, abs=1e-6), name
    k2_expectation = float((p * kl_estimate(p.log(), q.log(), "k2")).sum())
    assert abs(k2_expectation - true_kl) > 1e-3


@pytest.mark.parametrize("name", ["k2", "k3"])
def test_k2_k3_never_negative(name):
    generator = torch.Generator().manual_seed(0)
    log_probs = torch.randn(1000, generator=generator) * 3
    ref_log_probs = torch.randn(1000, generator=generator) * 3
    assert (kl_estimate(log_probs, ref_log_probs, name) >= 0).all()


def test_clamp_bounds_the_log_ratio_and_keeps_gradients_finite():
    log_probs = torch.tensor([50.0, -200.0, 0.3], requires_grad=True)
    ref_log_probs = torch.zeros(3)
    k3 = kl_estimate(log_probs, ref_log_probs, "k3", clamp=10.0)
    # r clamped to [10, -10, 0.3]
    expected = torch.tensor([math.exp(-10) - 1 + 10, math.exp(10) - 1 - 10, math.exp(-0.3) - 1 + 0.3])
    assert torch.allclose(k3, expected, rtol=1e-6)
    k3.sum().backward()
    assert torch.isfinite(log_probs.grad).all()
    assert log_probs.grad[0] == 0 and log_probs.grad[1] == 0  # clamped tokens pass no gradient
    assert kl_estimate(log_probs.detach(), ref_log_probs, "k1", clamp=10.0)[0] == 10.0
    unclamped = kl_estimate(log_probs.detach(), ref_log_probs, "k3")
    assert torch.isinf(unclamped[1])  # exp(200) overflows: why the clamp exists


def test_unknown_estimator_is_an_error():
    with pytest.raises(ValueError, match="unknown KL estimator 'k9'"):
        kl_estimate(torch.zeros(2), torch.zeros(2), "k9")  # type: ignore[arg-type]


def test_reward_penalty_is_negative_scaled_masked_and_gradient_free():
    log_probs = torch.tensor([[math.log(0.5), math.log(0.25), float("nan")]], requires_grad=True)
    ref_log_probs = torch.tensor([[math.log(0.25), math.log(0.5), float("inf")]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    penalty = kl_reward_penalty(log_probs, ref_log_probs, mask, "k1", kl_coef=0.1)
    assert torch.allclose(penalty, torch.tensor([[-0.1 * LOG2, 0.1 * LOG2, 0.0]]))
    assert not penalty.requires_grad

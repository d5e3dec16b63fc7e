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


def test_kl_clamp_bounds_the_estimate_and_saturated_tokens_pass_no_gradient():
    # r = log pi - log pi_ref: -10 (the reference finds the token e^10 times likelier), -2, 3 and 50.
    log_probs = torch.tensor([-10.0, -2.0, 3.0, 50.0], requires_grad=True)
    ref_log_probs = torch.zeros(4)
    e = math.e
    # k3(r) = e^-r - 1 + r, dk3/dr = 1 - e^-r, bounded to [-10, 10] (OpenRLHF's compute_approx_kl, verl's low_var_kl):
    #   r = -10: e^10 - 11 = 22015.5 -> 10, gradient 0 (clamping only r gave 2.2e4 and a gradient of 1 - e^10)
    #   r = -2:  e^2 - 3 = 4.389,  gradient 1 - e^2 = -6.389
    #   r = 3:   e^-3 + 2 = 2.0498, gradient 1 - e^-3 = 0.9502
    #   r = 50:  r held at 20 inside k3, e^-20 + 19 ~ 19 -> 10, gradient 0
    k3 = kl_estimate(log_probs, ref_log_probs, "k3", clamp=10.0)
    assert torch.allclose(k3, torch.tensor([10.0, e**2 - 3, e**-3 + 2, 10.0]), rtol=1e-6)
    (grad,) = torch.autograd.grad(k3.sum(), log_probs)
    assert torch.allclose(grad, torch.tensor([0.0, 1 - e**2, 1 - e**-3, 0.0]), rtol=1e-6)
    # k2(r) = r^2 / 2, dk2/dr = r: 50 -> 10, 2, 4.5, 1250 -> 10
    k2 = kl_estimate(log_probs, ref_log_probs, "k2", clamp=10.0)
    assert torch.allclose(k2, torch.tensor([10.0, 2.0, 4.5, 10.0]))
    (grad,) = torch.autograd.grad(k2.sum(), log_probs)
    assert torch.allclose(grad, torch.tensor([0.0, -2.0, 3.0, 0.0]))
    # k1 is r itself: the bound is a clamp of r
    k1 = kl_estimate(log_probs.detach(), ref_log_probs, "k1", clamp=10.0)
    assert torch.equal(k1, torch.tensor([-10.0, -2.0, 3.0, 10.0]))


def test_unbounded_k3_stays_finite():
    log_probs = torch.tensor([-200.0, 200.0], requires_grad=True)
    k3 = kl_estimate(log_probs, torch.zeros(2), "k3", clamp=None)
    # r held to [-20, 20] inside k3: e^20 - 21 and e^-20 + 19; without it exp(200) is inf and the backward NaN
    assert torch.allclose(k3, torch.tensor([math.exp(20) - 21, math.exp(-20) + 19]), rtol=1e-6)
    k3.sum().backward()
    assert torch.equal(log_probs.grad, torch.zeros(2))


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

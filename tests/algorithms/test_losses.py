import math

import pytest
import torch

from lmmrl_megatron.algorithms.config import AlgorithmConfig
from lmmrl_megatron.algorithms.losses import (
    PolicyLossInputs,
    entropy_from_logits,
    policy_loss,
    ppo_clip_token_losses,
    truncated_is_weights,
    value_loss,
)

# (advantage, ratio) -> with eps_low 0.2, eps_high 0.28, dual_clip 3:
#   loss = max(-A r, -A clip(r, 0.8, 1.28)), then min(loss, 3 |A|) for A < 0
PPO_CASES = [
    # A, ratio, loss, clipped, dual_clipped
    (1.0, 1.1, -1.1, False, False),  # inside the range
    (1.0, 1.5, -1.28, True, False),  # positive A, ratio above 1 + eps_high
    (-1.0, 0.5, 0.8, True, False),  # negative A, ratio below 1 - eps_low
    (-1.0, 1.5, 1.5, False, False),  # negative A, large ratio: unclipped, under the dual bound 3
    (-2.0, 4.0, 6.0, False, True),  # negative A, ratio 4: 8 > dual bound 3 * 2 = 6
    (2.0, 0.5, -1.0, False, False),  # positive A, small ratio: the pessimistic unclipped term
]


def _ppo_case_tensors():
    advantages = torch.tensor([case[0] for case in PPO_CASES])
    log_ratio = torch.tensor([math.log(case[1]) for case in PPO_CASES])
    return advantages, log_ratio


def test_ppo_clip_by_hand():
    advantages, log_ratio = _ppo_case_tensors()
    old_log_probs = torch.full_like(log_ratio, -1.0)
    log_probs = (old_log_probs + log_ratio).requires_grad_(True)
    terms = ppo_clip_token_losses(log_probs, old_log_probs, advantages, 0.2, 0.28, dual_clip=3.0)
    assert torch.allclose(terms.losses, torch.tensor([case[2] for case in PPO_CASES]), atol=1e-6)
    assert terms.is_clipped.tolist() == [case[3] for case in PPO_CASES]
    assert terms.is_dual_clipped.tolist() == [case[4] for case in PPO_CASES]
    terms.losses.sum().backward()
    # d(-A r)/d log_prob = -A r where the unclipped term is active, 0 where clipped or dual-clipped
    expected_grad = torch.tensor([-1.1, 0.0, 0.0, 1.5, 0.0, -1.0])
    assert torch.allclose(log_probs.grad, expected_grad, atol=1e-6)


def test_without_dual_clip_negative_advantage_is_unbounded():
    advantages, log_ratio = _ppo_case_tensors()
    terms = ppo_clip_token_losses(log_ratio, torch.zeros_like(log_ratio), advantages, 0.2, 0.28)
    assert float(terms.losses[4]) == pytest.approx(8.0)
    assert not terms.is_dual_clipped.any()


def test_symmetric_clip_differs_from_clip_higher():
    terms = ppo_clip_token_losses(torch.tensor([math.log(1.5)]), torch.zeros(1), torch.ones(1), 0.2, 0.2)
    assert float(terms.losses[0]) == pytest.approx(-1.2)


def test_huge_log_ratio_keeps_gradients_finite():
    log_probs = torch.tensor([200.0, -200.0], requires_grad=True)
    terms = ppo_clip_token_losses(log_probs, torch.zeros(2), torch.tensor([-1.0, 1.0]), 0.2, 0.2, dual_clip=3.0)
    terms.losses.sum().backward()
    assert torch.isfinite(terms.losses).all() and torch.isfinite(log_probs.grad).all()


def test_truncated_is_weights_by_hand():
    old_log_probs = torch.tensor([math.log(3.0), math.log(0.5), 0.0])
    rollout_log_probs = torch.zeros(3, requires_grad=True)
    weights = truncated_is_weights(old_log_probs, rollout_log_probs, cap=2.0)
    assert torch.allclose(weights, torch.tensor([2.0, 0.5, 1.0]))
    assert not weights.requires_grad


def test_entropy_from_logits_by_hand():
    logits = torch.tensor([[0.0, 0.0], [0.0, math.log(3.0)]])
    expected = torch.tensor([math.log(2.0), -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))])
    assert torch.allclose(entropy_from_logits(logits), expected, atol=1e-6)


def _composite_inputs(**overrides) -> PolicyLossInputs:
    """Two sequences: [A=1, A=2, pad], [A=-1, pad, pad]; log_probs = old_log_probs, so every ratio is 1."""
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    old_log_probs = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]])
    fields = dict(
        log_probs=old_log_probs.clone().requires_grad_(True),
        old_log_probs=old_log_probs,
        advantages=torch.tensor([[1.0, 2.0, 9.0], [-1.0, 9.0, 9.0]]),
        mask=mask,
        ref_log_probs=old_log_probs - torch.tensor([[0.2, -0.4, 0.0], [0.6, 0.0, 0.0]]),  # r = [.2, -.4], [.6]
        entropy=torch.tensor([[0.5, 1.0, 0.0], [2.0, 0.0, 0.0]]),
    )
    fields.update(overrides)
    return PolicyLossInputs(**fields)


@pytest.mark.parametrize(
    ("mode", "expected_pg"),
    [
        ("token_mean", (-1 - 2 + 1) / 3),
        ("seq_mean_token_mean", ((-1 - 2) / 2 + 1) / 2),
        ("seq_mean_token_sum", ((-1 - 2) + 1) / 2),
    ],
)
def test_policy_loss_aggregation_modes_by_hand(mode, expected_pg):
    config = AlgorithmConfig(loss_agg_mode=mode, kl_coef=0.0)
    loss, metrics = policy_loss(_composite_inputs(), config)
    assert loss.item() == pytest.approx(expected_pg, abs=1e-6)
    # mean ratio 1 per token, or per sequence; summed per sequence: (2 + 1) / 2
    expected_ratio = {"token_mean": 1.0, "seq_mean_token_mean": 1.0, "seq_mean_token_sum": 1.5}[mode]
    assert metrics.ratio.item() == pytest.approx(expected_ratio)
    assert float(metrics.clip_frac) == 0.0 and float(metrics.approx_kl) == pytest.approx(0.0, abs=1e-7)


def test_policy_loss_with_kl_loss_and_entropy_bonus_by_hand():
    config = AlgorithmConfig(kl_coef=0.5, use_kl_loss=True, kl_estimator="k2", entropy_coef=0.1)
    loss, metrics = policy_loss(_composite_inputs(), config)
    pg = (-1 - 2 + 1) / 3
    kl = (0.5 * 0.2**2 + 0.5 * 0.4**2 + 0.5 * 0.6**2) / 3  # k2 = r^2 / 2, token mean
    entropy = (0.5 + 1.0 + 2.0) / 3
    assert loss.item() == pytest.approx(pg + 0.5 * kl - 0.1 * entropy, abs=1e-6)
    assert float(metrics.kl_loss) == pytest.approx(kl, abs=1e-6)
    assert float(metrics.entropy) == pytest.approx(entropy, abs=1e-6)
    assert metrics.tis_weight is None and metrics.dual_clip_frac is None
    # an adaptive controller's coefficient overrides config.kl_coef
    loss_coef_2, _ = policy_loss(_composite_inputs(), config, kl_coef=2.0)
    assert loss_coef_2.item() == pytest.approx(pg + 2.0 * kl - 0.1 * entropy, abs=1e-6)


def test_policy_loss_entropy_gradient_is_the_bonus():
    entropy = torch.tensor([[0.5, 1.0, 0.0], [2.0, 0.0, 0.0]], requires_grad=True)
    config = AlgorithmConfig(kl_coef=0.0, entropy_coef=0.3)
    loss, _ = policy_loss(_composite_inputs(entropy=entropy), config)
    loss.backward()
    assert torch.allclose(entropy.grad, torch.tensor([[-0.1, -0.1, 0.0], [-0.1, 0.0, 0.0]]))


def test_policy_loss_with_truncated_importance_sampling_by_hand():
    config = AlgorithmConfig(kl_coef=0.0, tis_cap=2.0)
    old_log_probs = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]])
    # pi_old / pi_rollout = [3, 0.5], [1] -> weights [2 (capped), 0.5], [1]
    rollout = old_log_probs - torch.tensor([[math.log(3.0), math.log(0.5), 0.0], [0.0, 0.0, 0.0]])
    loss, metrics = policy_loss(_composite_inputs(rollout_log_probs=rollout), config)
    assert loss.item() == pytest.approx((2 * -1 + 0.5 * -2 + 1 * 1) / 3, abs=1e-6)
    assert float(metrics.tis_weight) == pytest.approx((2 + 0.5 + 1) / 3, abs=1e-6)
    assert float(metrics.tis_clip_frac) == pytest.approx(1 / 3)


def test_policy_loss_metrics_on_the_hand_cases():
    advantages, log_ratio = _ppo_case_tensors()
    config = AlgorithmConfig(kl_coef=0.0, eps_clip_low=0.2, eps_clip_high=0.28, dual_clip=3.0)
    inputs = PolicyLossInputs(
        log_probs=log_ratio[None, :],
        old_log_probs=torch.zeros(1, 6),
        advantages=advantages[None, :],
        mask=torch.ones(1, 6),
    )
    loss, metrics = policy_loss(inputs, config)
    assert loss.item() == pytest.approx(sum(case[2] for case in PPO_CASES) / 6, abs=1e-6)
    assert float(metrics.clip_frac) == pytest.approx(2 / 6)
    assert float(metrics.dual_clip_frac) == pytest.approx(1 / 6)
    ratios = [case[1] for case in PPO_CASES]
    assert float(metrics.approx_kl) == pytest.approx(sum(r - 1 - math.log(r) for r in ratios) / 6, abs=1e-6)


@pytest.mark.parametrize("kl_clamp", [10.0, None])
def test_policy_loss_ignores_garbage_in_masked_positions(kl_clamp):
    config = AlgorithmConfig(
        kl_coef=0.5,
        use_kl_loss=True,
        kl_estimator="k3",
        kl_clamp=kl_clamp,
        entropy_coef=0.1,
        tis_cap=2.0,
        dual_clip=3.0,
    )
    generator = torch.Generator().manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    base = {name: torch.randn(3, 5, generator=generator) * 0.3 for name in ("lp", "old", "adv", "roll", "ref", "ent")}

    def run(garbage: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        dirty = {name: torch.where(mask, value, garbage) for name, value in base.items()}
        log_probs = dirty["lp"].clone().requires_grad_(True)
        inputs = PolicyLossInputs(
            log_probs=log_probs, old_log_probs=dirty["old"], advantages=dirty["adv"], mask=mask,
            rollout_log_probs=dirty["roll"], ref_log_probs=dirty["ref"], entropy=dirty["ent"],
        )
        loss, metrics = policy_loss(inputs, config)
        loss.backward()
        return loss, metrics.approx_kl, log_probs.grad

    reference = run(0.0)
    for garbage in (float("nan"), float("inf"), -1e30, 50.0):
        loss, approx_kl, grad = run(garbage)
        assert torch.equal(loss, reference[0]) and torch.equal(approx_kl, reference[1]), garbage
        assert torch.equal(grad, reference[2]), garbage
        assert not grad[~mask].any()  # padded tokens get exactly zero gradient


def test_policy_loss_missing_inputs_are_named_errors():
    with pytest.raises(ValueError, match="tis_cap"):
        policy_loss(_composite_inputs(), AlgorithmConfig(kl_coef=0.0, tis_cap=2.0))
    with pytest.raises(ValueError, match="ref_log_probs"):
        policy_loss(_composite_inputs(ref_log_probs=None), AlgorithmConfig(kl_coef=0.1, use_kl_loss=True))
    with pytest.raises(ValueError, match="entropy"):
        policy_loss(_composite_inputs(entropy=None), AlgorithmConfig(kl_coef=0.0, entropy_coef=0.1))
    with pytest.raises(ValueError, match="advantages must have the mask's shape"):
        policy_loss(_composite_inputs(advantages=torch.zeros(2, 2)), AlgorithmConfig(kl_coef=0.0))


def test_value_loss_by_hand():
    # (V, V_old, R): 0.5 * max((V - R)^2, (V_old + clip(V - V_old, -0.5, 0.5) - R)^2)
    values = torch.tensor([[1.0, 2.0, 2.0, 123.0]], requires_grad=True)
    old_values = torch.tensor([[0.8, 1.0, 1.0, float("nan")]])
    returns = torch.tensor([[1.5, 0.5, 3.0, float("inf")]])
    mask = torch.tensor([[1, 1, 1, 0]])
    # token 0: 0.5 * max(0.25, 0.25) = 0.125; token 1: 0.5 * max(2.25, 1.0) = 1.125;
    # token 2: V_clip = 1.5, 0.5 * max(1.0, 2.25) = 1.125 (clipped)
    loss, metrics = value_loss(values, old_values, returns, mask, value_clip=0.5, loss_agg_mode="token_mean")
    assert loss.item() == pytest.approx((0.125 + 1.125 + 1.125) / 3)
    assert float(metrics.clip_frac) == pytest.approx(1 / 3)
    assert float(metrics.value_mean) == pytest.approx(5 / 3)
    loss.backward()
    # gradient (V - R) / 3 where unclipped, 0 on the clipped token and the padding
    assert torch.allclose(values.grad, torch.tensor([[-0.5 / 3, 1.5 / 3, 0.0, 0.0]]))
    unclipped, _ = value_loss(values, old_values, returns, mask, value_clip=None, loss_agg_mode="token_mean")
    assert unclipped.item() == pytest.approx(0.5 * (0.25 + 2.25 + 1.0) / 3)

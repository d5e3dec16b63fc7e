"""Loss aggregation: hand cases, and the equality that matters in training: the sum of every micro-batch's loss
over every data-parallel rank, each normalised by the global count, equals the loss of the whole global batch."""

from dataclasses import dataclass, fields

import pytest
import torch

from lmmrl_megatron.algorithms.aggregation import aggregate, aggregation_count, global_aggregation_count
from lmmrl_megatron.algorithms.config import AlgorithmConfig
from lmmrl_megatron.algorithms.losses import PolicyLossInputs, policy_loss, value_loss
from lmmrl_megatron.algorithms.metrics import sum_metric_shares
from lmmrl_megatron.algorithms.packing import padded_to_packed

MODES = ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm"]


def test_aggregate_by_hand():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, float("nan"), -7.0], [float("inf"), 5.0, 5.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])  # the last row is all padding
    assert aggregate(values, mask, "token_mean").item() == pytest.approx((1 + 2 + 3 + 4) / 4)
    assert aggregate(values, mask, "seq_mean_token_mean").item() == pytest.approx((6 / 3 + 4 / 1) / 2)
    assert aggregate(values, mask, "seq_mean_token_sum").item() == pytest.approx((6 + 4) / 2)
    assert aggregation_count(mask, "token_mean").item() == 4
    assert aggregation_count(mask, "seq_mean_token_sum").item() == 2  # the empty row does not count
    assert aggregate(values, mask, "token_mean", normaliser=8).item() == pytest.approx(10 / 8)


def test_seq_mean_token_sum_norm_divides_by_a_constant_length():
    """Dr. GRPO's normaliser: (6 + 4) / (2 sequences * L), whatever the lengths of the responses."""
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, float("nan"), -7.0], [float("inf"), 5.0, 5.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    mode = "seq_mean_token_sum_norm"
    assert aggregation_count(mask, mode, max_response_length=8).item() == 2 * 8
    normaliser = global_aggregation_count([mask[:1], mask[1:]], mode, max_response_length=8)
    assert normaliser.item() == 16
    shares = [aggregate(values[:1], mask[:1], mode, normaliser), aggregate(values[1:], mask[1:], mode, normaliser)]
    assert [s.item() for s in shares] == pytest.approx([6 / 16, 4 / 16])
    # the same sum as seq_mean_token_sum ((6 + 4) / 2 = 5), scaled by 1 / L
    seq_mean_token_sum = aggregate(values, mask, "seq_mean_token_sum").item()
    assert aggregate(values, mask, mode, normaliser).item() == pytest.approx(seq_mean_token_sum / 8)
    # without a length, verl's: the padded width (3 here)
    assert aggregate(values, mask, mode).item() == pytest.approx(10 / (2 * 3))
    packed, packed_mask, cu_seqlens = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.ones(4), torch.tensor([0, 3, 4])
    assert aggregation_count(packed_mask, mode, cu_seqlens, max_response_length=8).item() == 16
    assert aggregate(packed, packed_mask, mode, 16, cu_seqlens).item() == pytest.approx(10 / 16)
    with pytest.raises(ValueError, match="packed inputs needs max_response_length"):
        aggregation_count(packed_mask, mode, cu_seqlens)


def test_packed_matches_padded_by_hand():
    packed = torch.tensor([1.0, 2.0, 3.0, 4.0, float("nan")])
    mask = torch.tensor([1, 1, 1, 1, 0])
    cu_seqlens = torch.tensor([0, 3, 5])  # [1, 2, 3], [4, pad]
    assert aggregate(packed, mask, "seq_mean_token_mean", cu_seqlens=cu_seqlens).item() == pytest.approx((2 + 4) / 2)
    assert aggregate(packed, mask, "seq_mean_token_sum", cu_seqlens=cu_seqlens).item() == pytest.approx(5.0)


def test_bad_normaliser_and_mode_are_errors():
    with pytest.raises(ValueError, match="normaliser must be > 0"):
        aggregate(torch.ones(2, 2), torch.ones(2, 2), "token_mean", normaliser=0)
    with pytest.raises(ValueError, match="unknown loss_agg_mode"):
        aggregate(torch.ones(2, 2), torch.ones(2, 2), "seq_sum")  # type: ignore[arg-type]


@dataclass
class _Batch:
    log_probs: torch.Tensor
    old_log_probs: torch.Tensor
    advantages: torch.Tensor
    rollout_log_probs: torch.Tensor
    ref_log_probs: torch.Tensor
    entropy: torch.Tensor
    values: torch.Tensor
    old_values: torch.Tensor
    returns: torch.Tensor
    mask: torch.Tensor


def _global_batch(seed: int = 0, num_seqs: int = 10, seq_len: int = 12) -> _Batch:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, seq_len + 1, (num_seqs,), generator=generator)
    lengths[4] = 0  # an all-padding row somewhere in the batch
    mask = torch.arange(seq_len)[None, :] < lengths[:, None]
    mask[1, 0] = False  # and a hole at the start of one response (e.g. a masked tool output)

    def rand(scale: float) -> torch.Tensor:
        return torch.randn(num_seqs, seq_len, generator=generator) * scale

    old_log_probs = rand(0.5) - 1.0
    return _Batch(
        log_probs=old_log_probs + rand(0.3),  # ratios far enough from 1 for clipping to happen
        old_log_probs=old_log_probs,
        advantages=rand(1.0),
        rollout_log_probs=old_log_probs + rand(0.5),
        ref_log_probs=old_log_probs + rand(0.2),
        entropy=rand(0.5).abs(),
        values=rand(1.0),
        old_values=rand(1.0),
        returns=rand(1.0),
        mask=mask,
    )


def _rows(batch: _Batch, rows: list[int]) -> _Batch:
    """A micro-batch of the given rows, trimmed to its own longest sequence (so shapes differ between them)."""
    used_columns = batch.mask[rows].any(dim=0).nonzero()
    width = int(used_columns.max()) + 1 if used_columns.numel() else 1
    picked = {field.name: getattr(batch, field.name)[rows, :width].clone() for field in fields(batch)}
    return _Batch(**picked)


def _pack(batch: _Batch) -> tuple[_Batch, torch.Tensor]:
    """Pack the valid tokens of each sequence back to back (Megatron THD layout)."""
    full_rows = torch.ones_like(batch.mask)  # keep every position, so a packed micro-batch still holds its holes
    packed = {field.name: padded_to_packed(getattr(batch, field.name), full_rows)[0] for field in fields(batch)}
    _, cu_seqlens = padded_to_packed(batch.mask, full_rows)
    return _Batch(**packed), cu_seqlens


# Two data-parallel ranks with different token counts, each accumulating over unequal micro-batches.
SPLIT = [[[0, 1, 2], [3, 4, 5]], [[6], [7, 8, 9]]]
CONFIG = dict(kl_coef=0.3, use_kl_loss=True, kl_estimator="k3", entropy_coef=0.01, tis_cap=1.5, dual_clip=3.0)


def _policy(batch: _Batch, config: AlgorithmConfig, normaliser, cu_seqlens=None):
    log_probs = batch.log_probs.clone().requires_grad_(True)
    inputs = PolicyLossInputs(
        log_probs=log_probs,
        old_log_probs=batch.old_log_probs,
        advantages=batch.advantages,
        mask=batch.mask,
        rollout_log_probs=batch.rollout_log_probs,
        ref_log_probs=batch.ref_log_probs,
        entropy=batch.entropy,
        cu_seqlens=cu_seqlens,
    )
    loss, metrics = policy_loss(inputs, config, normaliser=normaliser)
    loss.backward()
    return loss.detach(), metrics, log_probs.grad


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("mode", MODES)
def test_micro_batches_over_ranks_sum_to_the_global_loss(mode, packed):
    config = AlgorithmConfig(loss_agg_mode=mode, **CONFIG)
    batch = _global_batch()
    whole_loss, whole_metrics, whole_grad = _policy(batch, config, normaliser=None)
    assert whole_metrics.clip_frac > 0 and whole_metrics.tis_clip_frac > 0  # the features are really exercised

    rows_per_micro_batch = [rows for rank in SPLIT for rows in rank]
    micro_batches = [_rows(batch, rows) for rows in rows_per_micro_batch]
    layouts = [_pack(micro) if packed else (micro, None) for micro in micro_batches]
    # What each rank would all-reduce: the count of its own micro-batches, summed over ranks.
    length = batch.mask.shape[-1]  # seq_mean_token_sum_norm's constant: what the whole batch falls back to
    normaliser = global_aggregation_count(
        [m.mask for m, _ in layouts], mode, [cu for _, cu in layouts], max_response_length=length
    )
    assert normaliser == aggregation_count(batch.mask, mode)

    losses, shares = [], []
    for (micro, cu_seqlens), padded_micro, rows in zip(layouts, micro_batches, rows_per_micro_batch):
        loss, metrics, grad = _policy(micro, config, normaliser, cu_seqlens)
        losses.append(loss)
        shares.append(metrics)
        # each token's gradient is the same as in the global batch
        expected_grad = whole_grad[rows, : padded_micro.mask.shape[-1]]
        assert torch.allclose(grad, expected_grad.flatten() if packed else expected_grad, atol=1e-7)
    assert torch.allclose(torch.stack(losses).sum(), whole_loss, atol=1e-6)
    summed = sum_metric_shares(shares)
    for field in fields(summed):
        assert torch.allclose(getattr(summed, field.name), getattr(whole_metrics, field.name), atol=1e-6), field.name


@pytest.mark.parametrize("mode", MODES)
def test_value_loss_micro_batches_sum_to_the_global_loss(mode):
    batch = _global_batch(seed=1)
    whole, whole_metrics = value_loss(batch.values, batch.old_values, batch.returns, batch.mask, 0.2, mode)
    micro_batches = [_rows(batch, rows) for rank in SPLIT for rows in rank]
    normaliser = global_aggregation_count([m.mask for m in micro_batches], mode, max_response_length=batch.mask.shape[-1])
    results = [value_loss(m.values, m.old_values, m.returns, m.mask, 0.2, mode, normaliser) for m in micro_batches]
    assert torch.allclose(sum(loss for loss, _ in results), whole, atol=1e-6)
    assert torch.allclose(sum_metric_shares([m for _, m in results]).clip_frac, whole_metrics.clip_frac, atol=1e-6)


def test_per_micro_batch_normalisation_would_be_wrong():
    """The equality above is not automatic: each micro-batch normalised by its own count gives another loss."""
    config = AlgorithmConfig(loss_agg_mode="token_mean", **CONFIG)
    batch = _global_batch()
    whole_loss, _, _ = _policy(batch, config, normaliser=None)
    local = [_policy(_rows(batch, rows), config, normaliser=None)[0] for rank in SPLIT for rows in rank]
    assert not torch.allclose(torch.stack(local).mean(), whole_loss, atol=1e-3)

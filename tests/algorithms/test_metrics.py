import pytest
import torch

from lmmrl_megatron.algorithms.advantages import AdvantageOutput
from lmmrl_megatron.algorithms.losses import PolicyLossMetrics
from lmmrl_megatron.algorithms.metrics import advantage_metrics, masked_stats, metrics_to_dict, sum_metric_shares


def test_masked_stats_by_hand():
    stats = masked_stats(torch.tensor([[1.0, 3.0, float("nan")]]), torch.tensor([[1, 1, 0]]))
    assert (stats.mean.item(), stats.std.item(), stats.min.item(), stats.max.item()) == (2.0, 1.0, 1.0, 3.0)
    empty = masked_stats(torch.ones(2, 2), torch.zeros(2, 2))
    assert empty.mean.item() == 0.0 and empty.max.item() == 0.0


def test_advantage_metrics_flatten_for_logging():
    output = AdvantageOutput(
        advantages=torch.tensor([[1.0, -1.0], [0.5, 0.0]]),
        returns=torch.tensor([[2.0, 2.0], [4.0, 0.0]]),
        shaped_scores=torch.tensor([1.0, -1.0]),
    )
    flat = metrics_to_dict(advantage_metrics(output, torch.tensor([[1, 1], [1, 0]])), "train")
    assert flat["train/advantages/mean"] == pytest.approx(0.5 / 3)
    assert flat["train/returns/max"] == 4.0
    assert flat["train/scores/min"] == -1.0
    assert len(flat) == 12


def _share(value: float, with_entropy: bool = True) -> PolicyLossMetrics:
    tensor = torch.tensor(value)
    return PolicyLossMetrics(
        pg_loss=tensor, clip_frac=tensor, approx_kl=tensor, ratio=tensor, entropy=tensor if with_entropy else None
    )


def test_sum_metric_shares_adds_fields_and_keeps_none():
    total = sum_metric_shares([_share(0.25), _share(0.5)])
    assert total.clip_frac.item() == 0.75 and total.entropy.item() == 0.75 and total.kl_loss is None
    flat = metrics_to_dict(total, "policy")
    assert "policy/kl_loss" not in flat and flat["policy/pg_loss"] == 0.75
    with pytest.raises(AssertionError, match="None in some micro-batches"):
        sum_metric_shares([_share(0.25), _share(0.5, with_entropy=False)])
    with pytest.raises(ValueError, match="at least one"):
        sum_metric_shares([])

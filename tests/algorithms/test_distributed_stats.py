"""Statistics shared over real data-parallel ranks (2 gloo processes): REINFORCE++ whitening and the loss
normaliser computed on shards with different token counts equal the single-process results on the whole batch."""

from __future__ import annotations

import torch

from lmmrl_megatron.algorithms.advantages import AdvantageInputs, compute_advantages
from lmmrl_megatron.algorithms.aggregation import global_aggregation_count
from lmmrl_megatron.algorithms.config import AlgorithmConfig
from lmmrl_megatron.parallel.local_ranks import run_distributed

CONFIG = AlgorithmConfig(advantage_estimator="reinforce_baseline", gamma=0.9)
SHARDS = [slice(0, 2), slice(2, 8)]  # rank 0: one prompt, rank 1: three prompts (different token counts)


def _global_inputs() -> AdvantageInputs:
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 9, (8,), generator=generator)
    mask = torch.arange(8)[None, :] < lengths[:, None]
    return AdvantageInputs(
        scores=torch.randint(0, 2, (8,), generator=generator).float(),
        mask=mask,
        kl_rewards=-0.05 * torch.rand(8, 8, generator=generator),
    )


def _advantages_on_rank() -> tuple[torch.Tensor, torch.Tensor]:
    rank = torch.distributed.get_rank()
    whole = _global_inputs()
    shard = AdvantageInputs(
        scores=whole.scores[SHARDS[rank]], mask=whole.mask[SHARDS[rank]], kl_rewards=whole.kl_rewards[SHARDS[rank]]
    )
    group = torch.distributed.group.WORLD
    output = compute_advantages(CONFIG, shard, 2, process_group=group)
    normaliser = global_aggregation_count([shard.mask], "token_mean", process_group=group)
    return output.advantages, normaliser


def test_whitening_over_ranks_equals_whole_batch():
    per_rank = run_distributed(_advantages_on_rank, world_size=2)
    whole = _global_inputs()
    expected = compute_advantages(CONFIG, whole, 2).advantages
    assert torch.allclose(torch.cat([advantages for advantages, _ in per_rank]), expected, atol=1e-6)
    # rank-local whitening would differ: the shared statistics are what makes them equal
    local = compute_advantages(CONFIG, AdvantageInputs(whole.scores[:2], whole.mask[:2], whole.kl_rewards[:2]), 2)
    assert not torch.allclose(local.advantages, expected[:2], atol=1e-3)
    for _, normaliser in per_rank:
        assert normaliser.item() == int(whole.mask.sum())

"""The learning-rate schedule against values worked out by hand, and how it reaches the optimizer."""

import math

import pytest
import torch

from lmmrl_megatron.config.sections import OptimizerConfig
from lmmrl_megatron.learner.lr_schedule import learning_rate, set_optimizer_hyperparams


def test_cosine_with_warmup_by_hand():
    # lr 1e-3, warmup 2 steps, cosine to 1e-4 over the 6 - 2 = 4 steps after it
    config = OptimizerConfig(lr=1e-3, lr_scheduler="cosine", min_lr=1e-4, lr_warmup_steps=2)
    expected = [
        0.5e-3,  # step 0: 1e-3 * 1/2 (the first update is not wasted at 0)
        1.0e-3,  # step 1: 1e-3 * 2/2
        1.0e-3,  # step 2: progress 0, cos(0) = 1
        1e-4 + 9e-4 * (1 + math.cos(math.pi / 4)) / 2,  # step 3: progress 1/4 -> 8.682e-4
        1e-4 + 9e-4 * 0.5,  # step 4: progress 1/2 -> 5.5e-4
        1e-4 + 9e-4 * (1 + math.cos(3 * math.pi / 4)) / 2,  # step 5: progress 3/4 -> 2.318e-4
    ]
    got = [learning_rate(config, step, total_steps=6) for step in range(6)]
    assert got == pytest.approx(expected, rel=1e-12)
    assert got[3] == pytest.approx(8.6820e-4, rel=1e-4) and got[5] == pytest.approx(2.3180e-4, rel=1e-4)
    assert learning_rate(config, 6, total_steps=6) == pytest.approx(1e-4)  # reached after the last update
    assert learning_rate(config, 50, total_steps=6) == pytest.approx(1e-4)  # and held


def test_constant_with_and_without_warmup():
    assert [learning_rate(OptimizerConfig(lr=2e-6, lr_warmup_steps=4), s, 10) for s in range(6)] == pytest.approx(
        [0.5e-6, 1e-6, 1.5e-6, 2e-6, 2e-6, 2e-6]
    )
    assert {learning_rate(OptimizerConfig(lr=2e-6), s, 10) for s in range(10)} == {2e-6}
    # cosine without warmup starts at lr
    assert learning_rate(OptimizerConfig(lr=1.0, lr_scheduler="cosine"), 0, 4) == 1.0
    assert learning_rate(OptimizerConfig(lr=1.0, lr_scheduler="cosine"), 2, 4) == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"min_lr": 1e-7}, "no effect with lr_scheduler 'constant'"),
        ({"lr_scheduler": "cosine", "min_lr": 1e-3}, r"min_lr must be in \[0, lr"),
        ({"lr_warmup_steps": -1}, "lr_warmup_steps must be >= 0"),
        ({"lr_scheduler": "linear"}, "lr_scheduler must be 'constant' or 'cosine'"),
    ],
)
def test_schedule_fields_are_checked(fields, message):
    with pytest.raises(ValueError, match=message):
        OptimizerConfig(lr=1e-6, **fields)


def test_hyperparams_reach_every_group_with_megatrons_multipliers():
    params = [torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))]
    optimizer = torch.optim.Adam(
        [{"params": [params[0]], "wd_mult": 1.0}, {"params": [params[1]], "wd_mult": 0.0}], lr=1.0, weight_decay=0.1
    )
    set_optimizer_hyperparams(optimizer, lr=3e-4, weight_decay=0.1)
    assert [g["lr"] for g in optimizer.param_groups] == [3e-4, 3e-4]
    # biases and norms (wd_mult 0 in Megatron's groups) get no decay; the Adam constructor had given them 0.1
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]

"""The learning-rate schedule: linear warmup, then constant or a cosine to `min_lr`, counted in RL steps.

For the optimizer steps of RL step `s` (0-based: `s` steps are complete), with `W = lr_warmup_steps` and
`T = trainer.max_steps`:

    s < W                   lr * (s + 1) / W                                    (the first update is not wasted at 0)
    constant, s >= W        lr
    cosine,   s >= W        min_lr + (lr - min_lr) * (1 + cos(pi * (s - W) / (T - W))) / 2

so the cosine starts at `lr` right after warmup and would reach `min_lr` at step T, after the last update. Every
optimizer step of an RL step (mini-batches, PPO epochs) uses that step's rate, as verl steps its scheduler once per
RL step: how many optimizer steps an RL step takes can change (`filter_uniform_groups`), the run's RL steps cannot.

The schedule is a function of the step alone, so its state is the step, which `trainer_state.pt` checkpoints; a
resumed run continues the curve exactly (resuming with another `trainer.max_steps` stretches the cosine).
"""

from __future__ import annotations

import math
from typing import Any

from lmmrl_megatron.config.sections import OptimizerConfig


def learning_rate(config: OptimizerConfig, step: int, total_steps: int) -> float:
    """The learning rate of RL step `step` (0-based) in a run of `total_steps` steps."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    warmup = config.lr_warmup_steps
    if step < warmup:
        return config.lr * (step + 1) / warmup
    if config.lr_scheduler == "constant":
        return config.lr
    if config.lr_scheduler != "cosine":
        raise ValueError(f"unknown lr_scheduler {config.lr_scheduler!r}")
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return config.min_lr + (config.lr - config.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_optimizer_hyperparams(optimizer: Any, lr: float, weight_decay: float) -> None:
    """Put `lr` and the configured weight decay into every parameter group of a Megatron optimizer.

    What Megatron-Core's own `OptimizerParamScheduler.step` does: the groups Megatron makes for biases and norms
    carry `wd_mult = 0`, which only such a step applies (the Adam constructor gives every group the same decay)."""
    for group in optimizer.param_groups:
        if hasattr(group.get("lr"), "fill_"):  # tensor learning rates (CUDA-graph-capturable optimizers)
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr
        group["weight_decay"] = weight_decay * group.get("wd_mult", 1.0)

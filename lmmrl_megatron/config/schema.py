"""The one run configuration: every section of a run, read by the CLI, the scripts and the Ray workers.

Each section checks its own fields when it is built; `config.validate.validate_run_config` checks what spans
sections or needs the file system, and the trainer runs it before it starts any worker.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lmmrl_megatron.algorithms.config import AlgorithmConfig
from lmmrl_megatron.config.sections import (
    CheckpointConfig,
    LoggingConfig,
    ModelConfig,
    ParallelConfig,
    RolloutConfig,
    TrainerConfig,
)
from lmmrl_megatron.data.config import DataConfig
from lmmrl_megatron.config.eval import EvalConfig
from lmmrl_megatron.reward.config import RewardConfig


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        self.algorithm.check_samples_per_prompt(self.rollout.n_samples_per_prompt)
        model_parallel = self.parallel.layout.model_parallel_size
        if self.trainer.actor_world_size % model_parallel != 0:
            raise ValueError(
                f"trainer.actor_world_size={self.trainer.actor_world_size} is not a multiple of "
                f"parallel.tp * parallel.pp = {model_parallel}"
            )

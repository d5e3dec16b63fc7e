"""The one run configuration: every section of a run, read by the CLI, the scripts and the Ray workers."""

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

    def __post_init__(self) -> None:
        self.algorithm.check_samples_per_prompt(self.rollout.n_samples_per_prompt)
        rollout, trainer = self.rollout, self.trainer
        if trainer.colocate_all_models and rollout.num_engines * rollout.engine_tp > trainer.actor_world_size:
            raise ValueError(
                f"colocated rollout engines need rollout.num_engines x rollout.engine_tp = "
                f"{rollout.num_engines * rollout.engine_tp} <= trainer.actor_world_size = {trainer.actor_world_size} GPUs"
            )
        if rollout.weight_transport == "cuda_ipc" and not (trainer.num_gpus_per_node > 0 and trainer.colocate_all_models):
            raise ValueError("rollout.weight_transport=cuda_ipc needs GPUs and trainer.colocate_all_models=true")
        model_parallel = self.parallel.tp * self.parallel.pp
        if self.trainer.actor_world_size % model_parallel != 0:
            raise ValueError(
                f"trainer.actor_world_size={self.trainer.actor_world_size} is not a multiple of "
                f"parallel.tp * parallel.pp = {model_parallel}"
            )

"""Configuration sections owned by the trainer itself: model, parallelism, rollout, trainer, logging, checkpoint.

The algorithm, data and reward sections live beside their code (`algorithms/config.py`, `data/config.py`,
`reward/config.py`); `schema.RunConfig` composes them all into the one schema the CLI, scripts and workers read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from lmmrl_megatron.parallel.layout import ShardLayout


@dataclass
class ModelConfig:
    """Which checkpoint to train and how to build the Megatron model from it."""

    pretrain: str = ""  # a Hugging Face Qwen2-VL / Qwen2.5-VL directory
    dtype: Literal["fp32", "bf16", "fp16"] = "bf16"
    transformer_impl: Literal["local", "transformer_engine"] = "local"
    recompute: Literal["none", "selective", "full"] = "none"
    freeze_vision: bool = False
    # Replay the decoder's training forward/backward from CUDA graphs, one per micro-batch shape (GPU only;
    # models/decoder_graphs.py). Costs resident memory: the planner counts it.
    cuda_graphs: bool = False


@dataclass
class ParallelConfig:
    """Megatron layout of each trained model, as the YAML spells it (`layout` is the one type the code uses); data
    parallel size is what the world size leaves."""

    tp: int = 1
    pp: int = 1
    vpp: int | None = None
    sequence_parallel: bool = False
    num_layers_in_first_pipeline_stage: int | None = None
    num_layers_in_last_pipeline_stage: int | None = None

    @property
    def layout(self) -> ShardLayout:
        return ShardLayout(
            tp=self.tp,
            pp=self.pp,
            vpp=self.vpp,
            sequence_parallel=self.sequence_parallel,
            num_layers_in_first_pipeline_stage=self.num_layers_in_first_pipeline_stage,
            num_layers_in_last_pipeline_stage=self.num_layers_in_last_pipeline_stage,
        )

    def __post_init__(self) -> None:
        try:
            self.layout  # noqa: B018 - building the layout is its validation
        except ValueError as exc:
            raise ValueError(f"parallel.{exc}") from None


@dataclass
class RolloutConfig:
    """Generation: which engine, how many, and how it samples."""

    backend: Literal["hf", "vllm"] = "hf"
    num_engines: int = 1
    engine_tp: int = 1  # GPUs per engine (vLLM tensor parallelism)
    rollout_batch_size: int = 8  # prompts per RL step
    n_samples_per_prompt: int = 4  # responses per prompt: the group of the group estimators
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    gpu_memory_utilization: float = 0.6  # vLLM: share of each engine GPU for weights + KV cache
    max_model_len: int | None = None  # vLLM: longest prompt + response; None takes the model's
    enable_prefix_caching: bool = True  # vLLM: the n samples of a prompt share its prefill
    enforce_eager: bool = False  # vLLM: no CUDA graphs (faster start, slower decode)
    # Colocated engines free their GPU memory between generation and the next sync: vLLM sleep level 2 discards
    # the weights (every sync rewrites all of them); level 1 copies them to the host.
    enable_sleep: bool = True
    sleep_level: Literal[1, 2] = 2
    # How weights reach the engines: cuda_ipc (colocated GPUs: engines open the trainer's bucket buffers in
    # place), broadcast (engines on devices of their own: NCCL, or gloo on CPU, from the sending rank),
    # object_store (through Ray, via the host); auto: cuda_ipc colocated on GPUs, broadcast separate on GPUs,
    # object_store on CPU.
    weight_transport: Literal["auto", "cuda_ipc", "broadcast", "object_store"] = "auto"
    # Size of the export's buckets. Each sync is about one round trip per bucket; with cuda_ipc every trainer GPU
    # keeps two buffers of the largest bucket for the run (a tensor larger than this travels alone).
    weight_sync_bucket_mb: int = 1024

    def __post_init__(self) -> None:
        for name in ("num_engines", "engine_tp", "rollout_batch_size", "n_samples_per_prompt", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"rollout.{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"rollout.top_p must be in (0, 1], got {self.top_p}")
        if self.temperature < 0:
            raise ValueError(f"rollout.temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"rollout.gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")


LRScheduler = Literal["constant", "cosine"]


@dataclass
class OptimizerConfig:
    """Adam and its learning-rate schedule, counted in RL steps (`learner/lr_schedule.py` has the formulas):
    `lr_warmup_steps` steps of linear warmup to `lr`, then `lr` (`constant`) or a cosine down to `min_lr` at
    `trainer.max_steps` (`cosine`)."""

    lr: float = 1e-6
    lr_scheduler: LRScheduler = "constant"
    min_lr: float = 0.0  # where `cosine` ends; must stay 0 with `constant`
    lr_warmup_steps: int = 0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    clip_grad: float = 1.0
    use_distributed_optimizer: bool = True

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.lr_scheduler not in ("constant", "cosine"):
            raise ValueError(f"lr_scheduler must be 'constant' or 'cosine', got {self.lr_scheduler!r}")
        if not 0.0 <= self.min_lr <= self.lr:
            raise ValueError(f"min_lr must be in [0, lr={self.lr}], got {self.min_lr}")
        if self.min_lr > 0 and self.lr_scheduler == "constant":
            raise ValueError(f"min_lr={self.min_lr} has no effect with lr_scheduler 'constant' (set lr_scheduler: cosine)")
        if self.lr_warmup_steps < 0:
            raise ValueError(f"lr_warmup_steps must be >= 0, got {self.lr_warmup_steps}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not (0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1):
            raise ValueError("adam_beta1 and adam_beta2 must be in [0, 1)")


@dataclass
class TrainerConfig:
    """Placement and the optimisation loop."""

    num_nodes: int = 1
    num_gpus_per_node: int = 0  # 0: CPU with gloo (tests and the embedded default)
    actor_world_size: int = 1  # ranks of the actor; tp * pp must divide it
    colocate_all_models: bool = True
    max_steps: int = 10  # RL steps: the run's length (the prompt sampler runs on across passes over the data)
    train_batch_size: int = 32  # sequences per optimizer step
    max_tokens_per_micro_batch: int = 4096  # micro-batches are formed by a token budget, not a count
    filter_uniform_groups: bool = False  # drop prompts whose n rewards are all equal (no signal for group baselines)
    seed: int = 42
    # A worker that dies (crash, OOM kill) restarts the workers and resumes from the last complete checkpoint,
    # up to this many times per run (0: the run stops with the worker's error).
    max_restarts: int = 0
    actor: OptimizerConfig = field(default_factory=OptimizerConfig)
    critic: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(lr=5e-6))

    def __post_init__(self) -> None:
        for name in ("num_nodes", "actor_world_size", "max_steps", "train_batch_size", "max_tokens_per_micro_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"trainer.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_gpus_per_node < 0:
            raise ValueError(f"trainer.num_gpus_per_node must be >= 0, got {self.num_gpus_per_node}")
        if self.max_restarts < 0:
            raise ValueError(f"trainer.max_restarts must be >= 0, got {self.max_restarts}")


@dataclass
class LoggingConfig:
    logging_steps: int = 1
    use_tensorboard: bool = True
    use_wandb: bool = False
    wandb_project: str = "lmmrl-megatron"
    wandb_run_name: str | None = None
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    progress_bar: bool = True


@dataclass
class CheckpointConfig:
    save_path: str = "./outputs/run"
    save_steps: int = 0  # 0: only at the end
    resume: str = "auto"  # "auto" (latest under save_path), "none", or a checkpoint directory
    save_hf: bool = False
    keep_last: int = 2

    def __post_init__(self) -> None:
        if self.save_steps < 0:
            raise ValueError(f"checkpoint.save_steps must be >= 0, got {self.save_steps}")
        if self.keep_last < 1:
            raise ValueError(f"checkpoint.keep_last must be >= 1, got {self.keep_last}")

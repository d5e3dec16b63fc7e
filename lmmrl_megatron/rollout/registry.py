"""Rollout backends by name: `rollout.backend` picks one; each is imported only when a run asks for it.

A backend is a function that turns the run's config into the engine class and its constructor arguments for one
engine; the rollout group makes a Ray actor of it. Adding a backend is one function and one line in BACKENDS.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from lmmrl_megatron.config.schema import RunConfig


@dataclass(frozen=True)
class EngineSpec:
    engine_cls: type
    kwargs: dict[str, Any]


def _hf(config: RunConfig, engine_index: int, bundle_indices: list[int]) -> EngineSpec:
    from lmmrl_megatron.models.qwen_vl.config import TORCH_DTYPES
    from lmmrl_megatron.rollout.hf_engine import HFRolloutEngine

    if config.rollout.engine_tp != 1:
        raise ValueError(f"rollout.backend=hf runs one device per engine; rollout.engine_tp={config.rollout.engine_tp} needs vllm")
    device = "cuda" if config.trainer.num_gpus_per_node > 0 else "cpu"
    # The engine runs in the trainer's dtype: its log-probs and the trainer's then agree to that rounding.
    return EngineSpec(HFRolloutEngine, dict(model_dir=config.model.pretrain, device=device, dtype=TORCH_DTYPES[config.model.dtype]))


VLLM_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _vllm(config: RunConfig, engine_index: int, bundle_indices: list[int]) -> EngineSpec:
    from lmmrl_megatron.rollout.vllm_engine import VLLMEngineOptions, VLLMRolloutEngine

    rollout, data = config.rollout, config.data
    mm_kwargs = {k: v for k, v in (("min_pixels", data.min_pixels), ("max_pixels", data.max_pixels)) if v is not None}
    options = VLLMEngineOptions(
        model_dir=config.model.pretrain,
        dtype=VLLM_DTYPES[config.model.dtype],
        tensor_parallel_size=rollout.engine_tp,
        gpu_memory_utilization=rollout.gpu_memory_utilization,
        max_model_len=rollout.max_model_len,
        enable_prefix_caching=rollout.enable_prefix_caching,
        enforce_eager=rollout.enforce_eager,
        enable_sleep=rollout.enable_sleep and config.trainer.colocate_all_models,
        sleep_level=rollout.sleep_level,
        seed=config.trainer.seed + engine_index,  # a distinct stream per engine
        max_num_seqs=max(16, rollout.rollout_batch_size * rollout.n_samples_per_prompt // rollout.num_engines),
        mm_processor_kwargs=mm_kwargs,
        bundle_indices=bundle_indices if rollout.engine_tp > 1 else None,
    )
    return EngineSpec(VLLMRolloutEngine, dict(options=options))


BACKENDS: dict[str, Callable[[RunConfig, int, list[int]], EngineSpec]] = {"hf": _hf, "vllm": _vllm}


def engine_spec(config: RunConfig, engine_index: int, bundle_indices: list[int]) -> EngineSpec:
    """The class and arguments of engine `engine_index`, whose devices are the placement group's `bundle_indices`."""
    backend = BACKENDS.get(config.rollout.backend)
    if backend is None:
        raise ValueError(f"rollout.backend={config.rollout.backend!r} is unknown; known: {sorted(BACKENDS)}")
    return backend(config, engine_index, bundle_indices)

"""Rollout backends by name: `rollout.backend` picks one; each is imported only when a run asks for it.

A backend has two functions: `check` names what stops it from running a config (the config validator,
`config/validate.py`, asks before Ray or any worker starts; it must be cheap and never build an engine), and
`engine` turns the config into the engine class and constructor arguments of one engine, of which the rollout
group makes a Ray actor. Adding a backend is those two functions and one line in BACKENDS.

    problems = rollout_backend_problems(config)   # [] when the backend can run this config
    spec = engine_spec(config, engine_index, bundle_indices)
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:  # annotations only: the config validator (config/validate.py) imports this module
    from lmmrl_megatron.config.schema import RunConfig


@dataclass(frozen=True)
class EngineSpec:
    engine_cls: type
    kwargs: dict[str, Any]


def _check_hf(config: RunConfig) -> list[str]:
    if config.rollout.engine_tp != 1:
        return [
            f"rollout.engine_tp={config.rollout.engine_tp}: the 'hf' engine runs on one device; "
            "tensor-parallel engines need rollout.backend=vllm"
        ]
    return []


def _hf(config: RunConfig, engine_index: int, bundle_indices: list[int]) -> EngineSpec:
    from lmmrl_megatron.models.qwen_vl.config import TORCH_DTYPES
    from lmmrl_megatron.rollout.hf_engine import HFRolloutEngine

    assert config.rollout.engine_tp == 1, "rollout_backend_problems refuses it"
    device = "cuda" if config.trainer.num_gpus_per_node > 0 else "cpu"
    # The engine runs in the trainer's dtype: its log-probs and the trainer's then agree to that rounding.
    return EngineSpec(HFRolloutEngine, dict(model_dir=config.model.pretrain, device=device, dtype=TORCH_DTYPES[config.model.dtype]))


VLLM_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _check_vllm(config: RunConfig) -> list[str]:
    problems = []
    if importlib.util.find_spec("vllm") is None:
        problems.append(
            "rollout.backend='vllm' is not available: vllm is not installed (scripts/setup_env.sh installs vLLM "
            "0.26.0, its CPU build where there is no NVIDIA GPU)"
        )
    if config.rollout.engine_tp > 1 and config.trainer.num_gpus_per_node == 0:
        problems.append(
            f"rollout.engine_tp={config.rollout.engine_tp}: vLLM engines with tensor parallelism need GPUs "
            "(trainer.num_gpus_per_node > 0); on CPU each engine is one process"
        )
    return problems


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


@dataclass(frozen=True)
class RolloutBackend:
    name: str
    check: Callable[[RunConfig], list[str]]  # the problems with running this config, each naming its key
    engine: Callable[[RunConfig, int, list[int]], EngineSpec]


BACKENDS: dict[str, RolloutBackend] = {b.name: b for b in (RolloutBackend("hf", _check_hf, _hf), RolloutBackend("vllm", _check_vllm, _vllm))}


def rollout_backend_problems(config: RunConfig) -> list[str]:
    """What stops `config.rollout.backend` from running this config ([] when nothing does)."""
    backend = BACKENDS.get(config.rollout.backend)
    if backend is None:
        return [f"rollout.backend={config.rollout.backend!r} is not a rollout backend (available: {', '.join(sorted(BACKENDS))})"]
    return backend.check(config)


def engine_spec(config: RunConfig, engine_index: int, bundle_indices: list[int]) -> EngineSpec:
    """The class and arguments of engine `engine_index`, whose devices are the placement group's `bundle_indices`."""
    problems = rollout_backend_problems(config)
    assert not problems, problems  # the config validator refused it before any worker started
    return BACKENDS[config.rollout.backend].engine(config, engine_index, bundle_indices)

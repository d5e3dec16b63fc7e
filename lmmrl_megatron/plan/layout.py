"""Layout checks from config.json alone: what Megatron, our model or vLLM would refuse once the workers start.

Each problem names the keys to change. `config/validate.py` runs these before any worker starts (the placement
of policy ranks and engines against nodes x GPUs is checked there already, not repeated here).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lmmrl_megatron.models.qwen_vl.config import QwenVLConfig, kv_replication

if TYPE_CHECKING:  # read by its fields: config/validate.py calls into plan/, so plan/ imports no config
    from lmmrl_megatron.config.schema import RunConfig


def _tp_problems(qwen: QwenVLConfig, tp: int) -> list[str]:
    text, vision = qwen.text, qwen.vision
    problems = []
    if text.num_attention_heads % tp:
        problems.append(f"parallel.tp={tp} does not divide the model's num_attention_heads={text.num_attention_heads}")
    try:
        kv_replication(text.num_key_value_heads, tp)
    except ValueError as exc:
        problems.append(f"parallel.tp={tp}: {exc} (KV heads are split over TP or replicated up to it)")
    if vision.num_heads % tp:
        problems.append(f"parallel.tp={tp} does not divide the vision tower's num_heads={vision.num_heads}")
    return problems


def _pp_problems(qwen: QwenVLConfig, config: RunConfig) -> list[str]:
    parallel = config.parallel
    try:
        per_stage = parallel.layout.layers_per_stage(qwen.text.num_layers)
    except ValueError as exc:
        return [f"parallel.pp / num_layers_in_first/last_pipeline_stage: {exc}"]
    problems = []
    if min(per_stage) < 1:
        problems.append(f"parallel: a pipeline stage holds no decoder layer ({per_stage} layers per stage)")
    vpp = parallel.vpp or 1
    uneven = [stage for stage, layers in enumerate(per_stage) if layers % vpp]
    if uneven:
        problems.append(f"parallel.vpp={vpp}: pipeline stages {uneven} hold layers {per_stage} not divisible by it")
    if config.algorithm.needs_critic and qwen.tie_word_embeddings and parallel.pp > 1:
        problems.append("a critic of a tied-embedding model under pipeline parallelism is not supported; parallel.pp=1")
    return problems


def _engine_problems(qwen: QwenVLConfig, config: RunConfig) -> list[str]:
    rollout, trainer = config.rollout, config.trainer
    if rollout.backend != "vllm":
        return []
    etp, text = rollout.engine_tp, qwen.text
    problems = []
    if text.num_attention_heads % etp:
        problems.append(f"rollout.engine_tp={etp} does not divide num_attention_heads={text.num_attention_heads} (vLLM)")
    if text.num_key_value_heads % etp and etp % text.num_key_value_heads:
        problems.append(f"rollout.engine_tp={etp} and num_key_value_heads={text.num_key_value_heads}: neither "
                        "divides the other (vLLM)")
    if trainer.num_gpus_per_node > 0 and etp > trainer.num_gpus_per_node:
        problems.append(f"rollout.engine_tp={etp} > trainer.num_gpus_per_node={trainer.num_gpus_per_node}: an engine "
                        "must fit on one node")
    return problems


def layout_problems(qwen: QwenVLConfig, config: RunConfig) -> list[str]:
    """Every layout problem of `config` for this model (empty: Megatron and vLLM accept the layout)."""
    problems = _tp_problems(qwen, config.parallel.tp) + _pp_problems(qwen, config) + _engine_problems(qwen, config)
    gpus = config.trainer.num_gpus_per_node
    if gpus > 0 and config.parallel.tp > gpus:
        problems.append(f"parallel.tp={config.parallel.tp} > trainer.num_gpus_per_node={gpus}: tensor parallelism "
                        "would cross nodes")
    return problems


def layout_notes(qwen: QwenVLConfig, config: RunConfig) -> list[str]:
    """What is legal but worth knowing: the vision tower sits on stage 0 with the embedding."""
    if config.parallel.pp == 1:
        return []
    return ["stage 0 also holds the vision tower and the embedding (parallel.num_layers_in_first_pipeline_stage "
            "can give it fewer decoder layers)"]

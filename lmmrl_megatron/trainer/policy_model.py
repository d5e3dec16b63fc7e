"""Build this rank's chunks of the Qwen-VL policy at the configured layout and fill them from the HF checkpoint."""

from __future__ import annotations

import torch

from lmmrl_megatron.config.sections import ModelConfig, ParallelConfig


def build_policy_chunks(model: ModelConfig, parallel: ParallelConfig, use_gpu: bool):
    """Return (model chunks of this pipeline rank, the model's QwenVLConfig), weights loaded from `model.pretrain`."""
    from lmmrl_megatron.models.qwen_vl.config import QwenVLConfig

    if not model.pretrain:
        raise ValueError("model.pretrain must name a Hugging Face Qwen2-VL / Qwen2.5-VL checkpoint directory")
    qwen_config = QwenVLConfig.from_hf_dir(model.pretrain)
    return build_chunks(qwen_config, model, parallel, use_gpu, load=True), qwen_config


def build_chunks(qwen_config, model: ModelConfig, parallel: ParallelConfig, use_gpu: bool, load: bool):
    """This pipeline rank's chunks of `qwen_config` at the configured layout: loaded from `model.pretrain`, or
    (`load=False`, bench/plan_check.py) randomly initialised where they live."""
    from megatron.core import parallel_state as ps

    from lmmrl_megatron.models.qwen_vl.config import QwenVLBuildOptions
    from lmmrl_megatron.models.qwen_vl.loading import load_hf_checkpoint
    from lmmrl_megatron.models.qwen_vl.model import QwenVLModel

    options = QwenVLBuildOptions(
        tp=parallel.tp,
        pp=parallel.pp,
        vpp=parallel.vpp,
        sequence_parallel=parallel.sequence_parallel,
        num_layers_in_first_pipeline_stage=parallel.num_layers_in_first_pipeline_stage,
        num_layers_in_last_pipeline_stage=parallel.num_layers_in_last_pipeline_stage,
        dtype=model.dtype,
        transformer_impl=model.transformer_impl,
        recompute=model.recompute,
        use_cpu_initialization=not use_gpu,
        perform_initialization=not load,  # loaded weights are overwritten right after
    )
    layout = options.shard_layout
    pp_rank = ps.get_pipeline_model_parallel_rank()
    chunks = []
    for vp_stage in range(parallel.vpp or 1):
        stage = vp_stage if parallel.vpp else None
        chunk = QwenVLModel(
            qwen_config,
            options,
            pre_process=layout.is_first_chunk(pp_rank, stage),
            post_process=layout.is_last_chunk(pp_rank, stage),
            vp_stage=stage,
        )
        if use_gpu:
            chunk = chunk.cuda(torch.cuda.current_device())
        if load:
            load_hf_checkpoint(chunk, model.pretrain)
        if model.freeze_vision and chunk.vision_model is not None:
            chunk.vision_model.requires_grad_(False)
        chunks.append(chunk)
    return chunks

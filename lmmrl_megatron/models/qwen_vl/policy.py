"""Qwen-VL as the trainer runs it: this rank's chunks at the configured layout, filled from the HF checkpoint, and
the forward the learner calls on them. The trainer reaches both through the family (`family.py`).

`model` and `parallel` are the run config's `ModelConfig` and `ParallelConfig` (config/sections.py), read by their
fields and `parallel.layout`: models/ does not import config/ (which reaches the rollout backends, which read model
configs).
"""

from __future__ import annotations

from typing import Any

import torch


def build_policy_chunks(model: Any, parallel: Any, use_gpu: bool):
    """Return (model chunks of this pipeline rank, the model's QwenVLConfig), weights loaded from `model.pretrain`."""
    from lmmrl_megatron.models.qwen_vl.config import QwenVLConfig

    if not model.pretrain:
        raise ValueError("model.pretrain must name a Hugging Face Qwen2-VL / Qwen2.5-VL checkpoint directory")
    qwen_config = QwenVLConfig.from_hf_dir(model.pretrain)
    return build_chunks(qwen_config, model, parallel, use_gpu, load=True), qwen_config


def build_chunks(qwen_config, model: Any, parallel: Any, use_gpu: bool, load: bool):
    """This pipeline rank's chunks of `qwen_config` at the configured layout: loaded from `model.pretrain`, or
    (`load=False`, bench/plan_check.py) randomly initialised where they live."""
    from megatron.core import parallel_state as ps

    from lmmrl_megatron.models.qwen_vl.config import QwenVLBuildOptions
    from lmmrl_megatron.models.qwen_vl.loading import load_hf_checkpoint
    from lmmrl_megatron.models.qwen_vl.model import QwenVLModel

    layout = parallel.layout
    options = QwenVLBuildOptions(
        layout=layout,
        dtype=model.dtype,
        transformer_impl=model.transformer_impl,
        recompute=model.recompute,
        cuda_graphs=model.cuda_graphs,
        use_cpu_initialization=not use_gpu,
        perform_initialization=not load,  # loaded weights are overwritten right after
    )
    pp_rank = ps.get_pipeline_model_parallel_rank()
    chunks = []
    for vp_stage in layout.vp_stages:
        chunk = QwenVLModel(
            qwen_config,
            options,
            pre_process=layout.is_first_chunk(pp_rank, vp_stage),
            post_process=layout.is_last_chunk(pp_rank, vp_stage),
            vp_stage=vp_stage,
        )
        if use_gpu:
            chunk = chunk.cuda(torch.cuda.current_device())
        if load:
            load_hf_checkpoint(chunk, model.pretrain)
        if model.freeze_vision and chunk.vision_model is not None:
            chunk.vision_model.requires_grad_(False)
        chunks.append(chunk)
    return chunks


def qwen_vl_forward(model: torch.nn.Module, micro_batch: Any) -> torch.Tensor:
    """Logits of this rank's vocabulary slice on the last stage, hidden states on the others (a `MicroBatch`)."""
    out = model(
        micro_batch.input_ids,
        micro_batch.attention_mask,
        pixel_values=micro_batch.pixel_values,
        image_grid_thw=micro_batch.image_grid_thw,
        return_logits=True,
    )
    return out if isinstance(out, torch.Tensor) else out.logits


def never_sampled_token_ids(config: Any) -> tuple[int, ...]:
    """The vision placeholders of a `QwenVLConfig`: no rollout engine samples them, so the log-probs leave them out."""
    tokens = config.tokens
    return tokens.image_token_id, tokens.video_token_id, tokens.vision_start_token_id, tokens.vision_end_token_id

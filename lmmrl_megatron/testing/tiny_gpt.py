"""A small Megatron-Core GPT whose weights depend only on each parameter's global name, for layout tests.

Every TP x PP layout builds the same logical model: a parameter's full tensor is drawn from a generator seeded by
its global name (layer numbers made global across pipeline stages) and sliced to this rank's TP shard, so results
at any layout can be compared with the single-process run.
"""

from __future__ import annotations

import hashlib

import torch

VOCAB, HIDDEN, HEADS, LAYERS, MAX_SEQ = 64, 32, 4, 4, 64


def global_param_name(model: torch.nn.Module, local_name: str) -> str:
    """Map a stage-local parameter name to the global one by the layer's global (1-based) layer_number."""
    parts = local_name.split(".")
    if "layers" in parts:
        idx = parts.index("layers")
        layer = model.decoder.layers[int(parts[idx + 1])]
        parts[idx + 1] = str(layer.layer_number - 1)
    return ".".join(parts)


def init_by_global_name(model: torch.nn.Module, tp_rank: int, tp_size: int, scale: float = 0.05) -> None:
    """Fill every parameter from the full tensor its global name seeds, then take this rank's TP slice."""
    for name, param in model.named_parameters():
        seed = int(hashlib.sha256(global_param_name(model, name).encode()).hexdigest()[:8], 16)
        shape = list(param.shape)
        split_dim = param.partition_dim if getattr(param, "tensor_model_parallel", False) else None
        if split_dim is not None:
            shape[split_dim] *= tp_size
        full = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale
        if name.endswith("layer_norm_weight") or name.endswith("final_layernorm.weight"):
            full = 1.0 + full
        if split_dim is not None:
            full = full.chunk(tp_size, dim=split_dim)[tp_rank]
        with torch.no_grad():
            param.copy_(full)


def build_tiny_gpt() -> torch.nn.Module:
    """The GPT for this rank's pipeline stage, at the parallel layout Megatron's parallel state holds."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    config = TransformerConfig(
        num_layers=LAYERS,
        hidden_size=HIDDEN,
        num_attention_heads=HEADS,
        num_query_groups=2,
        ffn_hidden_size=2 * HIDDEN,
        use_cpu_initialization=True,
        tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(),
        pipeline_dtype=torch.float32,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        normalization="RMSNorm",
        add_bias_linear=False,
    )
    model = GPTModel(
        config,
        get_gpt_layer_local_spec(),
        vocab_size=VOCAB,
        max_sequence_length=MAX_SEQ,
        pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(),
        position_embedding_type="rope",
    )
    init_by_global_name(model, ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size())
    return model

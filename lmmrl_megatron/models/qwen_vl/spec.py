"""Layer specs of the Qwen-VL language decoder: local (PyTorch SDPA core attention) or Transformer-Engine.

    block_spec = decoder_block_spec(decoder_config, "local", num_layers=len(layers_of_this_chunk))
    GPTModel(decoder_config, block_spec, ...)

Local: Megatron-Core's column/row-parallel linears and bias-dropout-add, our `SdpaAttention` as the core attention
(PyTorch's flash / cuDNN / memory-efficient kernels, packed sequences) and our `RMSNorm`, which normalises in fp32
and casts back before the weight multiply as Hugging Face's Qwen2 RMSNorm does (so bf16 results track it), and which
supports sequence parallelism (torch's own RMSNorm wrapper in Megatron refuses it).

Transformer-Engine: Megatron's TE layer spec (fused layer-norm + linear, so the norm weights are named
`linear_qkv.layer_norm_weight` / `linear_fc1.layer_norm_weight`), chosen with `transformer_impl="transformer_engine"`
when transformer-engine is installed.

Both use `AttnMaskType.padding_causal`: causal attention, plus a key-padding mask when the batch has left padding.
"""

from __future__ import annotations

import functools

import torch
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_submodules,
    get_gpt_layer_with_transformer_engine_submodules,
)
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer
from torch import Tensor

from lmmrl_megatron.models.attention import SdpaAttention


class RMSNorm(torch.nn.Module):
    """RMSNorm computed in fp32, cast back to the input dtype, then scaled by the weight (Qwen2's order)."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        device = "cpu" if config.use_cpu_initialization or not torch.cuda.is_available() else torch.cuda.current_device()
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype, device=device))
        # Under sequence parallelism each TP rank sees a different slice of tokens, so the norm weight's gradient
        # is partial per rank; Megatron all-reduces the gradients of parameters marked this way.
        self.weight.sequence_parallel = config.sequence_parallel
        self.eps = eps

    def forward(self, hidden_states: Tensor) -> Tensor:
        dtype = hidden_states.dtype
        states = hidden_states.float()
        states = states * torch.rsqrt(states.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * states.to(dtype)


def _local_layer_spec(fused: bool) -> ModuleSpec:
    base = get_gpt_layer_local_submodules(normalization="RMSNorm")
    linear_qkv, linear_proj = base.self_attention.submodules.linear_qkv, base.self_attention.submodules.linear_proj
    attention_module = SelfAttention
    if fused:  # fused.py: shared rotary tables and one rotary op, one SwiGLU op, one RMSNorm op, F.linear at TP=1
        from lmmrl_megatron.models.qwen_vl import fused as fused_ops

        attention_module, linear_qkv, linear_proj = (
            fused_ops.FusedRopeSelfAttention, fused_ops.PlainColumnLinear, fused_ops.PlainRowLinear
        )
        base.mlp = functools.partial(
            fused_ops.FusedSwiGLUMLP.as_mlp_submodule,
            submodules=MLPSubmodules(linear_fc1=fused_ops.PlainColumnLinear, linear_fc2=fused_ops.PlainRowLinear),
        )
    attention = ModuleSpec(
        module=attention_module,
        params={"attn_mask_type": AttnMaskType.padding_causal},
        submodules=SelfAttentionSubmodules(
            linear_qkv=linear_qkv,
            core_attention=SdpaAttention,
            linear_proj=linear_proj,
        ),
    )
    base.self_attention = attention
    base.input_layernorm = base.pre_mlp_layernorm = _rms_norm(fused)
    return ModuleSpec(module=TransformerLayer, submodules=base)


def _rms_norm(fused: bool) -> type[torch.nn.Module]:
    if not fused:
        return RMSNorm
    from lmmrl_megatron.models.qwen_vl.fused import FusedRMSNorm

    return FusedRMSNorm


def _te_layer_spec() -> ModuleSpec:
    try:
        import transformer_engine  # noqa: F401
    except ImportError as exc:
        raise ValueError(
            "transformer_impl='transformer_engine' needs transformer-engine installed; use 'local' otherwise"
        ) from exc
    base = get_gpt_layer_with_transformer_engine_submodules()
    base.self_attention.params["attn_mask_type"] = AttnMaskType.padding_causal
    return ModuleSpec(module=TransformerLayer, submodules=base)


def decoder_block_spec(
    config: TransformerConfig, transformer_impl: str, num_layers: int, fused: bool = False
) -> TransformerBlockSubmodules:
    """The block spec of one model chunk holding `num_layers` decoder layers (`fused`: the local spec with
    `fused.py`'s attention, MLP and linears; transformer-engine fuses by itself)."""
    if transformer_impl == "local":
        layer_specs = [_local_layer_spec(fused)] * num_layers
        return TransformerBlockSubmodules(layer_specs=layer_specs, layer_norm=_rms_norm(fused))
    if transformer_impl == "transformer_engine":
        from megatron.core.extensions.transformer_engine import TENorm

        return TransformerBlockSubmodules(layer_specs=[_te_layer_spec()] * num_layers, layer_norm=TENorm)
    raise ValueError(f"transformer_impl must be 'local' or 'transformer_engine', got {transformer_impl!r}")

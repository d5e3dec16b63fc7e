"""Megatron-Core layer spec of a vision block: tensor-parallel linears, torch norms and `SdpaAttention`.

The same spec serves both families; `vision_transformer_config` picks LayerNorm vs RMSNorm, the activation and
whether fc1 is a fused SwiGLU. Attention is bidirectional (`no_mask`); the segments (frames or windows) come in
through `PackedSeqParams` at run time.
"""

from __future__ import annotations

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.backends import LocalSpecProvider
from megatron.core.models.gpt.gpt_layer_specs import get_mlp_module_spec_for_backend
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from lmmrl_megatron.models.attention import SdpaAttention


def vision_layer_spec() -> ModuleSpec:
    """One vision block: norm -> self-attention (qkv bias) -> residual -> norm -> MLP -> residual."""
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=WrappedTorchNorm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.no_mask},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear,
                    core_attention=SdpaAttention,
                    linear_proj=RowParallelLinear,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=WrappedTorchNorm,
            mlp=get_mlp_module_spec_for_backend(backend=LocalSpecProvider()),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def vision_block_spec(depth: int) -> TransformerBlockSubmodules:
    """All `depth` blocks explicitly, so Megatron never splits the tower over pipeline stages; no final norm."""
    return TransformerBlockSubmodules(layer_specs=[vision_layer_spec()] * depth, layer_norm=None)

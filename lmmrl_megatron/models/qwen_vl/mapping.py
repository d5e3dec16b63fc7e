"""The Qwen2-VL / Qwen2.5-VL parameter mapping: every parameter of `QwenVLModel` and the HF tensors it comes from.

    rules = qwen_vl_rules(config, transformer_impl="local")
    params = qwen_vl_params(config)                                   # every parameter, global names
    mine = qwen_vl_chunk_params(config, layout, pp_rank, vp_stage)    # those of one pipeline chunk

Megatron names are those of `QwenVLModel` (`language_model.*` for the decoder, `vision_model.*` for the vision
tower), with the global decoder layer index. HF names are the hub's (`model.layers.*`, `model.embed_tokens.weight`,
`model.norm.weight`, `lm_head.weight`, `visual.*`), which transformers and vLLM both load; `canonical_hf_name` maps
transformers 5's own layout (`model.language_model.*`, `model.visual.*`) onto them when reading.

Tied embeddings (`tie_word_embeddings`): there is no `lm_head.weight`. The first chunk's embedding maps to
`model.embed_tokens.weight`; under PP the last chunk's output layer holds a copy (Megatron's shared embedding),
which loads from the same HF tensor and is not exported (`exported=False`).

Transformer-Engine names: the decoder's pre-attention and pre-MLP norms are fused into the following linear
(`self_attention.linear_qkv.layer_norm_weight`, `mlp.linear_fc1.layer_norm_weight`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch
from torch import Tensor

from lmmrl_megatron.convert.hf_io import canonical_hf_name  # noqa: F401 (the family's naming, re-exported)
from lmmrl_megatron.convert.mapping import (
    Copy,
    FusedGateUp,
    FusedQKV,
    MappedParam,
    PaddedVocab,
    ParamRule,
    Transform,
    chunk_params,
    expand_rules,
)
from lmmrl_megatron.models.qwen_vl.config import QwenVLConfig
from lmmrl_megatron.models.qwen_vl.vision_config import VisionEncoderConfig
from lmmrl_megatron.models.qwen_vl.vision_layout import (
    VisionParamMapping,
    hf_to_megatron_tensor,
    megatron_to_hf_tensors,
    tp_shard,
    vision_parameter_mappings,
)
from lmmrl_megatron.parallel.layout import ShardLayout

TransformerImpl = Literal["local", "transformer_engine"]

DECODER = "language_model.decoder.layers.{layer}."
HF_LAYER = "model.layers.{layer}."
VISION = "vision_model."
HF_VISION = "visual."


def decoder_rules(config: QwenVLConfig, transformer_impl: TransformerImpl = "local") -> list[ParamRule]:
    """The language decoder's rules: embedding, layers, final norm, output layer."""
    text = config.text
    te = transformer_impl == "transformer_engine"
    qkv = FusedQKV(text.num_attention_heads, text.num_key_value_heads, text.head_dim)
    vocab = PaddedVocab(text.vocab_size)
    input_norm = "self_attention.linear_qkv.layer_norm_weight" if te else "input_layernorm.weight"
    pre_mlp_norm = "mlp.linear_fc1.layer_norm_weight" if te else "pre_mlp_layernorm.weight"
    attn, mlp = HF_LAYER + "self_attn.", HF_LAYER + "mlp."

    def layer(mcore: str, hf: tuple[str, ...], transform) -> ParamRule:
        return ParamRule(DECODER + mcore, hf, transform, "decoder_layer")

    rules = [
        ParamRule("language_model.embedding.word_embeddings.weight", ("model.embed_tokens.weight",), vocab, "first"),
        layer(input_norm, (HF_LAYER + "input_layernorm.weight",), Copy()),
        layer("self_attention.linear_qkv.weight", tuple(f"{attn}{p}_proj.weight" for p in "qkv"), qkv),
        layer("self_attention.linear_qkv.bias", tuple(f"{attn}{p}_proj.bias" for p in "qkv"), qkv),
        layer("self_attention.linear_proj.weight", (attn + "o_proj.weight",), Copy(tp_dim=1)),
        layer(pre_mlp_norm, (HF_LAYER + "post_attention_layernorm.weight",), Copy()),
        layer("mlp.linear_fc1.weight", (mlp + "gate_proj.weight", mlp + "up_proj.weight"), FusedGateUp()),
        layer("mlp.linear_fc2.weight", (mlp + "down_proj.weight",), Copy(tp_dim=1)),
        ParamRule("language_model.decoder.final_layernorm.weight", ("model.norm.weight",), Copy(), "last"),
    ]
    if config.tie_word_embeddings:
        rules.append(
            ParamRule("language_model.output_layer.weight", ("model.embed_tokens.weight",), vocab, "tied_output",
                      exported=False)
        )
    else:
        rules.append(ParamRule("language_model.output_layer.weight", ("lm_head.weight",), vocab, "last"))
    return rules


@dataclass(frozen=True, eq=False)
class VisionTensor(Transform):
    """A vision-tower parameter, cut with the vision tower's own re-layouts (`models/qwen_vl/vision_layout.py`):
    HF `qkv` packed [q; k; v] over heads -> Megatron's per-head [q_h; k_h; v_h]; SwiGLU gate/up fused per TP rank;
    the MLP width zero-padded to a multiple of TP."""

    mapping: VisionParamMapping
    vision: VisionEncoderConfig

    @property
    def kind(self) -> str:  # type: ignore[override]
        return "vision_" + self.mapping.transform

    @property
    def tp_dim(self) -> int | None:  # type: ignore[override]
        return self.mapping.tp_split_dim

    def to_shard(self, hf: Sequence[Tensor], tp_rank: int, tp_size: int, what: str) -> Tensor:
        try:
            full = hf_to_megatron_tensor(self.mapping, tuple(hf), self.vision, tp_size)
            return tp_shard(full, self.mapping.tp_split_dim, tp_rank, tp_size)
        except (AssertionError, RuntimeError, ValueError) as exc:
            shapes = [tuple(t.shape) for t in hf]
            raise ValueError(f"{what}: HF tensors of shapes {shapes} do not fit the vision config ({exc})") from exc

    def from_shards(self, shards: Sequence[Tensor], what: str) -> list[Tensor]:
        dim = self.mapping.tp_split_dim
        full = shards[0] if dim is None or len(shards) == 1 else torch.cat(list(shards), dim=dim)
        return list(megatron_to_hf_tensors(self.mapping, full, self.vision, len(shards)))


def vision_rules(config: QwenVLConfig) -> list[ParamRule]:
    """The vision tower's and patch merger's rules (all on the first chunk), from the tower's own table."""
    return [
        ParamRule(
            VISION + mapping.megatron_name,
            tuple(HF_VISION + name for name in mapping.hf_names),
            VisionTensor(mapping, config.vision),
            "first",
        )
        for mapping in vision_parameter_mappings(config.vision)
    ]


def qwen_vl_rules(config: QwenVLConfig, transformer_impl: TransformerImpl = "local") -> list[ParamRule]:
    """Every rule of the model, vision tower first."""
    return vision_rules(config) + decoder_rules(config, transformer_impl)


def qwen_vl_params(config: QwenVLConfig, transformer_impl: TransformerImpl = "local") -> list[MappedParam]:
    """Every concrete parameter of the whole model (global names)."""
    return expand_rules(qwen_vl_rules(config, transformer_impl), config.text.num_layers)


def qwen_vl_chunk_params(
    config: QwenVLConfig,
    layout: ShardLayout,
    pp_rank: int,
    vp_stage: int | None = None,
    transformer_impl: TransformerImpl = "local",
) -> list[MappedParam]:
    """The parameters of pipeline chunk (pp_rank, vp_stage), global names."""
    return chunk_params(qwen_vl_params(config, transformer_impl), config.text.num_layers, layout, pp_rank, vp_stage)


def exported_hf_names(config: QwenVLConfig, transformer_impl: TransformerImpl = "local") -> list[str]:
    """Every HF tensor name the model exports (each once)."""
    return [name for param in qwen_vl_params(config, transformer_impl) if param.exported for name in param.hf_names]

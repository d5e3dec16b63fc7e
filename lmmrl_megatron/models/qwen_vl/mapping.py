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

The vision tower (`vision_rules`) lives whole on the first chunk, its blocks named with their own index. Its HF
`attn.qkv` is packed [q; k; v] over all heads (`HeadQKV`: per head in Megatron), and its MLP width is zero-padded
to a multiple of TP (`FusedGateUp(width)` for Qwen2.5-VL's SwiGLU, `PaddedSplit` for fc1 / fc2 columns), as
`VisionEncoderConfig.padded_intermediate_size` builds the tower.

Transformer-Engine names: the decoder's pre-attention and pre-MLP norms are fused into the following linear
(`self_attention.linear_qkv.layer_norm_weight`, `mlp.linear_fc1.layer_norm_weight`).
"""

from __future__ import annotations

from typing import Literal

from lmmrl_megatron.convert.hf_io import canonical_hf_name  # noqa: F401 (the family's naming, re-exported)
from lmmrl_megatron.convert.mapping import (
    Copy,
    FusedGateUp,
    FusedQKV,
    HeadQKV,
    MappedParam,
    PaddedSplit,
    PaddedVocab,
    ParamRule,
    Transform,
    chunk_params,
    expand_rules,
)
from lmmrl_megatron.models.qwen_vl.config import QwenVLConfig
from lmmrl_megatron.models.qwen_vl.vision_config import VisionEncoderConfig
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


def _vision_rule(mcore: str, hf: str | tuple[str, ...], transform: Transform) -> ParamRule:
    """A vision-tower rule: names relative to the tower (`QwenVisionEncoder`, HF's `visual`), on the first chunk."""
    sources = (hf,) if isinstance(hf, str) else hf
    return ParamRule(VISION + mcore, tuple(HF_VISION + name for name in sources), transform, "first")


def _norm_suffixes(vision: VisionEncoderConfig) -> tuple[str, ...]:
    """The parameters of a vision norm: LayerNorm (Qwen2-VL) has a bias, RMSNorm (Qwen2.5-VL) not."""
    return ("weight", "bias") if vision.normalization == "LayerNorm" else ("weight",)


def _vision_block_rules(vision: VisionEncoderConfig, block: int) -> list[ParamRule]:
    """The rules of vision block `block`: attention `qkv` packed [q; k; v] in HF, per head in Megatron; the MLP
    width zero-padded to a multiple of TP (`VisionEncoderConfig.padded_intermediate_size`)."""
    ours, theirs = f"decoder.layers.{block}.", f"blocks.{block}."
    norm_suffixes = _norm_suffixes(vision)
    qkv = HeadQKV(vision.num_heads, vision.head_dim)
    width = vision.intermediate_size
    rules = []
    for suffix in norm_suffixes:
        rules.append(_vision_rule(f"{ours}input_layernorm.{suffix}", f"{theirs}norm1.{suffix}", Copy()))
        rules.append(_vision_rule(f"{ours}pre_mlp_layernorm.{suffix}", f"{theirs}norm2.{suffix}", Copy()))
    rules += [
        _vision_rule(f"{ours}self_attention.linear_qkv.weight", f"{theirs}attn.qkv.weight", qkv),
        _vision_rule(f"{ours}self_attention.linear_qkv.bias", f"{theirs}attn.qkv.bias", qkv),
        _vision_rule(f"{ours}self_attention.linear_proj.weight", f"{theirs}attn.proj.weight", Copy(tp_dim=1)),
        _vision_rule(f"{ours}self_attention.linear_proj.bias", f"{theirs}attn.proj.bias", Copy()),
    ]
    for suffix in ("weight", "bias"):
        fc1 = f"{ours}mlp.linear_fc1.{suffix}"
        if vision.gated_mlp:
            gate_up = (f"{theirs}mlp.gate_proj.{suffix}", f"{theirs}mlp.up_proj.{suffix}")
            rules.append(_vision_rule(fc1, gate_up, FusedGateUp(width)))
        else:
            rules.append(_vision_rule(fc1, f"{theirs}mlp.fc1.{suffix}", PaddedSplit(width)))
    fc2 = f"{theirs}mlp.down_proj" if vision.gated_mlp else f"{theirs}mlp.fc2"
    rules += [
        _vision_rule(f"{ours}mlp.linear_fc2.weight", f"{fc2}.weight", PaddedSplit(width, tp_dim=1)),
        _vision_rule(f"{ours}mlp.linear_fc2.bias", f"{fc2}.bias", Copy()),
    ]
    return rules


def vision_rules(vision: VisionEncoderConfig) -> list[ParamRule]:
    """The vision tower's and patch merger's rules, all on the first chunk. Its blocks are named with their index
    (the `{layer}` of a rule is a decoder layer's)."""
    norm_suffixes = _norm_suffixes(vision)
    rules = [_vision_rule("patch_embed.proj.weight", "patch_embed.proj.weight", Copy())]
    for block in range(vision.depth):
        rules += _vision_block_rules(vision, block)
    rules += [_vision_rule(f"merger.ln_q.{suffix}", f"merger.ln_q.{suffix}", Copy()) for suffix in norm_suffixes]
    rules += [
        _vision_rule("merger.linear_fc1.weight", "merger.mlp.0.weight", Copy(tp_dim=0)),
        _vision_rule("merger.linear_fc1.bias", "merger.mlp.0.bias", Copy(tp_dim=0)),
        _vision_rule("merger.linear_fc2.weight", "merger.mlp.2.weight", Copy(tp_dim=1)),
        _vision_rule("merger.linear_fc2.bias", "merger.mlp.2.bias", Copy()),
    ]
    return rules


def qwen_vl_rules(config: QwenVLConfig, transformer_impl: TransformerImpl = "local") -> list[ParamRule]:
    """Every rule of the model, vision tower first."""
    return vision_rules(config.vision) + decoder_rules(config, transformer_impl)


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

"""Parameters each rank holds, per pipeline stage, counted from the model's config.json alone.

The count follows our Megatron model exactly (`models/qwen_vl/model.py` with the local layer spec): the fused QKV
with its bias and KV heads replicated up to TP (`kv_replication`), SwiGLU fc1 as gate+up, RMSNorm weights
replicated, the vocabulary padded to a multiple of 128 x TP, the vision tower (TP-sharded, its MLP padded to TP)
and its merger on stage 0, the output layer on the last stage (a copy of the tied embedding when PP > 1).
`meta.py` builds the real model on the meta device and `tests/plan` checks the two agree to the parameter.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmmrl_megatron.convert.mapping import padded_vocab_size
from lmmrl_megatron.models.qwen_vl.config import QwenVLConfig, kv_replication
from lmmrl_megatron.parallel.layout import ShardLayout


@dataclass(frozen=True)
class StageParams:
    """One rank of pipeline stage `stage`: its parameter counts (every TP rank of a stage holds the same)."""

    stage: int
    layers: int
    decoder: int  # decoder layers
    embedding: int  # input embedding (stage 0)
    output: int  # final norm + output layer (last stage)
    vision: int  # vision tower + merger (stage 0)
    largest: int  # the largest single parameter's full (TP-gathered) size: the export's gather buffer

    @property
    def total(self) -> int:
        return self.decoder + self.embedding + self.output + self.vision

    def trainable(self, freeze_vision: bool) -> int:
        return self.total - (self.vision if freeze_vision else 0)


def decoder_layer_params(config: QwenVLConfig, tp: int) -> int:
    text = config.text
    h, d, f = text.hidden_size, text.head_dim, text.intermediate_size
    kv = text.num_key_value_heads * kv_replication(text.num_key_value_heads, tp)
    qkv_out = (text.num_attention_heads + 2 * kv) * d
    per_rank = (qkv_out * h + qkv_out + text.num_attention_heads * d * h + 3 * f * h) // tp
    return per_rank + 2 * h  # the two RMSNorm weights, replicated


def vision_params(config: QwenVLConfig, tp: int) -> int:
    v = config.vision
    hv = v.hidden_size
    inter = v.padded_intermediate_size(tp)
    norm = hv * (2 if v.normalization == "LayerNorm" else 1)
    mlp_in = (2 if v.gated_mlp else 1) * inter
    block = 2 * norm + (3 * hv * hv + 3 * hv + hv * hv + mlp_in * hv + mlp_in + inter * hv) // tp + 2 * hv
    merged = v.merger_hidden_size
    merger = norm + (merged * merged + merged + merged * v.out_hidden_size) // tp + v.out_hidden_size
    return v.depth * block + v.patch_input_size * hv + merger


def stage_params(config: QwenVLConfig, layout: ShardLayout) -> list[StageParams]:
    """Per pipeline stage, what one of its ranks holds (`ValueError` if the layers cannot be split so)."""
    text = config.text
    tp, pp = layout.tp, layout.pp
    vocab = padded_vocab_size(text.vocab_size, tp) * text.hidden_size
    layer = decoder_layer_params(config, tp)
    largest = max(vocab, 2 * text.intermediate_size * text.hidden_size)
    stages = []
    for stage, layers in enumerate(layout.layers_per_stage(text.num_layers)):
        first, last = stage == 0, stage == pp - 1
        # Tied at PP=1 the output layer is the embedding itself; at PP>1 the last stage holds a synced copy.
        output = text.hidden_size + (vocab // tp if not (config.tie_word_embeddings and first) else 0) if last else 0
        stages.append(StageParams(
            stage=stage,
            layers=layers,
            decoder=layers * layer,
            embedding=vocab // tp if first else 0,
            output=output,
            vision=vision_params(config, tp) if first else 0,
            largest=largest,
        ))
    return stages

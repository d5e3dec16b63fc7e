"""How each vision-tower parameter of Hugging Face maps onto ours: names, re-layouts, tensor-parallel splits.

Three re-layouts matter (each a classic source of silent errors):
- attention `qkv`: HF packs `[q; k; v]`, each over all heads; Megatron interleaves per head (query group)
  `[q_0; k_0; v_0; q_1; k_1; v_1; ...]`, so a contiguous TP slice holds whole heads with their k and v;
- SwiGLU `linear_fc1` (Qwen2.5-VL): HF's `gate_proj` and `up_proj` are fused so that TP rank r's slice is
  `[gate_r; up_r]` (Megatron's gated-MLP contract) — the fused tensor therefore depends on the TP size;
- MLP width padded up to a multiple of TP (`VisionEncoderConfig.padded_intermediate_size`) with zeros.

"Megatron tensor" below means the full, unsharded tensor in Megatron's layout; `tp_shard` cuts rank r's piece
along `tp_split_dim` (column-parallel weights and biases: dim 0; row-parallel weights: dim 1; None: replicated).
HF names are relative to the vision module (`model.visual.` in transformers 5 checkpoints, `visual.` in hub ones).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from lmmrl_megatron.models.qwen_vl.vision_config import VisionEncoderConfig

Transform = Literal["copy", "qkv", "swiglu_fc1", "pad_intermediate"]


@dataclass(frozen=True)
class VisionParamMapping:
    """One Megatron parameter of the vision tower and the HF tensor(s) it is made of."""

    megatron_name: str
    hf_names: tuple[str, ...]
    tp_split_dim: int | None
    transform: Transform = "copy"


# ----------------------------------------------------------------------------------------------------------------
# Per-tensor re-layouts (weights [out, in] and biases [out] alike: only dim 0 is rearranged)


def qkv_hf_to_megatron(tensor: Tensor, num_heads: int) -> Tensor:
    """HF `[q; k; v]` (each `[heads * head_dim]` rows) -> Megatron per-head `[q_h; k_h; v_h]`."""
    rest = tensor.shape[1:]
    head_dim = tensor.size(0) // (3 * num_heads)
    assert tensor.size(0) == 3 * num_heads * head_dim, f"qkv rows {tensor.size(0)} not 3 * {num_heads} heads"
    return tensor.reshape(3, num_heads, head_dim, *rest).transpose(0, 1).reshape(tensor.shape).contiguous()


def qkv_megatron_to_hf(tensor: Tensor, num_heads: int) -> Tensor:
    """Inverse of `qkv_hf_to_megatron`."""
    rest = tensor.shape[1:]
    head_dim = tensor.size(0) // (3 * num_heads)
    assert tensor.size(0) == 3 * num_heads * head_dim, f"qkv rows {tensor.size(0)} not 3 * {num_heads} heads"
    return tensor.reshape(num_heads, 3, head_dim, *rest).transpose(0, 1).reshape(tensor.shape).contiguous()


def pad_dim(tensor: Tensor, dim: int, size: int) -> Tensor:
    """`tensor` zero-padded along `dim` to `size` (unchanged when already that size)."""
    missing = size - tensor.size(dim)
    assert missing >= 0, f"cannot pad dim {dim} of {tuple(tensor.shape)} down to {size}"
    if missing == 0:
        return tensor
    pad_shape = list(tensor.shape)
    pad_shape[dim] = missing
    return torch.cat([tensor, tensor.new_zeros(pad_shape)], dim=dim)


def swiglu_fc1_hf_to_megatron(gate: Tensor, up: Tensor, tp_size: int, padded_size: int | None = None) -> Tensor:
    """Fuse `gate_proj` and `up_proj` so that chunk r of `tp_size` along dim 0 is `[gate_r; up_r]`."""
    padded_size = gate.size(0) if padded_size is None else padded_size
    gate_chunks = pad_dim(gate, 0, padded_size).chunk(tp_size, dim=0)
    up_chunks = pad_dim(up, 0, padded_size).chunk(tp_size, dim=0)
    return torch.cat([part for pair in zip(gate_chunks, up_chunks) for part in pair], dim=0)


def swiglu_fc1_megatron_to_hf(fc1: Tensor, tp_size: int, intermediate_size: int) -> tuple[Tensor, Tensor]:
    """Inverse of `swiglu_fc1_hf_to_megatron`: (gate, up), padding removed."""
    pairs = [chunk.chunk(2, dim=0) for chunk in fc1.chunk(tp_size, dim=0)]
    # one TP rank: views of fc1, no copy (the weight export reuses such views across syncs)
    gate = (pairs[0][0] if len(pairs) == 1 else torch.cat([g for g, _ in pairs], dim=0))[:intermediate_size]
    up = (pairs[0][1] if len(pairs) == 1 else torch.cat([u for _, u in pairs], dim=0))[:intermediate_size]
    return gate.contiguous(), up.contiguous()


def tp_shard(tensor: Tensor, split_dim: int | None, tp_rank: int, tp_size: int) -> Tensor:
    """Rank `tp_rank`'s piece of a full Megatron tensor (the whole tensor when replicated)."""
    if split_dim is None or tp_size == 1:
        return tensor
    if tensor.size(split_dim) % tp_size != 0:
        raise ValueError(f"dim {split_dim} of shape {tuple(tensor.shape)} does not split over {tp_size} TP ranks")
    return tensor.chunk(tp_size, dim=split_dim)[tp_rank].contiguous()


# ----------------------------------------------------------------------------------------------------------------
# The table


def vision_parameter_mappings(config: VisionEncoderConfig) -> list[VisionParamMapping]:
    """Every parameter of `QwenVisionEncoder` with its HF source, TP split dim and re-layout."""
    mappings: list[VisionParamMapping] = []

    def add(ours: str, theirs: str | tuple[str, ...], split: int | None, transform: Transform = "copy") -> None:
        sources = (theirs,) if isinstance(theirs, str) else theirs
        mappings.append(VisionParamMapping(ours, sources, split, transform))

    norm_suffixes = ("weight", "bias") if config.normalization == "LayerNorm" else ("weight",)
    add("patch_embed.proj.weight", "patch_embed.proj.weight", None)
    for i in range(config.depth):
        ours, theirs = f"decoder.layers.{i}", f"blocks.{i}"
        for suffix in norm_suffixes:
            add(f"{ours}.input_layernorm.{suffix}", f"{theirs}.norm1.{suffix}", None)
            add(f"{ours}.pre_mlp_layernorm.{suffix}", f"{theirs}.norm2.{suffix}", None)
        add(f"{ours}.self_attention.linear_qkv.weight", f"{theirs}.attn.qkv.weight", 0, "qkv")
        add(f"{ours}.self_attention.linear_qkv.bias", f"{theirs}.attn.qkv.bias", 0, "qkv")
        add(f"{ours}.self_attention.linear_proj.weight", f"{theirs}.attn.proj.weight", 1)
        add(f"{ours}.self_attention.linear_proj.bias", f"{theirs}.attn.proj.bias", None)
        fc2 = f"{theirs}.mlp.down_proj" if config.gated_mlp else f"{theirs}.mlp.fc2"
        for suffix in ("weight", "bias"):
            if config.gated_mlp:
                gate_up = (f"{theirs}.mlp.gate_proj.{suffix}", f"{theirs}.mlp.up_proj.{suffix}")
                add(f"{ours}.mlp.linear_fc1.{suffix}", gate_up, 0, "swiglu_fc1")
            else:
                add(f"{ours}.mlp.linear_fc1.{suffix}", f"{theirs}.mlp.fc1.{suffix}", 0, "pad_intermediate")
        add(f"{ours}.mlp.linear_fc2.weight", f"{fc2}.weight", 1, "pad_intermediate")
        add(f"{ours}.mlp.linear_fc2.bias", f"{fc2}.bias", None)
    for suffix in norm_suffixes:
        add(f"merger.ln_q.{suffix}", f"merger.ln_q.{suffix}", None)
    add("merger.linear_fc1.weight", "merger.mlp.0.weight", 0)
    add("merger.linear_fc1.bias", "merger.mlp.0.bias", 0)
    add("merger.linear_fc2.weight", "merger.mlp.2.weight", 1)
    add("merger.linear_fc2.bias", "merger.mlp.2.bias", None)
    return mappings


def hf_to_megatron_tensor(
    mapping: VisionParamMapping, hf_tensors: tuple[Tensor, ...], config: VisionEncoderConfig, tp_size: int
) -> Tensor:
    """The full Megatron tensor for `mapping` from its HF tensors (in `mapping.hf_names` order)."""
    if mapping.transform == "qkv":
        return qkv_hf_to_megatron(hf_tensors[0], config.num_heads)
    if mapping.transform == "swiglu_fc1":
        gate, up = hf_tensors
        return swiglu_fc1_hf_to_megatron(gate, up, tp_size, config.padded_intermediate_size(tp_size))
    if mapping.transform == "pad_intermediate":
        assert mapping.tp_split_dim is not None
        return pad_dim(hf_tensors[0], mapping.tp_split_dim, config.padded_intermediate_size(tp_size))
    return hf_tensors[0]


def megatron_to_hf_tensors(
    mapping: VisionParamMapping, tensor: Tensor, config: VisionEncoderConfig, tp_size: int
) -> tuple[Tensor, ...]:
    """Inverse of `hf_to_megatron_tensor`: the HF tensors (in `mapping.hf_names` order) of a full Megatron one."""
    if mapping.transform == "qkv":
        return (qkv_megatron_to_hf(tensor, config.num_heads),)
    if mapping.transform == "swiglu_fc1":
        return swiglu_fc1_megatron_to_hf(tensor, tp_size, config.intermediate_size)
    if mapping.transform == "pad_intermediate":
        assert mapping.tp_split_dim is not None
        return (tensor.narrow(mapping.tp_split_dim, 0, config.intermediate_size).contiguous(),)
    return (tensor,)


def hf_vision_state_to_megatron(
    hf_state: dict[str, Tensor], config: VisionEncoderConfig, tp_rank: int = 0, tp_size: int = 1, prefix: str = ""
) -> dict[str, Tensor]:
    """TP rank `tp_rank`'s state dict for `QwenVisionEncoder` from HF vision weights named `prefix + name`."""
    out: dict[str, Tensor] = {}
    for mapping in vision_parameter_mappings(config):
        missing = [prefix + name for name in mapping.hf_names if prefix + name not in hf_state]
        if missing:
            raise ValueError(f"HF vision weights lack {missing}")
        full = hf_to_megatron_tensor(mapping, tuple(hf_state[prefix + n] for n in mapping.hf_names), config, tp_size)
        out[mapping.megatron_name] = tp_shard(full, mapping.tp_split_dim, tp_rank, tp_size)
    return out


def megatron_vision_state_to_hf(
    shards_by_rank: list[dict[str, Tensor]], config: VisionEncoderConfig, prefix: str = ""
) -> dict[str, Tensor]:
    """HF vision weights from every TP rank's `QwenVisionEncoder` state dict (rank order), names `prefix + name`."""
    tp_size = len(shards_by_rank)
    out: dict[str, Tensor] = {}
    for mapping in vision_parameter_mappings(config):
        pieces = [shard[mapping.megatron_name] for shard in shards_by_rank]
        full = pieces[0] if mapping.tp_split_dim is None else torch.cat(pieces, dim=mapping.tp_split_dim)
        for name, tensor in zip(mapping.hf_names, megatron_to_hf_tensors(mapping, full, config, tp_size)):
            out[prefix + name] = tensor
    return out

"""Vision geometry against transformers' helpers, the HF<->Megatron re-layouts, and config reading."""

from __future__ import annotations

import pytest
import torch
from megatron.core.transformer import TransformerConfig
from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids, get_vision_window_index

from lmmrl_megatron.models.qwen_vl.vision_config import VisionEncoderConfig, vision_transformer_config
from lmmrl_megatron.models.qwen_vl.vision_geometry import VisionTokenLayout, patch_positions, window_order
from lmmrl_megatron.models.qwen_vl.vision_layout import (
    hf_vision_state_to_megatron,
    megatron_vision_state_to_hf,
    qkv_hf_to_megatron,
    qkv_megatron_to_hf,
    swiglu_fc1_hf_to_megatron,
    swiglu_fc1_megatron_to_hf,
    vision_parameter_mappings,
)

# Images and a two-frame video; merged grids 3x6, 8x5, 2x2, 4x3 (x2 frames), 15x11.
GRIDS = torch.tensor([[1, 6, 12], [1, 16, 10], [1, 4, 4], [2, 8, 6], [1, 30, 22]])

QWEN2_VL_7B_HUB = {  # vision_config of Qwen/Qwen2-VL-7B-Instruct's config.json
    "depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_chans": 3, "hidden_size": 3584,
    "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14, "temporal_patch_size": 2,
}
QWEN2_5_VL_72B_HUB = {  # vision_config of Qwen/Qwen2.5-VL-72B-Instruct's config.json
    "depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3456, "num_heads": 16,
    "in_chans": 3, "out_hidden_size": 8192, "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14,
    "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2, "temporal_patch_size": 2,
}


def test_patch_positions_match_transformers() -> None:
    assert torch.equal(patch_positions(GRIDS, 2), get_vision_position_ids(GRIDS, 2))


@pytest.mark.parametrize("window_px", [56, 112])
def test_window_order_matches_transformers(window_px: int) -> None:
    hf_index, hf_cu = get_vision_window_index(GRIDS, spatial_merge_size=2, window_size=window_px, patch_size=14)
    index, sizes = window_order(GRIDS, merge=2, window=window_px // 28)
    assert torch.equal(index, hf_index)
    assert torch.equal(sizes * 4, torch.diff(hf_cu).to(torch.int64))


def test_layout_segments_and_inverse_permutation() -> None:
    config = VisionEncoderConfig(depth=2, hidden_size=32, num_heads=2, window_size=56, fullatt_block_indexes=[1])
    layout = VisionTokenLayout.build(GRIDS, config)
    assert torch.equal(layout.full_attention.cu_seqlens_q, get_vision_cu_seqlens(GRIDS))
    assert layout.full_attention.host_segments.lengths_q == torch.diff(get_vision_cu_seqlens(GRIDS)).tolist()
    assert torch.equal(layout.window_index[layout.reverse_window_index], torch.arange(layout.num_patches // 4))
    assert layout.window_attention.max_seqlen_q == 16  # a full 2x2-merged window = 16 patches
    assert min(layout.window_attention.host_segments.lengths_q) == 4  # a 1x1 corner window exists


def test_qkv_relayout_groups_each_head_with_its_key_and_value() -> None:
    heads, head_dim = 3, 2
    rows = torch.arange(3 * heads * head_dim)  # HF: q heads, then k heads, then v heads
    ours = qkv_hf_to_megatron(rows, heads)
    for h in range(heads):
        block = ours[h * 3 * head_dim : (h + 1) * 3 * head_dim]
        expected = [rows[(part * heads + h) * head_dim : (part * heads + h + 1) * head_dim] for part in range(3)]
        assert torch.equal(block, torch.cat(expected))
    weight = torch.randn(3 * heads * head_dim, 5)
    assert torch.equal(qkv_megatron_to_hf(qkv_hf_to_megatron(weight, heads), heads), weight)


@pytest.mark.parametrize("tp_size", [1, 2, 4])
def test_swiglu_fc1_gives_each_rank_its_gate_and_up(tp_size: int) -> None:
    gate, up = torch.randn(7, 3), torch.randn(7, 3)
    padded = -(-7 // tp_size) * tp_size
    fused = swiglu_fc1_hf_to_megatron(gate, up, tp_size, padded)
    assert fused.shape == (2 * padded, 3)
    per_rank = padded // tp_size
    for rank, chunk in enumerate(fused.chunk(tp_size)):
        rows = slice(rank * per_rank, (rank + 1) * per_rank)
        want_gate = torch.cat([gate, torch.zeros(padded - 7, 3)])[rows]
        want_up = torch.cat([up, torch.zeros(padded - 7, 3)])[rows]
        assert torch.equal(chunk, torch.cat([want_gate, want_up]))
    back_gate, back_up = swiglu_fc1_megatron_to_hf(fused, tp_size, 7)
    assert torch.equal(back_gate, gate) and torch.equal(back_up, up)


def _random_hf_state(config: VisionEncoderConfig) -> dict[str, torch.Tensor]:
    """Random HF-named vision weights of the right shapes (shapes from the mapping's inverse at TP=1)."""
    gen = torch.Generator().manual_seed(0)
    e, i, m = config.hidden_size, config.intermediate_size, config.merger_hidden_size
    kernel = (config.in_channels, config.temporal_patch_size, config.patch_size, config.patch_size)
    shapes = {"patch_embed.proj.weight": (e, *kernel)}
    for b in range(config.depth):
        p = f"blocks.{b}"
        shapes |= {f"{p}.norm1.weight": (e,), f"{p}.norm2.weight": (e,), f"{p}.attn.qkv.weight": (3 * e, e),
                   f"{p}.attn.qkv.bias": (3 * e,), f"{p}.attn.proj.weight": (e, e), f"{p}.attn.proj.bias": (e,)}
        if config.normalization == "LayerNorm":
            shapes |= {f"{p}.norm1.bias": (e,), f"{p}.norm2.bias": (e,)}
        names = ("gate_proj", "up_proj", "down_proj") if config.gated_mlp else ("fc1", "fc2")
        for name in names[:-1]:
            shapes |= {f"{p}.mlp.{name}.weight": (i, e), f"{p}.mlp.{name}.bias": (i,)}
        shapes |= {f"{p}.mlp.{names[-1]}.weight": (e, i), f"{p}.mlp.{names[-1]}.bias": (e,)}
    shapes |= {"merger.ln_q.weight": (e,), "merger.mlp.0.weight": (m, m), "merger.mlp.0.bias": (m,),
               "merger.mlp.2.weight": (config.out_hidden_size, m), "merger.mlp.2.bias": (config.out_hidden_size,)}
    if config.normalization == "LayerNorm":
        shapes["merger.ln_q.bias"] = (e,)
    return {name: torch.randn(shape, generator=gen) for name, shape in shapes.items()}


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl"])
@pytest.mark.parametrize("tp_size", [1, 2, 4])
def test_hf_to_megatron_round_trip(arch: str, tp_size: int) -> None:
    config = VisionEncoderConfig(arch=arch, depth=2, hidden_size=16, num_heads=4, intermediate_size=30,
                                 out_hidden_size=24, fullatt_block_indexes=[1], hidden_act="silu")
    hf_state = _random_hf_state(config)
    assert {n for m in vision_parameter_mappings(config) for n in m.hf_names} == set(hf_state)
    shards = [hf_vision_state_to_megatron(hf_state, config, rank, tp_size, prefix="") for rank in range(tp_size)]
    fc2_shape = shards[0]["decoder.layers.0.mlp.linear_fc2.weight"].shape
    assert fc2_shape == (16, config.padded_intermediate_size(tp_size) // tp_size)
    back = megatron_vision_state_to_hf(shards, config)
    assert set(back) == set(hf_state)
    for name, tensor in hf_state.items():
        assert torch.equal(back[name], tensor), name


def test_from_hf_reads_hub_configs() -> None:
    qwen2 = VisionEncoderConfig.from_hf(QWEN2_VL_7B_HUB, arch="qwen2_vl")
    assert (qwen2.hidden_size, qwen2.intermediate_size, qwen2.out_hidden_size) == (1280, 5120, 3584)
    assert (qwen2.hidden_act, qwen2.normalization, qwen2.uses_window_attention) == ("quick_gelu", "LayerNorm", False)
    qwen25 = VisionEncoderConfig.from_hf_model_config({"model_type": "qwen2_5_vl", "vision_config": QWEN2_5_VL_72B_HUB})
    assert (qwen25.out_hidden_size, qwen25.window_merged_tokens, qwen25.head_dim) == (8192, 4, 80)
    assert qwen25.fullatt_block_indexes == [7, 15, 23, 31]
    assert VisionEncoderConfig(intermediate_size=3420).padded_intermediate_size(8) == 3424


def test_bad_configs_are_rejected_with_the_field_named() -> None:
    with pytest.raises(ValueError, match="fullatt_block_indexes"):
        VisionEncoderConfig(depth=4, fullatt_block_indexes=[4])
    with pytest.raises(ValueError, match="hidden_act"):
        VisionEncoderConfig(hidden_act="relu6")
    with pytest.raises(ValueError, match="model_type"):
        VisionEncoderConfig.from_hf({"depth": 1, "num_heads": 1, "hidden_size": 8})
    like = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4, tensor_model_parallel_size=4)
    with pytest.raises(ValueError, match="num_heads"):
        vision_transformer_config(VisionEncoderConfig(hidden_size=48, num_heads=6), like)

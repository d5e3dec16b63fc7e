"""Vision geometry against transformers' helpers, and config reading."""

from __future__ import annotations

import pytest
import torch
from megatron.core.transformer import TransformerConfig
from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids, get_vision_window_index

from lmmrl_megatron.models.qwen_vl.vision_config import VisionEncoderConfig, vision_transformer_config
from lmmrl_megatron.models.qwen_vl.vision_geometry import VisionTokenLayout, patch_positions, window_order

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

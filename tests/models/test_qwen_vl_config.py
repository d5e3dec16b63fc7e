"""Reading Qwen-VL configs in both layouts, any size, and the Megatron decoder config they give."""

from __future__ import annotations

import copy

import pytest

from lmmrl_megatron.models.qwen_vl.config import (
    QwenVLBuildOptions,
    QwenVLConfig,
    decoder_transformer_config,
    kv_replication,
)
from lmmrl_megatron.parallel.layout import ShardLayout

# The hub's flat layout, as Qwen/Qwen2.5-VL-7B-Instruct ships it.
QWEN25_VL_7B = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl", "hidden_act": "silu",
    "hidden_size": 3584, "intermediate_size": 18944, "num_attention_heads": 28, "num_hidden_layers": 28,
    "num_key_value_heads": 4, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "max_position_embeddings": 128000,
    "sliding_window": 32768, "use_sliding_window": False, "tie_word_embeddings": False, "vocab_size": 152064,
    "vision_start_token_id": 151652, "vision_end_token_id": 151653, "image_token_id": 151655,
    "video_token_id": 151656, "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vision_config": {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420,
                      "num_heads": 16, "in_chans": 3, "out_hidden_size": 3584, "patch_size": 14,
                      "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
                      "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2, "temporal_patch_size": 2},
}
# As Qwen/Qwen2-VL-2B-Instruct ships it (tied embeddings, two KV heads).
QWEN2_VL_2B = {
    "model_type": "qwen2_vl", "hidden_size": 1536, "intermediate_size": 8960, "num_attention_heads": 12,
    "num_hidden_layers": 28, "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "tie_word_embeddings": True, "vocab_size": 151936, "image_token_id": 151655, "video_token_id": 151656,
    "vision_start_token_id": 151652, "vision_end_token_id": 151653,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vision_config": {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_chans": 3,
                      "hidden_size": 1536, "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14,
                      "temporal_patch_size": 2},
}


def _nested(flat: dict) -> dict:
    """The same config in transformers 5's nested layout."""
    text_keys = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "num_key_value_heads",
                 "rms_norm_eps", "vocab_size", "max_position_embeddings", "hidden_act", "use_sliding_window",
                 "sliding_window")
    nested = {k: v for k, v in flat.items() if k not in text_keys and k not in ("rope_scaling", "rope_theta")}
    nested["text_config"] = {k: flat[k] for k in text_keys if k in flat}
    nested["text_config"]["rope_parameters"] = {
        "rope_type": "default", "rope_theta": flat["rope_theta"], "mrope_section": flat["rope_scaling"]["mrope_section"]
    }
    return nested


@pytest.mark.parametrize("flat", [QWEN25_VL_7B, QWEN2_VL_2B], ids=["qwen2.5-vl-7b", "qwen2-vl-2b"])
def test_flat_and_nested_layouts_agree(flat: dict) -> None:
    assert QwenVLConfig.from_hf_dict(flat) == QwenVLConfig.from_hf_dict(_nested(flat))


def test_real_sizes() -> None:
    config = QwenVLConfig.from_hf_dict(QWEN25_VL_7B)
    assert (config.text.head_dim, config.text.num_layers, config.tie_word_embeddings) == (128, 28, False)
    assert config.vision.out_hidden_size == 3584 and config.vision.fullatt_block_indexes == [7, 15, 23, 31]
    assert config.rope_index_config.tokens_per_second == 2
    decoder = decoder_transformer_config(config, QwenVLBuildOptions(layout=ShardLayout(tp=4), dtype="bf16"))
    assert (decoder.num_query_groups, decoder.kv_channels, decoder.ffn_hidden_size) == (4, 128, 18944)
    assert decoder.add_qkv_bias and not decoder.add_bias_linear and decoder.gated_linear_unit
    assert decoder.mrope_section == [16, 24, 24] and decoder.normalization == "RMSNorm"
    assert QwenVLBuildOptions(layout=ShardLayout(tp=8)).padded_vocab_size(152064) == 152576  # next multiple of 128 * 8
    small = QwenVLConfig.from_hf_dict(QWEN2_VL_2B)
    assert small.tie_word_embeddings and small.rope_index_config.tokens_per_second is None
    assert small.vision.hidden_size == 1280 and small.vision.out_hidden_size == 1536
    tp4 = QwenVLBuildOptions(layout=ShardLayout(tp=4))
    assert decoder_transformer_config(small, tp4).num_query_groups == 4  # 2 KV heads, twice


def test_kv_replication() -> None:
    assert [kv_replication(2, tp) for tp in (1, 2, 4, 8)] == [1, 1, 2, 4]
    assert kv_replication(8, 4) == 1
    with pytest.raises(ValueError, match="tp=3 is not a multiple of num_key_value_heads=2"):
        kv_replication(2, 3)


def test_tied_embeddings_inside_text_config_count() -> None:
    nested = _nested(QWEN25_VL_7B)
    nested["text_config"]["tie_word_embeddings"] = True  # where transformers < 5 saved it
    assert QwenVLConfig.from_hf_dict(nested).tie_word_embeddings


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c.update(model_type="llava"), "model_type='llava' is not one of"),
        (lambda c: c.pop("rope_scaling"), "mrope_section"),
        (lambda c: c.update(use_sliding_window=True), "use_sliding_window=true is not supported"),
        (lambda c: c["rope_scaling"].update(mrope_section=[16, 24, 16]), "must be 3 sections summing to head_dim / 2"),
        (lambda c: c.pop("hidden_size"), "hidden_size is missing"),
        (lambda c: c["rope_scaling"].update(type="yarn"), "rope type 'yarn' is not supported"),
        (lambda c: c["vision_config"].update(out_hidden_size=1000), "merger outputs 1000 features"),
        (lambda c: c["vision_config"].pop("depth"), "vision_config"),
    ],
)
def test_bad_configs_name_the_key(edit, message: str) -> None:
    raw = copy.deepcopy(QWEN25_VL_7B)
    edit(raw)
    with pytest.raises(ValueError, match=message):
        QwenVLConfig.from_hf_dict(raw, source="ckpt/config.json")


def test_decoder_config_refuses_heads_tp_cannot_split() -> None:
    config = QwenVLConfig.from_hf_dict(QWEN25_VL_7B)
    with pytest.raises(ValueError, match="num_attention_heads=28 is not a multiple of tp=8"):
        decoder_transformer_config(config, QwenVLBuildOptions(layout=ShardLayout(tp=8)))

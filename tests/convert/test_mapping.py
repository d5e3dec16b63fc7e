"""The HF <-> Megatron mapping: bit-exact round trips for every rule, coverage, pipeline placement."""

from __future__ import annotations

import pytest
import torch

from lmmrl_megatron.convert.mapping import (
    Copy,
    FusedGateUp,
    FusedQKV,
    HeadQKV,
    PaddedSplit,
    PaddedVocab,
    hf_to_mcore_shard,
    local_mcore_name,
    mcore_shards_to_hf,
)
from lmmrl_megatron.models.qwen_vl.mapping import canonical_hf_name, exported_hf_names, qwen_vl_chunk_params, qwen_vl_params
from lmmrl_megatron.models.qwen_vl.config import QwenVLConfig
from lmmrl_megatron.parallel.layout import ShardLayout
from lmmrl_megatron.testing.make_tiny import apply_override, default_config_dict

ODD = ["text_config.num_key_value_heads=1", "tie_word_embeddings=true", "text_config.vocab_size=500"]
VARIANTS = [("qwen2_vl", []), ("qwen2_5_vl", []), ("qwen2_vl", ODD), ("qwen2_5_vl", ODD)]
VARIANT_IDS = ["qwen2_vl", "qwen2_5_vl", "qwen2_vl-odd", "qwen2_5_vl-odd"]


def _config_dict(arch: str, overrides: list[str]) -> dict:
    raw = default_config_dict(arch)
    for assignment in overrides:
        apply_override(raw, assignment)
    raw.update(image_token_id=12, video_token_id=13, vision_start_token_id=9, vision_end_token_id=10)
    return raw


def _hf_state(raw: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under the hub names and shapes transformers gives this config (lm_head dropped when tied)."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    hf_config = AutoConfig.for_model(**raw)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(hf_config)
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, tensor in model.state_dict().items():
        hub = canonical_hf_name(name)
        if hub == "lm_head.weight" and raw["tie_word_embeddings"]:
            continue
        state[hub] = torch.randn(tensor.shape, generator=generator)
    return state


@pytest.mark.parametrize(("arch", "overrides"), VARIANTS, ids=VARIANT_IDS)
def test_round_trip_is_bit_exact_for_every_rule(arch: str, overrides: list[str]) -> None:
    raw = _config_dict(arch, overrides)
    config = QwenVLConfig.from_hf_dict(raw)
    state = _hf_state(raw)
    params = qwen_vl_params(config)
    # Coverage: every HF tensor is exported by exactly one parameter, and nothing else is.
    exported = exported_hf_names(config)
    assert sorted(exported) == sorted(state), set(exported) ^ set(state)
    assert len(exported) == len(set(exported))
    kinds = {p.transform.kind for p in params}
    assert {"copy", "qkv", "gate_up", "vocab"} <= kinds
    for tp in (1, 2, 4):
        for param in params:
            shards = [hf_to_mcore_shard(param, state, rank, tp) for rank in range(tp)]
            if param.tp_dim is not None:
                assert len({tuple(s.shape) for s in shards}) == 1, param.mcore_name
            back = mcore_shards_to_hf(param, shards)
            assert list(back) == list(param.hf_names)
            for name, tensor in back.items():
                assert torch.equal(tensor, state[name]), f"{param.mcore_name} -> {name} at tp={tp}"


def test_fused_qkv_layout_per_query_group() -> None:
    """Megatron's order: for each group, its query heads, then k, then v; replicated KV when groups < tp."""
    head_dim, hidden = 2, 3
    q = torch.arange(4 * head_dim * hidden).reshape(4 * head_dim, hidden).float()  # heads q0..q3
    k = 100 + torch.arange(head_dim * hidden).reshape(head_dim, hidden).float()  # one KV head
    v = 200 + torch.arange(head_dim * hidden).reshape(head_dim, hidden).float()
    rule = FusedQKV(num_heads=4, num_kv_heads=1, head_dim=head_dim)
    rows = lambda t, head: t[head * head_dim : (head + 1) * head_dim]  # noqa: E731
    shard0 = rule.to_shard([q, k, v], 0, 2, "qkv")
    shard1 = rule.to_shard([q, k, v], 1, 2, "qkv")
    assert torch.equal(shard0, torch.cat([rows(q, 0), rows(q, 1), k, v]))
    assert torch.equal(shard1, torch.cat([rows(q, 2), rows(q, 3), k, v]))
    single = rule.to_shard([q, k, v], 0, 1, "qkv")
    assert torch.equal(single, torch.cat([q, k, v]))


def test_gate_up_and_vocab_layouts() -> None:
    gate, up = torch.arange(8.0).reshape(4, 2), 100 + torch.arange(8.0).reshape(4, 2)
    assert torch.equal(FusedGateUp().to_shard([gate, up], 1, 2, "fc1"), torch.cat([gate[2:], up[2:]]))
    table = torch.randn(5, 3)
    vocab = PaddedVocab(vocab_size=5, make_vocab_size_divisible_by=2)
    shards = [vocab.to_shard([table], rank, 2, "emb") for rank in range(2)]  # padded to 8 rows: 4 + 4
    assert torch.equal(shards[0], table[:4]) and torch.equal(shards[1][:1], table[4:])
    assert torch.equal(shards[1][1:], torch.zeros(3, 3))
    assert torch.equal(vocab.from_shards(shards, "emb")[0], table)
    with pytest.raises(ValueError, match="rows, but the config's vocab_size is 5"):
        vocab.to_shard([torch.randn(6, 3)], 0, 2, "emb")
    with pytest.raises(ValueError, match="does not split over tp=3"):
        Copy(tp_dim=0).to_shard([torch.randn(4, 2)], 0, 3, "w")


def test_head_qkv_groups_each_head_with_its_key_and_value() -> None:
    heads, head_dim = 3, 2
    rows = torch.arange(3 * heads * head_dim)  # HF: q heads, then k heads, then v heads
    packed = HeadQKV(num_heads=heads, head_dim=head_dim)
    ours = packed.to_shard([rows], 0, 1, "qkv")
    for h in range(heads):
        block = ours[h * 3 * head_dim : (h + 1) * 3 * head_dim]
        expected = [rows[(part * heads + h) * head_dim : (part * heads + h + 1) * head_dim] for part in range(3)]
        assert torch.equal(block, torch.cat(expected))
    weight = torch.randn(3 * heads * head_dim, 5)
    assert torch.equal(packed.from_shards([packed.to_shard([weight], 0, 1, "qkv")], "qkv")[0], weight)
    with pytest.raises(ValueError, match=r"qkv: dim 0 of shape \(17, 5\) is not the config's 18"):
        packed.to_shard([torch.randn(17, 5)], 0, 1, "qkv")


@pytest.mark.parametrize("tp_size", [1, 2, 4])
def test_gate_up_with_width_gives_each_rank_its_padded_gate_and_up(tp_size: int) -> None:
    gate, up = torch.randn(7, 3), torch.randn(7, 3)
    padded = -(-7 // tp_size) * tp_size
    fc1 = FusedGateUp(width=7)
    shards = [fc1.to_shard([gate, up], rank, tp_size, "fc1") for rank in range(tp_size)]
    assert torch.cat(shards).shape == (2 * padded, 3)
    per_rank = padded // tp_size
    for rank, shard in enumerate(shards):
        rows = slice(rank * per_rank, (rank + 1) * per_rank)
        want_gate = torch.cat([gate, torch.zeros(padded - 7, 3)])[rows]
        want_up = torch.cat([up, torch.zeros(padded - 7, 3)])[rows]
        assert torch.equal(shard, torch.cat([want_gate, want_up]))
    back_gate, back_up = fc1.from_shards(shards, "fc1")
    assert torch.equal(back_gate, gate) and torch.equal(back_up, up)


@pytest.mark.parametrize("tp_dim", [0, 1])
def test_padded_split_pads_to_a_multiple_of_tp_and_drops_the_padding_back(tp_dim: int) -> None:
    tensor = torch.randn(7, 7)
    split = PaddedSplit(size=7, tp_dim=tp_dim)
    shards = [split.to_shard([tensor], rank, 4, "fc2") for rank in range(4)]
    assert all(shard.shape[tp_dim] == 2 for shard in shards)
    assert torch.equal(torch.cat(shards, dim=tp_dim).narrow(tp_dim, 7, 1), torch.zeros(7, 7).narrow(tp_dim, 0, 1))
    assert torch.equal(split.from_shards(shards, "fc2")[0], tensor)
    with pytest.raises(ValueError, match="is not the config's 7"):
        split.to_shard([torch.randn(6, 6)], 0, 4, "fc2")


def test_shape_mismatch_names_the_parameter() -> None:
    config = QwenVLConfig.from_hf_dict(_config_dict("qwen2_vl", []))
    qkv = next(p for p in qwen_vl_params(config) if p.mcore_name == "language_model.decoder.layers.0.self_attention.linear_qkv.weight")
    tensors = {name: torch.zeros(8, 64) for name in qkv.hf_names}
    with pytest.raises(ValueError, match=r"layers.0.self_attention.linear_qkv.weight \(q\): shape \(8, 64\)"):
        hf_to_mcore_shard(qkv, tensors, 0, 1)
    vision_qkv = next(p for p in qwen_vl_params(config) if p.mcore_name.endswith("layers.0.self_attention.linear_qkv.weight"))
    with pytest.raises(ValueError, match="vision_model.decoder.layers.0.self_attention.linear_qkv.weight"):
        hf_to_mcore_shard(vision_qkv, {name: torch.zeros(8, 32) for name in vision_qkv.hf_names}, 0, 1)


def test_transformers5_names_map_to_hub_names() -> None:
    assert canonical_hf_name("model.language_model.layers.3.mlp.up_proj.weight") == "model.layers.3.mlp.up_proj.weight"
    assert canonical_hf_name("model.language_model.embed_tokens.weight") == "model.embed_tokens.weight"
    assert canonical_hf_name("model.visual.blocks.0.attn.qkv.weight") == "visual.blocks.0.attn.qkv.weight"
    assert canonical_hf_name("lm_head.weight") == "lm_head.weight"


def test_chunk_params_place_embedding_vision_and_tied_copy() -> None:
    config = QwenVLConfig.from_hf_dict(_config_dict("qwen2_5_vl", ODD))  # tied
    layout = ShardLayout(pp=2, num_layers_in_first_pipeline_stage=1)
    first = qwen_vl_chunk_params(config, layout, 0)
    last = qwen_vl_chunk_params(config, layout, 1)
    first_names = {p.mcore_name for p in first}
    last_names = {p.mcore_name for p in last}
    assert "language_model.embedding.word_embeddings.weight" in first_names
    assert "language_model.output_layer.weight" in last_names and "language_model.output_layer.weight" not in first_names
    assert not any(n.startswith("vision_model.") for n in last_names)
    assert all(p.layer == 0 for p in first if p.placement == "decoder_layer")
    tied_copy = next(p for p in last if p.mcore_name == "language_model.output_layer.weight")
    assert tied_copy.hf_names == ("model.embed_tokens.weight",) and not tied_copy.exported
    layer2 = next(p for p in last if p.layer == 2)
    assert local_mcore_name(layer2, layer_offset=1).startswith("language_model.decoder.layers.1.")
    single = {p.mcore_name for p in qwen_vl_chunk_params(config, ShardLayout(), 0)}
    assert "language_model.output_layer.weight" not in single  # PP=1 ties by sharing the embedding itself


def test_meta_device_72b_shapes_without_memory() -> None:
    """A 72B-shaped config maps on the meta device: shard shapes at TP=8 come out without allocating."""
    raw = _config_dict("qwen2_5_vl", [])
    raw["text_config"].update(hidden_size=8192, intermediate_size=29568, num_hidden_layers=80, num_attention_heads=64,
                              num_key_value_heads=8, vocab_size=152064)
    raw["text_config"]["rope_parameters"]["mrope_section"] = [16, 24, 24]
    raw["vision_config"]["out_hidden_size"] = 8192
    config = QwenVLConfig.from_hf_dict(raw)
    params = [p for p in qwen_vl_params(config) if p.layer in (None, 0)]
    text = config.text
    expected = {
        "language_model.embedding.word_embeddings.weight": (152576 // 8, 8192),  # padded to a multiple of 1024
        "language_model.decoder.layers.0.self_attention.linear_qkv.weight": ((64 + 16) * 128 // 8, 8192),
        "language_model.decoder.layers.0.mlp.linear_fc1.weight": (2 * 29568 // 8, 8192),
        "language_model.decoder.layers.0.self_attention.linear_proj.weight": (8192, 8192 // 8),
    }
    shapes = {}
    for param in params:
        if not param.mcore_name.startswith("language_model."):
            continue
        hf = {name: torch.empty(_hf_shape(name, text), device="meta") for name in param.hf_names}
        shapes[param.mcore_name] = tuple(hf_to_mcore_shard(param, hf, 7, 8).shape)
    for name, shape in expected.items():
        assert shapes[name] == shape, name


def _hf_shape(name: str, text) -> tuple[int, ...]:
    head_dim = text.head_dim
    table = {
        "q_proj.weight": (text.num_attention_heads * head_dim, text.hidden_size),
        "k_proj.weight": (text.num_key_value_heads * head_dim, text.hidden_size),
        "v_proj.weight": (text.num_key_value_heads * head_dim, text.hidden_size),
        "q_proj.bias": (text.num_attention_heads * head_dim,),
        "k_proj.bias": (text.num_key_value_heads * head_dim,),
        "v_proj.bias": (text.num_key_value_heads * head_dim,),
        "o_proj.weight": (text.hidden_size, text.hidden_size),
        "gate_proj.weight": (text.intermediate_size, text.hidden_size),
        "up_proj.weight": (text.intermediate_size, text.hidden_size),
        "down_proj.weight": (text.hidden_size, text.intermediate_size),
        "embed_tokens.weight": (text.vocab_size, text.hidden_size),
        "lm_head.weight": (text.vocab_size, text.hidden_size),
    }
    for suffix, shape in table.items():
        if name.endswith(suffix):
            return shape
    return (text.hidden_size,)


def test_transformer_engine_names_fuse_the_decoder_norms() -> None:
    config = QwenVLConfig.from_hf_dict(_config_dict("qwen2_5_vl", []))
    local = {p.mcore_name: p.hf_names for p in qwen_vl_params(config, "local")}
    te = {p.mcore_name: p.hf_names for p in qwen_vl_params(config, "transformer_engine")}
    layer = "language_model.decoder.layers.3."
    assert te[layer + "self_attention.linear_qkv.layer_norm_weight"] == local[layer + "input_layernorm.weight"]
    assert te[layer + "mlp.linear_fc1.layer_norm_weight"] == local[layer + "pre_mlp_layernorm.weight"]
    assert not any(n.startswith("language_model.") and "layernorm.weight" in n and "final" not in n for n in te)
    assert sorted(exported_hf_names(config, "transformer_engine")) == sorted(exported_hf_names(config, "local"))

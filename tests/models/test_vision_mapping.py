"""The vision tower's rules: HF -> Megatron TP shards -> HF is bit-exact for both families, the MLP padded to TP."""

from __future__ import annotations

import pytest
import torch

from lmmrl_megatron.convert.mapping import hf_to_mcore_shard, mcore_shards_to_hf
from lmmrl_megatron.models.qwen_vl.mapping import HF_VISION, VISION, vision_rules
from lmmrl_megatron.models.qwen_vl.vision_config import VisionEncoderConfig


def _random_hf_state(config: VisionEncoderConfig) -> dict[str, torch.Tensor]:
    """Random vision weights under their hub names (`visual.*`), of the shapes transformers gives `config`."""
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
    return {HF_VISION + name: torch.randn(shape, generator=gen) for name, shape in shapes.items()}


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl"])
@pytest.mark.parametrize("tp_size", [1, 2, 4])
def test_hf_to_megatron_round_trip(arch: str, tp_size: int) -> None:
    config = VisionEncoderConfig(arch=arch, depth=2, hidden_size=16, num_heads=4, intermediate_size=30,
                                 out_hidden_size=24, fullatt_block_indexes=[1], hidden_act="silu")
    hf_state = _random_hf_state(config)
    params = [rule.bind() for rule in vision_rules(config)]
    assert {n for param in params for n in param.hf_names} == set(hf_state)
    assert all(param.placement == "first" and param.mcore_name.startswith(VISION) for param in params)
    shards = {param.mcore_name: [hf_to_mcore_shard(param, hf_state, rank, tp_size) for rank in range(tp_size)]
              for param in params}
    fc2_shape = shards[VISION + "decoder.layers.0.mlp.linear_fc2.weight"][0].shape
    assert fc2_shape == (16, config.padded_intermediate_size(tp_size) // tp_size)
    back = {}
    for param in params:
        back |= mcore_shards_to_hf(param, shards[param.mcore_name])
    assert set(back) == set(hf_state)
    for name, tensor in hf_state.items():
        assert torch.equal(back[name], tensor), name

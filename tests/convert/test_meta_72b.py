"""The 72B configs at TP=8, PP=4, on the meta device: every HF tensor maps onto our shards exactly, nothing is left
over on either side, and the converter's layout-free checkpoint has the keys and global shapes those shards load.

No memory is allocated: transformers' model and ours are built on the meta device, and the 32-rank world is
PyTorch's fake process group in this one process (collectives are no-ops; only ranks and group sizes matter).
TP ranks 0 and 7 of every pipeline stage are built (all TP ranks have the same shapes; the first and last are
checked to be sure), and the TP=1, PP=1 model gives the converter's checkpoint template.
"""

from __future__ import annotations

import resource
from pathlib import Path

import pytest
import torch

from lmmrl_megatron.convert.dcp_stream import CheckpointTemplate, template_from_sharded_state_dict
from lmmrl_megatron.convert.hf_io import TensorSpec, expected_hf_specs
from lmmrl_megatron.convert.mapping import hf_to_mcore_shard, mcore_shards_to_hf
from lmmrl_megatron.models.qwen_vl.checkpoint_model import build_meta_model
from lmmrl_megatron.models.qwen_vl.config import QwenVLConfig
from lmmrl_megatron.parallel.layout import ShardLayout
from lmmrl_megatron.plan.meta import fake_world, meta_chunk

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "models"
TP, PP = 8, 4
LAYOUT = ShardLayout(tp=TP, pp=PP)


def _check_chunk(model, hf_specs: dict[str, TensorSpec], tp_rank: int) -> set[str]:
    """Every parameter of the chunk is mapped, its shard has our shape, and the shards map back to HF shapes.
    Returns the HF tensors the chunk's parameters are made of."""
    from lmmrl_megatron.models.qwen_vl.loading import chunk_mapped_params

    params = dict(model.named_parameters())
    # Only the decoder's RMSNorm weights (created on an explicit CPU device by models/qwen_vl/spec.py) are real:
    # under 1 MB per stage. Everything else must be meta.
    real_bytes = sum(p.numel() * p.element_size() for p in params.values() if p.device.type != "meta")
    assert real_bytes < 1 << 20, f"{real_bytes} bytes of parameters were allocated"
    mapped = chunk_mapped_params(model)
    assert sorted(name for name, _ in mapped) == sorted(params), "model and mapping disagree on the chunk's params"
    used = set()
    for local_name, param in mapped:
        missing = [name for name in param.hf_names if name not in hf_specs]
        assert not missing, f"{param.mcore_name} needs HF tensors the checkpoint would not have: {missing}"
        hf = {name: torch.empty(hf_specs[name].shape, dtype=torch.bfloat16, device="meta") for name in param.hf_names}
        shard = hf_to_mcore_shard(param, hf, tp_rank, TP)
        ours = tuple(params[local_name].shape)
        assert tuple(shard.shape) == ours, (local_name, tuple(shard.shape), ours)
        back = mcore_shards_to_hf(param, [shard] * TP)
        assert {name: tuple(t.shape) for name, t in back.items()} == {n: hf_specs[n].shape for n in param.hf_names}
        used.update(param.hf_names)
    return used


def _global_shapes(template: CheckpointTemplate) -> dict[str, tuple[tuple[int, ...], bool]]:
    return {c.key: (c.global_shape, c.allow_shape_mismatch) for c in template.chunks}


@pytest.mark.parametrize("name", ["qwen2_vl_72b", "qwen2_5_vl_72b"])
def test_72b_at_tp8_pp4_maps_exactly_on_meta(name: str) -> None:
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    config_dir = CONFIGS / name
    hf_specs = expected_hf_specs(config_dir)
    assert sum(torch.Size(s.shape).numel() for s in hf_specs.values()) > 70e9  # really the 72B shapes
    config = QwenVLConfig.from_hf_dir(config_dir)
    with fake_world(ShardLayout(), 0, 0):
        converter_template = template_from_sharded_state_dict(build_meta_model(config, "bf16").sharded_state_dict())
        converter_shapes = _global_shapes(converter_template)
    used: set[str] = set()
    stage_keys: set[str] = set()
    for pp_rank in range(PP):
        for tp_rank in (0, TP - 1):
            with fake_world(LAYOUT, tp_rank, pp_rank):
                model = meta_chunk(config, LAYOUT, pp_rank)
                used |= _check_chunk(model, hf_specs, tp_rank)
                chunk_shapes = _global_shapes(template_from_sharded_state_dict(model.sharded_state_dict()))
            for key, (shape, vocab_padded) in chunk_shapes.items():
                want, _ = converter_shapes[key]
                if vocab_padded:  # padded to a multiple of 128 * tp: only the padding may differ
                    assert shape[1:] == want[1:] and shape[0] >= want[0] >= config.text.vocab_size, key
                else:
                    assert shape == want, (key, shape, want)
            stage_keys |= set(chunk_shapes)
    assert used == set(hf_specs), f"HF tensors no parameter uses: {sorted(set(hf_specs) - used)[:5]}"
    assert stage_keys == set(converter_shapes), "the converter's checkpoint and the TP=8, PP=4 model differ in keys"
    rss_growth_gb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024**2
    assert rss_growth_gb < 2, f"building on meta grew the peak RSS by {rss_growth_gb:.1f} GB"

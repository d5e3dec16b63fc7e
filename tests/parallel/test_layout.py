"""The one layout type: its checks, the data-parallel size it leaves, and the pipeline arithmetic against Megatron."""

from __future__ import annotations

import pytest
import torch

from lmmrl_megatron.parallel.layout import ShardLayout


@pytest.mark.parametrize(("fields", "message"), [
    ({"tp": 0}, "tp must be >= 1, got 0"),
    ({"pp": 0}, "pp must be >= 1, got 0"),
    ({"vpp": 2}, "vpp=2 needs vpp >= 2 and pp >= 2 (pp=1)"),
    ({"pp": 2, "vpp": 1}, "vpp=1 needs vpp >= 2 and pp >= 2 (pp=2)"),
    ({"sequence_parallel": True}, "sequence_parallel needs tp > 1"),
])
def test_layouts_megatron_refuses_are_value_errors(fields: dict, message: str) -> None:
    with pytest.raises(ValueError) as error:
        ShardLayout(**fields)
    assert str(error.value) == message


def test_data_parallel_size_is_what_the_world_leaves() -> None:
    layout = ShardLayout(tp=2, pp=2)
    assert (layout.model_parallel_size, layout.data_parallel_size(8)) == (4, 2)
    with pytest.raises(ValueError, match=r"world_size=6 is not a multiple of tp\*pp=4"):
        layout.data_parallel_size(6)


def test_first_and_last_chunks_with_virtual_stages() -> None:
    layout = ShardLayout(pp=2, vpp=2)
    assert layout.vp_stages == [0, 1] and ShardLayout().vp_stages == [None]
    assert layout.is_first_chunk(0, 0) and not layout.is_first_chunk(0, 1) and not layout.is_first_chunk(1, 0)
    assert layout.is_last_chunk(1, 1) and not layout.is_last_chunk(1, 0) and not layout.is_last_chunk(0, 1)
    assert ShardLayout().is_first_chunk(0) and ShardLayout().is_last_chunk(0)


@pytest.mark.parametrize(("num_layers", "layout", "message"), [
    (8, ShardLayout(num_layers_in_first_pipeline_stage=2), "need pp > 1"),
    (8, ShardLayout(pp=3), "8 decoder layers do not split evenly over the 3"),
    (8, ShardLayout(pp=2, num_layers_in_first_pipeline_stage=9), "cannot be split with first=9"),
    (6, ShardLayout(pp=2, vpp=2), "pipeline stage 0 holds 3 layers, not a multiple of vpp=2"),
])
def test_layers_that_cannot_be_split_name_why(num_layers: int, layout: ShardLayout, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        layout.decoder_layer_range(num_layers, 0)


LAYOUTS = [
    (8, ShardLayout(pp=2)),
    (8, ShardLayout(pp=4)),
    (8, ShardLayout(pp=2, vpp=2)),
    (12, ShardLayout(pp=3, vpp=2)),
    (10, ShardLayout(pp=3, num_layers_in_first_pipeline_stage=2)),
    (10, ShardLayout(pp=3, num_layers_in_last_pipeline_stage=2)),
    (9, ShardLayout(pp=3, num_layers_in_first_pipeline_stage=1, num_layers_in_last_pipeline_stage=2)),
    (8, ShardLayout(pp=2, num_layers_in_first_pipeline_stage=3)),
    (16, ShardLayout(pp=4, vpp=2, num_layers_in_first_pipeline_stage=2, num_layers_in_last_pipeline_stage=2)),
]


@pytest.mark.parametrize(("num_layers", "layout"), LAYOUTS)
def test_layer_placement_matches_megatron(num_layers: int, layout: ShardLayout) -> None:
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    config = TransformerConfig(
        num_layers=num_layers, hidden_size=8, num_attention_heads=2, pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp, pipeline_dtype=torch.float32,
        num_layers_in_first_pipeline_stage=layout.num_layers_in_first_pipeline_stage,
        num_layers_in_last_pipeline_stage=layout.num_layers_in_last_pipeline_stage,
    )
    seen: list[int] = []
    for pp_rank in range(layout.pp):
        for vp_stage in layout.vp_stages:
            ours = layout.decoder_layer_range(num_layers, pp_rank, vp_stage)
            offset = get_transformer_layer_offset(config, vp_stage=vp_stage, pp_rank=pp_rank)
            count = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
            assert (ours.start, len(ours)) == (offset, count), (pp_rank, vp_stage)
            seen += list(ours)
    assert sorted(seen) == list(range(num_layers))

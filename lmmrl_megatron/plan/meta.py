"""Our model built on the meta device at any TP x PP layout, one rank at a time, in this one process.

No memory and no weights: parameters are meta tensors and the world is PyTorch's fake process group (collectives
are no-ops; only ranks and group sizes matter). `tests/convert/test_meta_72b.py` checks the mapping on it and
`tests/plan` checks `params.stage_params` against `meta_stage_counts`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator

import torch

from lmmrl_megatron.models.qwen_vl.config import QwenVLConfig
from lmmrl_megatron.parallel.layout import ShardLayout


@contextlib.contextmanager
def fake_world(layout: ShardLayout, tp_rank: int, pp_rank: int) -> Iterator[None]:
    """A fake process group of tp * pp ranks seen from rank (tp_rank, pp_rank), with Megatron's parallel state."""
    from megatron.core import parallel_state as ps
    from torch.testing._internal.distributed.fake_pg import FakeStore

    tp, pp = layout.tp, layout.pp
    rank = pp_rank * tp + tp_rank  # Megatron's default order: TP varies fastest, PP slowest (no DP here)
    torch.distributed.init_process_group("fake", store=FakeStore(), rank=rank, world_size=layout.model_parallel_size)
    try:
        # No gloo side groups: torch 2.11's fake backend cannot build them (and nothing here uses them).
        ps.initialize_model_parallel(
            tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, create_gloo_process_groups=False
        )
        assert (ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()) == (tp_rank, pp_rank)
        yield
    finally:
        ps.destroy_model_parallel()
        torch.distributed.destroy_process_group()


def meta_chunk(config: QwenVLConfig, layout: ShardLayout, pp_rank: int):
    """This rank's chunk of our model on the meta device, a whole pipeline stage (`layout` without virtual stages;
    call inside `fake_world(layout, ..., pp_rank)`)."""
    from lmmrl_megatron.models.qwen_vl.checkpoint_model import build_meta_model

    return build_meta_model(config, "bf16", layout=layout, pp_rank=pp_rank)


def meta_stage_counts(config: QwenVLConfig, layout: ShardLayout) -> list[dict[str, int]]:
    """Per pipeline stage, the parameters of its TP rank 0 as built: {"total", "vision"}."""
    # Whole stages, as `params.stage_params` counts them: a stage's virtual chunks hold its layers together.
    stages = dataclasses.replace(layout, vpp=None)
    counts = []
    for pp_rank in range(stages.pp):
        with fake_world(stages, 0, pp_rank):
            model = meta_chunk(config, stages, pp_rank)
            vision = model.vision_model
            counts.append({
                "total": sum(p.numel() for p in model.parameters()),
                "vision": sum(p.numel() for p in vision.parameters()) if vision is not None else 0,
            })
    return counts

"""Megatron-Core's parallel state at a layout: its process groups and model-parallel RNG, set up the same way by
every entry point that trains or runs the model in an initialised `torch.distributed` world (the trainer's
policy workers, the local test ranks)."""

from __future__ import annotations

import torch

from lmmrl_megatron.parallel.layout import ShardLayout


def init_megatron_parallel(layout: ShardLayout, seed: int = 1234) -> None:
    """Initialise Megatron-Core's TP / PP / virtual-PP groups and seed its RNGs (torch's and the model-parallel
    tracker's), in an already initialised process group (NCCL or gloo)."""
    from megatron.core import parallel_state, tensor_parallel

    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp,
    )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)

"""A one-process "distributed" world with Megatron-Core's parallel state at TP=1, PP=1, for offline tools.

The converters build the model once on the meta device to learn the checkpoint's layout, and read checkpoints
through Megatron's loader; both expect `torch.distributed` and Megatron's parallel groups to exist. A world of one
gloo process (in-memory store, no network) satisfies them without spawning ranks.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch


@contextlib.contextmanager
def single_process_megatron() -> Iterator[None]:
    """Initialise a world of one process at TP=1, PP=1 for the duration of the block (reuse one that exists)."""
    from megatron.core import parallel_state

    if torch.distributed.is_initialized():
        if torch.distributed.get_world_size() != 1:
            raise RuntimeError("the offline converters run in a single process, not inside a multi-rank job")
        created_group = False
    else:
        torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
        created_group = True
    created_state = not parallel_state.model_parallel_is_initialized()
    if created_state:
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
    try:
        yield
    finally:
        if created_state:
            parallel_state.destroy_model_parallel()
        if created_group:
            torch.distributed.destroy_process_group()

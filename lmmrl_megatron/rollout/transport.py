"""Which transport carries the trainer's weights to the rollout engines (`trainer/weight_sync.py` implements them).

A pure function of the config, so the planner (`plan/memory.py`) can account for the transport's buffers
without importing the trainer.
"""

from __future__ import annotations

from typing import Literal

Transport = Literal["cuda_ipc", "broadcast", "object_store"]


def choose_transport(requested: str, use_gpu: bool, colocated: bool) -> Transport:
    """`auto`: CUDA IPC when engines share the trainer's GPUs, a broadcast when they have GPUs of their own, the
    object store on CPU."""
    if requested == "auto":
        if not use_gpu:
            return "object_store"
        return "cuda_ipc" if colocated else "broadcast"
    assert requested != "cuda_ipc" or (use_gpu and colocated), "RunConfig refuses cuda_ipc without colocated GPUs"
    return requested  # type: ignore[return-value]


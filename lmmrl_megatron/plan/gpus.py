"""The GPUs the planner knows: usable memory as the driver reports it, dense bf16 peak, HBM bandwidth."""

from __future__ import annotations

from dataclasses import dataclass

GiB = 1024**3


@dataclass(frozen=True)
class GPU:
    name: str
    memory_bytes: int  # torch.cuda.get_device_properties().total_memory
    bf16_tflops: float  # dense
    hbm_tb_per_s: float


GPUS: dict[str, GPU] = {
    gpu.name: gpu
    for gpu in (
        GPU("H100-80GB", 81_559 * 2**20, 989.0, 3.35),
        GPU("H200-141GB", 143_771 * 2**20, 989.0, 4.8),
        GPU("A100-80GB", 81_920 * 2**20, 312.0, 2.0),
    )
}


def get_gpu(name: str) -> GPU:
    if name not in GPUS:
        raise ValueError(f"--gpu {name!r} is not one of {sorted(GPUS)}")
    return GPUS[name]


def gpu_from_memory(total_memory: int, name: str = "this GPU") -> GPU:
    """A GPU known only by its memory (the trainer's start-up check reads it from the device): the H100's speeds."""
    return GPU(name, total_memory, 989.0, 3.35)

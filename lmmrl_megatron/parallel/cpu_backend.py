"""The CPU backend: lets Megatron-Core's training stack run on CPU with gloo.

Megatron-Core assumes CUDA in a handful of places that have nothing to do with the maths: tensors created with
`device=torch.cuda.current_device()` or `device="cuda"` (rotary inv_freq, causal masks, schedule counters),
`.cuda()` calls, `Tensor.type()` string checks against `torch.cuda.FloatTensor` (optimizer, grad clipping),
streams/events/synchronize, and the CUDA RNG tracker. This module redirects each of them to the CPU, so tests can
run real tensor/pipeline/data parallelism in N local processes, and the trainer can run the embedded default
(`trainer.num_gpus_per_node: 0`) on a machine without a GPU. It is installed only in processes that have no GPU
to use — the test harness and CPU trainer workers — and never changes anything on a GPU run.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_installed_mode: TorchFunctionMode | None = None


def _is_accelerator_device(device: Any) -> bool:
    """True for anything Megatron uses to mean "the GPU": 'cuda', 'cuda:0', torch.device('cuda'), or an index."""
    if isinstance(device, bool):
        return False
    if isinstance(device, int):
        return True
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return False


class _CpuDeviceMode(TorchFunctionMode):
    """Rewrites CUDA device arguments to CPU in every torch call made while it is active."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # Megatron checks e.g. `param.type() == 'torch.cuda.FloatTensor'`; report what a GPU tensor would.
            return func(*args).replace("torch.", "torch.cuda.", 1)
        if _is_accelerator_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.to and len(args) > 1 and _is_accelerator_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        return func(*args, **kwargs)


class _CpuStream:
    """Stands in for torch.cuda.Stream / Event: on CPU every operation is already complete when it returns."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None

    def query(self) -> bool:
        return True

    def elapsed_time(self, other: Any) -> float:
        return 0.0


def _install_cpu_rng_tracker() -> None:
    """Replace Megatron's CUDA RNG tracker with one that forks the CPU generator."""
    from megatron.core.tensor_parallel import random as mcore_random

    def get_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
        return torch.get_rng_state()

    def set_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False) -> None:
        torch.set_rng_state(new_state)

    class CpuRNGStatesTracker(mcore_random.CudaRNGStatesTracker):
        def add(self, name: str, seed: int) -> None:
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            self.seeds_.add(seed)
            self.states_[name] = torch.Generator().manual_seed(seed).get_state()

        @contextlib.contextmanager
        def fork(self, name: str = mcore_random._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            orig_state = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(orig_state)

    mcore_random._get_cuda_rng_state = get_state
    mcore_random._set_cuda_rng_state = set_state
    mcore_random._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True


def install_cpu_backend() -> None:
    """Make Megatron-Core's CUDA-only code paths run on CPU in this process (idempotent)."""
    global _installed_mode
    if _installed_mode is not None:
        return
    cuda = torch.cuda
    cuda.current_device = lambda: 0  # an index; the mode maps it to CPU wherever it is used as a device
    cuda.synchronize = lambda *args, **kwargs: None
    cuda.empty_cache = lambda: None
    cuda.Stream = _CpuStream
    cuda.Event = _CpuStream
    cuda.current_stream = lambda *args, **kwargs: _CpuStream()
    cuda.default_stream = lambda *args, **kwargs: _CpuStream()
    cuda.stream = lambda *args, **kwargs: contextlib.nullcontext()
    cuda.get_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    cuda.set_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)
    cuda.manual_seed = lambda seed: None
    _install_cpu_rng_tracker()
    _installed_mode = _CpuDeviceMode()
    _installed_mode.__enter__()

"""Timing helpers for GPU benchmarks: per-step clocks, the measured matmul peak, and a one-step kernel profile.

    clock = Clock("cuda"); seconds = clock.time(step)         # CUDA events on GPU, the host clock on CPU
    peak = matmul_peak("cuda", torch.bfloat16, 8192)          # FLOP/s of an n^3 product, mean of timed runs
    summary = profile_step(step, "label", "cuda")             # GPU time by kernel category, top kernels
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch


class Clock:
    """Per-step timing: CUDA events on GPU, the host clock on CPU."""

    def __init__(self, device: str) -> None:
        self.cuda = device == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def time(self, fn: Callable[[], Any]) -> float:
        if not self.cuda:
            start = time.perf_counter()
            fn()
            return time.perf_counter() - start
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3


def time_steps(step: Callable[[], Any], clock: Clock, warmup: int, iters: int) -> list[float]:
    """Seconds of each of `iters` calls of `step` after `warmup` untimed ones."""
    for _ in range(warmup):
        step()
    clock.sync()
    return [clock.time(step) for _ in range(iters)]


def matmul_peak(device: str, dtype: torch.dtype, n: int, warmup: int = 5, iters: int = 20) -> float:
    """FLOP/s of an n^3 matmul on random data: mean over `iters` timed products after `warmup`."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    clock = Clock(device)
    for _ in range(warmup):
        a @ b
    clock.sync()
    seconds = [clock.time(lambda: a @ b) for _ in range(iters)]
    return 2.0 * n**3 / (sum(seconds) / len(seconds))


def _category(name: str) -> str:
    n = name.lower()
    if any(k in n for k in ("flash", "fmha", "attention", "sdpa", "cudnn")):
        return "attention"
    if any(k in n for k in ("gemm", "nvjet", "xmma", "cutlass", "cublas", "matmul")):
        return "matmul"
    if "nccl" in n:
        return "nccl"
    if any(k in n for k in ("index", "scatter", "gather", "nonzero")):
        return "index/scatter/gather"
    if any(k in n for k in ("reduce", "softmax", "norm", "logsumexp", "cross_entropy")):
        return "reduce/softmax/norm"
    if any(k in n for k in ("copy", "cat", "memcpy", "memset", "fill")):
        return "copy/cat/fill"
    return "elementwise/other"


def profile_step(step: Callable[[], None], label: str, device: str, top: int = 15) -> dict:
    """One profiled step: GPU time by kernel category, the top kernels, kernel count and GPU idle share."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    clock = Clock(device)
    clock.sync()
    with profile(activities=activities) as prof:
        wall = clock.time(step)
        clock.sync()
    kernels: list[tuple[str, float, int]] = []
    for evt in prof.key_averages():
        on_gpu = getattr(evt, "device_type", None) == torch.autograd.DeviceType.CUDA
        if device == "cuda" and not on_gpu:
            continue
        us = getattr(evt, "self_device_time_total", 0.0) if device == "cuda" else evt.self_cpu_time_total
        if us > 0:
            kernels.append((evt.key, us / 1e3, evt.count))
    kernels.sort(key=lambda k: -k[1])
    busy = sum(ms for _, ms, _ in kernels)
    by_cat: dict[str, float] = {}
    for name, ms, _ in kernels:
        by_cat[_category(name)] = by_cat.get(_category(name), 0.0) + ms
    print(f"\n  profile {label}: step {wall * 1e3:.1f} ms (profiled), GPU busy {busy:.1f} ms, "
          f"{sum(c for _, _, c in kernels)} kernel launches", flush=True)
    for cat, ms in sorted(by_cat.items(), key=lambda kv: -kv[1]):
        print(f"    {cat:24s} {ms:8.1f} ms {ms / max(busy, 1e-9):6.1%}")
    for name, ms, count in kernels[:top]:
        print(f"    {ms:8.2f} ms x{count:<5d} {name[:110]}")
    return dict(step_ms=wall * 1e3, busy_ms=busy, launches=sum(c for _, _, c in kernels), by_category=by_cat,
                top=[dict(name=n, ms=ms, count=c) for n, ms, c in kernels[:top]])

"""The colocated swap of a trained learner's optimizer state through host buffers allocated once.

While a colocated rollout engine generates, the policy keeps only its weights on the device. Its fp32 main
parameters and Adam moments (`exp_avg`, `exp_avg_sq`, ...) are copied byte for byte into host chunks and their
device storage is freed (`untyped_storage().resize_(0)`); `onload` re-grows each storage and copies the bytes
back. The tensor objects never change, so the optimizer, its state dict and every view keep pointing at them
and the next step runs bit-exactly as without the swap.

Why not Megatron-Core's `optimizer.offload_to_cpu()` (0.19): it calls `.cpu()` per tensor (a fresh pageable
allocation every step, ~1-3 GB/s) and reassigns `p.data`, which in fp32 would move the model's own weights out
of DDP's parameter buffer. Its `optimizer_cpu_offload` runs the Adam step on the host instead, another design.

The host memory is pinned on CUDA (full-bandwidth DMA, asynchronous copies) and allocated on the first offload,
growing only if the state grows (Adam's moments appear at the first step). It is cut into chunks of
`chunk_bytes` (torch's pinned allocator rounds every allocation up to a power of two: one 45 GB buffer would
pin 64 GB); a storage may span chunks. On the host (tests, CPU runs) the same code moves the storages into
plain host chunks, so the resize/copy logic is what the CPU tests exercise.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor

DEFAULT_CHUNK_BYTES = 1 << 30


@dataclass
class SwapStats:
    """One direction of one swap: the bytes copied and where the time went (seconds, device synchronised)."""

    bytes: int = 0
    copy_s: float = 0.0  # the copies between the device storages and the host chunks
    memory_s: float = 0.0  # freeing (offload) or re-allocating (onload) device storage, gradient buffers included
    alloc_s: float = 0.0  # host chunks allocated (and pinned) by this call: the first offload only

    @property
    def seconds(self) -> float:
        return self.copy_s + self.memory_s + self.alloc_s

    @property
    def gbps(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0

    def __add__(self, other: "SwapStats") -> "SwapStats":
        return SwapStats(self.bytes + other.bytes, self.copy_s + other.copy_s, self.memory_s + other.memory_s,
                         self.alloc_s + other.alloc_s)


def _byte_view(storage: torch.UntypedStorage) -> Tensor:
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def optimizer_state_tensors(optimizer) -> list[Tensor]:
    """Every tensor a Megatron optimizer (chained or not) holds: its parameter groups' (main) params and state."""
    inner = [opt.optimizer for opt in getattr(optimizer, "chained_optimizers", [optimizer])]
    tensors: list[Tensor] = []
    for opt in inner:
        if opt is None:  # a stub optimizer (a rank without parameters)
            continue
        for group in opt.param_groups:
            tensors.extend(p for p in group["params"] if isinstance(p, Tensor))
        for state in opt.state.values():
            tensors.extend(v for v in state.values() if isinstance(v, Tensor))
    return tensors


class HostSwap:
    """Moves a set of device storages to host chunks and back; the chunks are kept and reused."""

    def __init__(self, device: torch.device, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
        assert chunk_bytes > 0
        self.device = device
        self.chunk_bytes = chunk_bytes
        self.chunks: list[Tensor] = []
        self._swapped: list[tuple[torch.UntypedStorage, int]] = []  # (storage, its size in bytes) while offloaded

    @property
    def capacity(self) -> int:
        return sum(c.numel() for c in self.chunks)

    def _grow(self, total: int) -> float:
        if self.capacity >= total:
            return 0.0
        start = time.perf_counter()
        pin = self.device.type == "cuda"
        while self.capacity < total:
            size = min(self.chunk_bytes, total - self.capacity)
            self.chunks.append(torch.empty(size, dtype=torch.uint8, pin_memory=pin))
        return time.perf_counter() - start

    def _pieces(self, sizes: list[int]):
        """(index of the storage, its byte range, chunk, the chunk's byte range) for the storages laid end to end."""
        chunk, chunk_off = 0, 0
        for index, size in enumerate(sizes):
            done = 0
            while done < size:
                if chunk_off == self.chunks[chunk].numel():
                    chunk, chunk_off = chunk + 1, 0
                n = min(size - done, self.chunks[chunk].numel() - chunk_off)
                yield index, done, done + n, self.chunks[chunk], chunk_off, chunk_off + n
                done, chunk_off = done + n, chunk_off + n

    def offload(self, tensors: list[Tensor], keep: set[int]) -> SwapStats:
        """Copy the distinct storages of `tensors` on this device (but those whose data_ptr is in `keep`) to the
        host chunks and free them."""
        assert not self._swapped, "offload() twice without onload()"
        seen: set[int] = set()
        storages: list[torch.UntypedStorage] = []
        for t in tensors:
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if t.device != self.device or storage.nbytes() == 0 or ptr in keep or ptr in seen:
                continue
            seen.add(ptr)
            storages.append(storage)
        sizes = [s.nbytes() for s in storages]
        stats = SwapStats(bytes=sum(sizes), alloc_s=self._grow(sum(sizes)))
        start = time.perf_counter()
        views = [_byte_view(s) for s in storages]
        for index, lo, hi, chunk, c_lo, c_hi in self._pieces(sizes):
            chunk[c_lo:c_hi].copy_(views[index][lo:hi], non_blocking=True)
        _sync(self.device)  # the host copy must be complete before the device memory can be handed away
        stats.copy_s = time.perf_counter() - start
        start = time.perf_counter()
        del views
        for storage in storages:
            storage.resize_(0)
        stats.memory_s = time.perf_counter() - start
        self._swapped = list(zip(storages, sizes))
        return stats

    def onload(self) -> SwapStats:
        """Re-grow every swapped storage and copy its bytes back from the host chunks."""
        swapped, self._swapped = self._swapped, []
        start = time.perf_counter()
        for storage, size in swapped:
            storage.resize_(size)
        _sync(self.device)
        stats = SwapStats(bytes=sum(size for _, size in swapped), memory_s=time.perf_counter() - start)
        start = time.perf_counter()
        views = [_byte_view(storage) for storage, _ in swapped]
        for index, lo, hi, chunk, c_lo, c_hi in self._pieces([size for _, size in swapped]):
            views[index][lo:hi].copy_(chunk[c_lo:c_hi], non_blocking=True)
        _sync(self.device)
        stats.copy_s = time.perf_counter() - start
        return stats

"""2D rotary embedding of the vision tower, in Megatron's rotary convention.

Each head's dim is split as [row freqs, column freqs, row freqs, column freqs] (head_dim/4 each): angles are
`row * inv_freq` and `col * inv_freq`, concatenated, then duplicated, which is exactly the non-interleaved layout
Megatron's `apply_rotary_pos_emb` expects (`x * cos + rotate_half(x) * sin`, rotate_half over the full head dim),
so `SelfAttention` can apply it from a `[tokens, 1, 1, head_dim]` frequency tensor.
"""

from __future__ import annotations

import torch
from torch import Tensor


class VisionRotaryEmbedding(torch.nn.Module):
    """Angles for (row, column) patch positions; no parameters."""

    def __init__(self, head_dim: int, theta: float = 10000.0) -> None:
        super().__init__()
        axis_dim = head_dim // 2
        # A plain attribute, not a buffer: a bf16 cast of the module must not round the frequencies.
        self.inv_freq = 1.0 / (theta ** (torch.arange(0, axis_dim, 2, dtype=torch.float32) / axis_dim))
        self._inv_freq_by_device: dict[torch.device, Tensor] = {}  # copied once: a copy per step would sync

    def forward(self, positions: Tensor) -> Tensor:
        """`positions` [n, 2] (row, column) -> float32 angles [n, 1, 1, head_dim]."""
        inv_freq = self._inv_freq_by_device.get(positions.device)
        if inv_freq is None:
            inv_freq = self._inv_freq_by_device.setdefault(positions.device, self.inv_freq.to(positions.device))
        angles = (positions.to(torch.float32)[..., None] * inv_freq).flatten(1)  # [n, head_dim/2]: rows, columns
        return torch.cat([angles, angles], dim=-1)[:, None, None, :]

"""Where every patch of a batch of images sits: rotary positions, attention segments and the window order.

Everything here is computed from `image_grid_thw` alone with vectorised tensor ops on the host (no loop over
patches, images or windows), once per batch; the encoder moves the results to its device in one go. The data
loader may build the layout itself and hand it to the encoder.

Patch order. The processor emits each frame's patches block-major over `merge x merge` blocks (the four
patches of one output token are consecutive). Qwen2.5-VL additionally processes merged tokens window by window:
`window_index[i]` is the merged token processed at position i; `reverse_window_index` undoes it after the merger.
Windows never straddle frames, so per-frame segments stay contiguous in window order too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from lmmrl_megatron.models.attention import HostPackedSeqParams, PackedSegments
from lmmrl_megatron.models.qwen_vl.vision_config import VisionEncoderConfig


@dataclass(frozen=True)
class VisionTokenLayout:
    """Per-batch geometry of the vision tower's token axis (see the module docstring)."""

    num_patches: int
    rotary_positions: Tensor  # [num_patches, 2] (row, column) of each patch, in processing order
    full_attention: HostPackedSeqParams  # one segment per frame
    window_attention: HostPackedSeqParams | None  # one segment per window (Qwen2.5-VL)
    window_index: Tensor | None  # [num_merged] merged token processed at each position
    reverse_window_index: Tensor | None  # [num_merged] inverse permutation of window_index

    @staticmethod
    def build(image_grid_thw: Tensor, config: VisionEncoderConfig) -> "VisionTokenLayout":
        """Layout of a batch on the host; `image_grid_thw` is `[num_images, 3]` (t, h, w in patches)."""
        grid = image_grid_thw.detach().to("cpu", torch.int64)
        _check_grid(grid, config.spatial_merge_size)
        positions = patch_positions(grid, config.spatial_merge_size)
        full = _packed_params(frame_lengths(grid))
        if not config.uses_window_attention:
            return VisionTokenLayout(int(positions.size(0)), positions, full, None, None, None)
        window_index, window_sizes = window_order(grid, config.spatial_merge_size, config.window_merged_tokens)
        merge_unit = config.merge_unit
        positions = positions.view(-1, merge_unit, 2)[window_index].view(-1, 2)
        return VisionTokenLayout(
            num_patches=int(positions.size(0)),
            rotary_positions=positions,
            full_attention=full,
            window_attention=_packed_params(window_sizes * merge_unit),
            window_index=window_index,
            reverse_window_index=torch.argsort(window_index),
        )

    def to(self, device: torch.device | str) -> "VisionTokenLayout":
        """The same layout with its tensors on `device` (host-side segment bounds are kept)."""

        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else _to_device(t, device)

        return VisionTokenLayout(
            num_patches=self.num_patches,
            rotary_positions=move(self.rotary_positions),
            full_attention=_move_params(self.full_attention, device),
            window_attention=None if self.window_attention is None else _move_params(self.window_attention, device),
            window_index=move(self.window_index),
            reverse_window_index=move(self.reverse_window_index),
        )


def _check_grid(grid: Tensor, merge: int) -> None:
    if grid.dim() != 2 or grid.size(1) != 3:
        raise ValueError(f"image_grid_thw must be [num_images, 3], got shape {tuple(grid.shape)}")
    if (grid <= 0).any():
        raise ValueError(f"image_grid_thw has non-positive entries: {grid.tolist()}")
    if (grid[:, 1:] % merge != 0).any():
        raise ValueError(f"image_grid_thw h/w must be multiples of spatial_merge_size={merge}: {grid.tolist()}")


def frame_lengths(grid: Tensor) -> Tensor:
    """Patches per frame, frames of all images in order: each frame is one full-attention segment."""
    return torch.repeat_interleave(grid[:, 1] * grid[:, 2], grid[:, 0])


def _exclusive_cumsum(values: Tensor) -> Tensor:
    return F.pad(values.cumsum(0), (1, 0))[:-1]


def patch_positions(grid: Tensor, merge: int) -> Tensor:
    """(row, column) of every patch in the processor's block-major order, for all frames of all images."""
    lengths = frame_lengths(grid)
    frame_width = torch.repeat_interleave(grid[:, 2], grid[:, 0])
    within = torch.arange(int(lengths.sum())) - torch.repeat_interleave(_exclusive_cumsum(lengths), lengths)
    blocks_per_row = torch.repeat_interleave(frame_width // merge, lengths)
    block = within // (merge * merge)
    row = (block // blocks_per_row) * merge + (within // merge) % merge
    col = (block % blocks_per_row) * merge + within % merge
    return torch.stack([row, col], dim=-1)


def window_order(grid: Tensor, merge: int, window: int) -> tuple[Tensor, Tensor]:
    """Qwen2.5-VL's window order of merged tokens and the size (in merged tokens) of each non-empty window.

    Within a frame, windows of `window x window` merged tokens are numbered row-major (edge windows may be
    partial) and tokens inside a window keep raster order; frames follow one another.
    """
    rows = torch.repeat_interleave(grid[:, 1] // merge, grid[:, 0])  # merged rows per frame
    cols = torch.repeat_interleave(grid[:, 2] // merge, grid[:, 0])
    tokens = rows * cols
    windows_per_row = -(-cols // window)
    windows = -(-rows // window) * windows_per_row
    within = torch.arange(int(tokens.sum())) - torch.repeat_interleave(_exclusive_cumsum(tokens), tokens)
    token_cols = torch.repeat_interleave(cols, tokens)
    local_window = (within // token_cols // window) * torch.repeat_interleave(windows_per_row, tokens) + (
        within % token_cols
    ) // window
    global_window = torch.repeat_interleave(_exclusive_cumsum(windows), tokens) + local_window
    # Tokens are already in frame then raster order, so a stable sort by window keeps raster order inside it.
    window_index = torch.argsort(global_window, stable=True)
    sizes = torch.bincount(global_window, minlength=int(windows.sum()))
    return window_index, sizes[sizes > 0]


def _packed_params(lengths: Tensor) -> HostPackedSeqParams:
    lengths = lengths.to(torch.int64)
    cu = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    starts = cu[:-1].tolist()
    sizes = lengths.tolist()
    max_len = max(sizes) if sizes else 0
    return HostPackedSeqParams(
        qkv_format="sbhd",  # the tower runs [tokens, 1, hidden]; see lmmrl_megatron.models.attention
        cu_seqlens_q=cu,
        cu_seqlens_kv=cu,
        max_seqlen_q=max_len,
        max_seqlen_kv=max_len,
        host_segments=PackedSegments(starts_q=starts, lengths_q=sizes, starts_kv=starts, lengths_kv=sizes),
    )


def _to_device(t: Tensor, device: torch.device | str) -> Tensor:
    """Host tensor to `device`; through pinned memory for CUDA so the copy neither blocks nor syncs the stream."""
    if torch.device(device).type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _move_params(params: HostPackedSeqParams, device: torch.device | str) -> HostPackedSeqParams:
    cu = _to_device(params.cu_seqlens_q, device)
    return HostPackedSeqParams(
        qkv_format=params.qkv_format,
        cu_seqlens_q=cu,
        cu_seqlens_kv=cu,  # the same object: self-attention
        max_seqlen_q=params.max_seqlen_q,
        max_seqlen_kv=params.max_seqlen_kv,
        host_segments=params.host_segments,
    )

"""3D (temporal, height, width) position ids of Qwen-VL's multimodal rotary embedding, for a padded batch.

    position_ids, deltas = get_rope_index(input_ids, RopeIndexConfig(...), image_grid_thw=..., attention_mask=...)

Semantics (Qwen2-VL and Qwen2.5-VL, `get_rope_index` in the reference implementation):
- padding (attention_mask == 0) is skipped; every sample counts from 0 at its first valid token, so left and right
  padding give the same positions to the same tokens. Padded positions get 0.
- a text token takes the running position p on all three axes and advances it by 1.
- an image (a block of t*h*w / merge**2 consecutive `<|image_pad|>` tokens) at running position p gives its token
  (ti, hi, wi) of the merged grid the position (p + ti, p + hi, p + wi) in row-major (t, h, w) order, and advances
  the running position by max(t, h, w) of the merged grid (the next text token follows the largest position + 1).
- a video block works like an image, but its temporal positions are ti * interval (truncated to an integer), with
  interval = tokens_per_second * second_per_grid_ts[video] for Qwen2.5-VL and 1 for Qwen2-VL; the running position
  then moves to the block's largest position + 1. This is the original Qwen release's rule (and vLLM's); transformers
  5.x advances by max(h, w) after a video instead, which differs only for videos longer than they are wide.
- images are taken from `image_grid_thw` in batch order (sample by sample, left to right), videos from
  `video_grid_thw` likewise; the number of pad tokens must equal what the grids need.

`deltas[b] = max position of sample b + 1 - number of valid tokens of b`: the offset that continues positions for
generated tokens (position of the k-th generated token = number of valid tokens + k + delta).

The computation is vectorised over the whole batch; only the grid bookkeeping is per image.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class RopeIndexConfig:
    """Which token ids mark vision inputs and how the vision tower shrinks their grids."""

    image_token_id: int
    video_token_id: int | None = None
    spatial_merge_size: int = 2
    # Qwen2.5-VL only: temporal position units per second of video; None for Qwen2-VL (interval 1).
    tokens_per_second: float | None = None

    def __post_init__(self) -> None:
        if self.spatial_merge_size < 1:
            raise ValueError(f"spatial_merge_size must be >= 1, got {self.spatial_merge_size}")


@dataclass(frozen=True)
class _VisionBlocks:
    """Every vision item of one modality in batch order: its token count, merged grid and temporal interval."""

    num_tokens: Tensor  # [num_items] long
    grid: Tensor  # [num_items, 3] long: merged (t, h, w)
    interval: Tensor  # [num_items] float32


def _merged_grids(grid_thw: Tensor, merge: int, what: str) -> Tensor:
    grid = grid_thw.to(torch.long).reshape(-1, 3)
    if bool(((grid[:, 1:] % merge) != 0).any()):
        raise ValueError(f"{what}: height and width must be multiples of spatial_merge_size={merge}, got {grid.tolist()}")
    return torch.stack([grid[:, 0], grid[:, 1] // merge, grid[:, 2] // merge], dim=1)


def _blocks(grid_thw: Tensor | None, interval: Tensor | None, merge: int, what: str) -> _VisionBlocks | None:
    if grid_thw is None or grid_thw.numel() == 0:
        return None
    grid = _merged_grids(grid_thw, merge, what)
    if interval is None:
        interval = torch.ones(grid.shape[0], dtype=torch.float32)
    interval = interval.to(torch.float32).reshape(-1)
    if interval.numel() != grid.shape[0]:
        raise ValueError(f"{what}: {interval.numel()} time intervals for {grid.shape[0]} videos")
    return _VisionBlocks(num_tokens=grid.prod(dim=1), grid=grid, interval=interval)


def _place_blocks(
    is_token: Tensor, sample_of: Tensor, blocks: _VisionBlocks | None, what: str
) -> tuple[Tensor, Tensor, Tensor] | None:
    """Assign the flat vision tokens of one modality to their blocks.

    Returns (flat indices of the tokens, their local (t, h, w) positions [3, n], block advance placed on the
    block's last token as (index, value)) or None when the modality is absent. Raises ValueError when the token
    counts and the grids disagree, or when a block is not a run of consecutive tokens of one sample.
    """
    token_index = torch.nonzero(is_token, as_tuple=False).flatten()
    num_tokens = token_index.numel()
    expected = 0 if blocks is None else int(blocks.num_tokens.sum())
    if num_tokens != expected:
        num_items = 0 if blocks is None else blocks.num_tokens.numel()
        raise ValueError(
            f"{what}: the batch has {num_tokens} pad tokens but the {num_items} grids need {expected} "
            f"(t*h*w / merge**2 each)"
        )
    if blocks is None:
        return None
    sizes = blocks.num_tokens
    block_of = torch.repeat_interleave(torch.arange(sizes.numel()), sizes)
    block_start = torch.cumsum(sizes, 0) - sizes
    first = token_index[block_start]
    last = token_index[block_start + sizes - 1]
    contiguous = (last - first + 1 == sizes) & (sample_of[first] == sample_of[last])
    if not bool(contiguous.all()):
        bad = int(torch.nonzero(~contiguous)[0])
        raise ValueError(
            f"{what} {bad}: its {int(sizes[bad])} pad tokens are not one consecutive run within a sample; "
            f"check that grids and placeholders are in the same order"
        )
    local = torch.arange(num_tokens) - block_start[block_of]
    grid = blocks.grid[block_of]
    h, w = grid[:, 1], grid[:, 2]
    t_index = local // (h * w)
    t_pos = (t_index.to(torch.float32) * blocks.interval[block_of]).to(torch.long)
    positions = torch.stack([t_pos, (local // w) % h, local % w])
    # Next position after the block = its largest position + 1 (relative to the block start).
    t_last = ((blocks.grid[:, 0] - 1).to(torch.float32) * blocks.interval).to(torch.long)
    advance = torch.maximum(torch.maximum(t_last, blocks.grid[:, 1] - 1), blocks.grid[:, 2] - 1) + 1
    return token_index, positions, torch.stack([last, advance])


def get_rope_index(
    input_ids: Tensor,
    rope_config: RopeIndexConfig,
    image_grid_thw: Tensor | None = None,
    attention_mask: Tensor | None = None,
    video_grid_thw: Tensor | None = None,
    second_per_grid_ts: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Position ids [3, B, S] and generation deltas [B, 1] for a padded batch (see the module docstring).

    input_ids: [B, S]; image_grid_thw / video_grid_thw: [num_items, 3] patch grids (before merging) in batch order;
    attention_mask: [B, S], nonzero where the token is real; second_per_grid_ts: [num_videos] (Qwen2.5-VL).
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
    device = input_ids.device
    # Host-side bookkeeping (a few small tensors); the result goes back to the inputs' device.
    ids = input_ids.cpu()
    image_grid_thw = image_grid_thw.cpu() if image_grid_thw is not None else None
    video_grid_thw = video_grid_thw.cpu() if video_grid_thw is not None else None
    valid = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask.cpu() != 0
    if valid.shape != ids.shape:
        raise ValueError(f"attention_mask shape {tuple(valid.shape)} != input_ids shape {tuple(ids.shape)}")
    batch_size = ids.shape[0]
    flat_ids = ids[valid]
    sample_of = torch.nonzero(valid, as_tuple=False)[:, 0]
    num_valid = valid.sum(dim=1)

    interval = None
    if video_grid_thw is not None and rope_config.tokens_per_second is not None:
        num_videos = video_grid_thw.reshape(-1, 3).shape[0]
        seconds = torch.ones(num_videos) if second_per_grid_ts is None else second_per_grid_ts.cpu().to(torch.float32)
        interval = rope_config.tokens_per_second * seconds
    merge = rope_config.spatial_merge_size
    image = _place_blocks(
        flat_ids == rope_config.image_token_id, sample_of, _blocks(image_grid_thw, None, merge, "image"), "image"
    )
    is_video = (
        flat_ids == rope_config.video_token_id
        if rope_config.video_token_id is not None
        else torch.zeros_like(flat_ids, dtype=torch.bool)
    )
    video = _place_blocks(is_video, sample_of, _blocks(video_grid_thw, interval, merge, "video"), "video")

    # Running position: text tokens advance by 1, a vision block by its extent, booked on its last token.
    advance = torch.ones_like(flat_ids)
    local = torch.zeros(3, flat_ids.numel(), dtype=torch.long)
    for placed in (image, video):
        if placed is None:
            continue
        token_index, positions, (last, block_advance) = placed
        advance[token_index] = 0
        advance[last] = block_advance
        local[:, token_index] = positions
    inclusive = torch.cumsum(advance, 0)
    exclusive = inclusive - advance
    # Restart the count at each sample's first valid token.
    sample_first = torch.cumsum(num_valid, 0) - num_valid
    has_tokens = num_valid > 0
    sample_offset = torch.zeros(batch_size, dtype=torch.long)
    sample_offset[has_tokens] = exclusive[sample_first[has_tokens]]
    start = exclusive - sample_offset[sample_of]
    flat_positions = start.unsqueeze(0) + local

    position_ids = torch.zeros(3, *ids.shape, dtype=ids.dtype)
    position_ids[:, valid] = flat_positions.to(ids.dtype)
    max_position = torch.full((batch_size,), -1, dtype=torch.long)
    if flat_ids.numel():
        max_position = max_position.scatter_reduce(0, sample_of, flat_positions.max(dim=0).values, reduce="amax")
    deltas = torch.where(has_tokens, max_position + 1 - num_valid, torch.zeros_like(num_valid))
    return position_ids.to(device), deltas.unsqueeze(1).to(device)

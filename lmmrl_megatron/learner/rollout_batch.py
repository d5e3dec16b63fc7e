"""The sequences of one RL step as one batch: right-padded response tensors with their mask, and per-token columns.

The controller builds a `RolloutBatch` once from the rollout engines' outputs (the only padding of the step), fills its
columns as whole [N, R] tensors (old and reference log-probs, values, advantages, returns), selects the rows it
trains on, splits them into mini-batches and ships each to the policy ranks as one object. Each rank packs its
data-parallel share (`shard`) into micro-batches (`learner/micro_batch.py` reads the batch directly) and answers
with `RowValues` for those rows; `RowValues.merge` puts the shards' answers back into row order.

Prompts are kept once each, ragged, not padded: the n responses of a prompt point to it (`prompt_index`), so its
token ids and images are shared by its rows, never copied; micro-batch packing places a row's prompt and response
side by side without padding between them, so a padded prompt tensor would only be unpadded again; and nothing in
the step computes over prompt tokens.

The batch is always as wide as its longest response (`select` and `split` drop the columns that become all
padding), so every [N, R] computation of the step sees exactly the widths it would see on the rows alone.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

# The per-token columns, [N, R] float32 each (0 on padding) or None until the step computes them.
TOKEN_FIELDS = ("rollout_logprobs", "old_logprobs", "ref_logprobs", "advantages", "returns", "old_values")


@dataclass(frozen=True)
class PromptInputs:
    """What the model reads of one prompt: its token ids and its processed images (shared by its n rows)."""

    ids: Tensor  # [P] long
    pixel_values: Tensor | None = None  # [num_patches, patch_dim]
    image_grid_thw: Tensor | None = None  # [num_images, 3]


@dataclass
class RolloutBatch:
    """N rows (responses) of a step, padded to the longest; built by `from_rows`, columns set with
    `dataclasses.replace` (which checks their shape)."""

    prompts: list[PromptInputs]  # each prompt once
    prompt_index: Tensor  # [N] long: the prompt of each row
    response_ids: Tensor  # [N, R] long, right-padded with 0
    response_mask: Tensor  # [N, R] float32, 1 on response tokens
    rollout_logprobs: Tensor | None = None  # the rollout engines' log-probs of the sampled tokens
    old_logprobs: Tensor | None = None  # the policy's, before this step's update
    ref_logprobs: Tensor | None = None  # the reference model's (KL)
    advantages: Tensor | None = None
    returns: Tensor | None = None
    old_values: Tensor | None = None  # the critic's, before this step's update

    def __post_init__(self) -> None:
        if self.response_ids.dim() != 2:
            raise ValueError(f"response_ids must be [rows, width], got shape {tuple(self.response_ids.shape)}")
        shape = tuple(self.response_ids.shape)
        index = self.prompt_index
        if tuple(index.shape) != shape[:1]:
            raise ValueError(f"prompt_index must have one entry per row ({shape[0]}), got shape {tuple(index.shape)}")
        if len(index) and not 0 <= int(index.min()) <= int(index.max()) < len(self.prompts):
            raise ValueError(f"prompt_index must point into the {len(self.prompts)} prompts")
        for name in ("response_mask", *TOKEN_FIELDS):
            value = getattr(self, name)
            if value is not None and tuple(value.shape) != shape:
                raise ValueError(f"{name} must have response_ids' shape {shape}, got {tuple(value.shape)}")

    @classmethod
    def from_rows(
        cls, prompts: list[PromptInputs], prompt_index: list[int], response_ids: list[Tensor], **per_token: list[Tensor]
    ) -> "RolloutBatch":
        """Pad ragged rows: `response_ids[i]` answers `prompts[prompt_index[i]]`; `per_token` names columns of
        TOKEN_FIELDS, each a list of one 1-D tensor per row as long as that row's response."""
        if len(prompt_index) != len(response_ids):
            raise ValueError(f"prompt_index has {len(prompt_index)} rows, response_ids {len(response_ids)}")
        lengths = [r.numel() for r in response_ids]
        width = max(lengths, default=0)
        columns = {}
        for name, rows in per_token.items():
            if name not in TOKEN_FIELDS:
                raise ValueError(f"unknown per-token field {name!r}; expected one of {TOKEN_FIELDS}")
            columns[name] = _pad_rows(name, rows, lengths, width, torch.float32)
        return cls(
            prompts=list(prompts),
            prompt_index=torch.tensor(prompt_index, dtype=torch.long),
            response_ids=_pad_rows("response_ids", response_ids, lengths, width, torch.long),
            response_mask=_pad_rows("response_mask", [torch.ones(n) for n in lengths], lengths, width, torch.float32),
            **columns,
        )

    # -- what a row is ------------------------------------------------------------------------------------------
    @property
    def num_rows(self) -> int:
        return self.response_ids.shape[0]

    @property
    def width(self) -> int:
        return self.response_ids.shape[1]

    @property
    def response_lengths(self) -> Tensor:
        """[N] long: the response tokens of each row."""
        return self.response_mask.sum(dim=1).long()

    def prompt(self, row: int) -> PromptInputs:
        return self.prompts[int(self.prompt_index[row])]

    def response(self, row: int) -> Tensor:
        """Row `row`'s response tokens, unpadded (a view)."""
        return self.response_ids[row, : int(self.response_lengths[row])]

    def token_fields(self) -> list[str]:
        """The per-token columns this batch carries, in TOKEN_FIELDS order."""
        return [name for name in TOKEN_FIELDS if getattr(self, name) is not None]

    def num_tokens(self) -> list[int]:
        """Prompt plus response tokens of each row: the length of its packed sequence."""
        prompt_lengths = [p.ids.numel() for p in self.prompts]
        return [prompt_lengths[p] + n for p, n in zip(self.prompt_index.tolist(), self.response_lengths.tolist())]

    # -- rows in, rows out ----------------------------------------------------------------------------------------
    def select(self, rows: list[int]) -> "RolloutBatch":
        """The batch of these rows, in this order: only their prompts (the same objects: images not copied), as
        wide as their longest response."""
        index = torch.tensor(rows, dtype=torch.long)
        kept_prompts = sorted(set(self.prompt_index[index].tolist()))
        renumber = {old: new for new, old in enumerate(kept_prompts)}
        width = int(self.response_lengths[index].max()) if rows else 0
        columns = {
            name: value[index, :width]
            for name in ("response_ids", "response_mask", *TOKEN_FIELDS)
            if (value := getattr(self, name)) is not None
        }
        prompt_index = torch.tensor([renumber[p] for p in self.prompt_index[index].tolist()], dtype=torch.long)
        return replace(self, prompts=[self.prompts[p] for p in kept_prompts], prompt_index=prompt_index, **columns)

    def split(self, size: int) -> list["RolloutBatch"]:
        """Consecutive batches of `size` rows (the last may be shorter): the step's mini-batches."""
        if size < 1:
            raise ValueError(f"split size must be >= 1, got {size}")
        starts = range(0, self.num_rows, size)
        return [self.select(list(range(start, min(start + size, self.num_rows)))) for start in starts]

    def shard(self, rank: int, world_size: int) -> list[int]:
        """The rows of data-parallel rank `rank`: every `world_size`-th one. Ranks pack their rows from the whole
        batch (every rank receives the same object) so that their answers name rows of this batch."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        return list(range(rank, self.num_rows, world_size))


def _pad_rows(name: str, rows: list[Tensor], lengths: list[int], width: int, dtype: torch.dtype) -> Tensor:
    if len(rows) != len(lengths):
        raise ValueError(f"{name} has {len(rows)} rows, the batch {len(lengths)}")
    out = torch.zeros(len(rows), width, dtype=dtype)
    for row, (values, length) in enumerate(zip(rows, lengths)):
        if values.dim() != 1 or values.numel() != length:
            raise ValueError(f"{name}: row {row} has shape {tuple(values.shape)}, its response {length} tokens")
        out[row, :length] = values
    return out


@dataclass
class RowValues:
    """Per-token results of a forward pass over some rows of a batch, in that batch's width."""

    rows: Tensor  # [M] long: the rows of the batch these values belong to
    values: Tensor  # [M, R] float32: log-probs (policy head) or values (value head), 0 on padding
    entropy: Tensor | None = None  # [M, R] float32 (policy head only)

    @staticmethod
    def merge(parts: list["RowValues"]) -> "RowValues":
        """The data-parallel shards' answers as one, in row order 0..N-1 (each row answered exactly once)."""
        rows = torch.cat([p.rows for p in parts])
        order = torch.argsort(rows)
        assert torch.equal(rows[order], torch.arange(len(rows))), "every row of the batch is answered exactly once"
        with_entropy = {p.entropy is not None for p in parts}
        assert len(with_entropy) == 1, "all shards answer with entropy or none does"
        entropy = torch.cat([p.entropy for p in parts])[order] if with_entropy == {True} else None
        return RowValues(rows[order], torch.cat([p.values for p in parts])[order], entropy)

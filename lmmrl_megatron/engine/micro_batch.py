"""Sequences of one RL step, and their grouping into micro-batches by a token budget.

Token-level fields are aligned with *prediction positions*: entry t of a [B, S] field belongs to `labels[t]`,
the token at position t + 1 of `input_ids`. A response token j of a sample whose prompt has P tokens sits at
position P + j and is predicted at position P + j - 1, so its per-token values go there.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor


@dataclass
class Sample:
    """One response of one prompt, with whatever per-token values the step has computed so far."""

    prompt_ids: Tensor  # [P]
    response_ids: Tensor  # [R]
    pixel_values: Tensor | None = None  # the prompt's, shared by the n samples of one prompt (not copied)
    image_grid_thw: Tensor | None = None
    # per response token, [R] each
    rollout_logprobs: Tensor | None = None
    old_logprobs: Tensor | None = None
    ref_logprobs: Tensor | None = None
    advantages: Tensor | None = None
    returns: Tensor | None = None
    old_values: Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return self.prompt_ids.numel() + self.response_ids.numel()


TOKEN_FIELDS = ("rollout_logprobs", "old_logprobs", "ref_logprobs", "advantages", "returns", "old_values")


@dataclass
class MicroBatch:
    input_ids: Tensor  # [B, S] right-padded
    labels: Tensor  # [B, S] next token of each position (0 past the end)
    attention_mask: Tensor  # [B, S] 1 for real tokens
    loss_mask: Tensor  # [B, S] 1 where labels[t] is a response token
    sample_index: Tensor  # [B] index of each row in the step's list of samples
    pixel_values: Tensor | None = None  # images of all rows, in row order
    image_grid_thw: Tensor | None = None
    # per-token values aligned with labels, [B, S] float, present when the samples carry them
    rollout_logprobs: Tensor | None = None
    old_logprobs: Tensor | None = None
    ref_logprobs: Tensor | None = None
    advantages: Tensor | None = None
    returns: Tensor | None = None
    old_values: Tensor | None = None

    @property
    def num_rows(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device: torch.device | str) -> "MicroBatch":
        """The same micro-batch with every tensor on `device` (the model's); a no-op on the tensors' own device."""
        moved = {
            f.name: value.to(device, non_blocking=True) if isinstance(value, Tensor) else value
            for f in fields(self)
            for value in [getattr(self, f.name)]
        }
        return MicroBatch(**moved)


def split_by_token_budget(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Group sample indices into micro-batches whose padded size (rows x longest row) fits `max_tokens`.

    Samples are taken longest first so rows of similar length share a micro-batch (little padding); a sample
    longer than the budget still gets a micro-batch of its own.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    groups: list[list[int]] = []
    for index in order:
        if groups and (len(groups[-1]) + 1) * lengths[groups[-1][0]] <= max_tokens:
            groups[-1].append(index)
        else:
            groups.append([index])
    return groups


def collate(samples: list[Sample], indices: list[int], pad_token_id: int = 0) -> MicroBatch:
    """Right-pad the chosen samples into one micro-batch with every per-token field aligned to labels."""
    rows = [samples[i] for i in indices]
    seq_len = max(s.num_tokens for s in rows)
    batch = len(rows)
    input_ids = torch.full((batch, seq_len), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, seq_len), dtype=torch.long)
    loss_mask = torch.zeros((batch, seq_len), dtype=torch.float32)
    present = [name for name in TOKEN_FIELDS if getattr(rows[0], name) is not None]
    token_fields = {name: torch.zeros((batch, seq_len), dtype=torch.float32) for name in present}
    for row, s in enumerate(rows):
        num_prompt, num_response = s.prompt_ids.numel(), s.response_ids.numel()
        input_ids[row, : s.num_tokens] = torch.cat([s.prompt_ids, s.response_ids])
        attention_mask[row, : s.num_tokens] = 1
        span = slice(num_prompt - 1, num_prompt - 1 + num_response)
        loss_mask[row, span] = 1.0
        for name in present:
            values = getattr(s, name)
            assert values is not None and values.numel() == num_response, f"sample {indices[row]}: {name} length"
            token_fields[name][row, span] = values.float()
    labels = torch.zeros_like(input_ids)
    labels[:, :-1] = input_ids[:, 1:]
    labels = labels * attention_mask.roll(-1, dims=1).clamp(max=1) * (torch.arange(seq_len) < seq_len - 1)
    with_images = [s for s in rows if s.pixel_values is not None]
    return MicroBatch(
        input_ids=input_ids,
        labels=labels,
        attention_mask=attention_mask,
        loss_mask=loss_mask,
        sample_index=torch.tensor(indices, dtype=torch.long),
        pixel_values=torch.cat([s.pixel_values for s in with_images]) if with_images else None,
        image_grid_thw=torch.cat([s.image_grid_thw for s in with_images]) if with_images else None,
        **token_fields,
    )


def response_values(micro_batch: MicroBatch, values: Tensor, samples: list[Sample]) -> list[tuple[int, Tensor]]:
    """Cut a [B, S] per-position result (e.g. log-probs) back into per-sample response tensors."""
    out = []
    for row, index in enumerate(micro_batch.sample_index.tolist()):
        s = samples[index]
        start = s.prompt_ids.numel() - 1
        # On the host: the result travels back to the controller, which holds no GPU.
        out.append((index, values[row, start : start + s.response_ids.numel()].detach().cpu().clone()))
    return out

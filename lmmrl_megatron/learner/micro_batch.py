"""The rows of a step's `RolloutBatch` packed into micro-batches by a token budget, and the results cut back.

Token-level fields are aligned with *prediction positions*: entry t of a [B, S] field belongs to `labels[t]`,
the token at position t + 1 of `input_ids`. A response token j of a row whose prompt has P tokens sits at
position P + j and is predicted at position P + j - 1, so its per-token values go there.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

from lmmrl_megatron.learner.rollout_batch import RolloutBatch


@dataclass
class MicroBatch:
    input_ids: Tensor  # [B, S] right-padded
    labels: Tensor  # [B, S] next token of each position (0 past the end)
    attention_mask: Tensor  # [B, S] 1 for real tokens
    loss_mask: Tensor  # [B, S] 1 where labels[t] is a response token
    sample_index: Tensor  # [B] the row of the step's batch each micro-batch row holds
    pixel_values: Tensor | None = None  # images of all rows, in row order
    image_grid_thw: Tensor | None = None
    # per-token values aligned with labels, [B, S] float, present when the batch carries them
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


def collate(batch: RolloutBatch, indices: list[int], pad_token_id: int = 0) -> MicroBatch:
    """Right-pad the chosen rows of `batch`, prompt then response, into one micro-batch with every per-token
    column aligned to labels."""
    lengths = batch.response_lengths.tolist()
    prompts = [batch.prompt(i) for i in indices]
    totals = [p.ids.numel() + lengths[i] for p, i in zip(prompts, indices)]
    seq_len = max(totals)
    size = len(indices)
    input_ids = torch.full((size, seq_len), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((size, seq_len), dtype=torch.long)
    loss_mask = torch.zeros((size, seq_len), dtype=torch.float32)
    present = batch.token_fields()
    token_fields = {name: torch.zeros((size, seq_len), dtype=torch.float32) for name in present}
    for row, (index, prompt, total) in enumerate(zip(indices, prompts, totals)):
        num_prompt, num_response = prompt.ids.numel(), lengths[index]
        input_ids[row, :total] = torch.cat([prompt.ids, batch.response_ids[index, :num_response]])
        attention_mask[row, :total] = 1
        span = slice(num_prompt - 1, num_prompt - 1 + num_response)
        loss_mask[row, span] = 1.0
        for name in present:
            token_fields[name][row, span] = getattr(batch, name)[index, :num_response]
    labels = torch.zeros_like(input_ids)
    labels[:, :-1] = input_ids[:, 1:]
    labels = labels * attention_mask.roll(-1, dims=1).clamp(max=1) * (torch.arange(seq_len) < seq_len - 1)
    with_images = [p for p in prompts if p.pixel_values is not None]  # a prompt's images once per row, row order
    return MicroBatch(
        input_ids=input_ids,
        labels=labels,
        attention_mask=attention_mask,
        loss_mask=loss_mask,
        sample_index=torch.tensor(indices, dtype=torch.long),
        pixel_values=torch.cat([p.pixel_values for p in with_images]) if with_images else None,
        image_grid_thw=torch.cat([p.image_grid_thw for p in with_images]) if with_images else None,
        **token_fields,
    )


def response_values(micro_batch: MicroBatch, values: Tensor, batch: RolloutBatch) -> Tensor:
    """Cut a [B, S] per-position result (e.g. log-probs) back into [B, batch.width] response columns, float32
    and 0 on padding, row for row of the micro-batch."""
    out = torch.zeros(micro_batch.num_rows, batch.width, dtype=torch.float32)
    lengths = batch.response_lengths
    for row, index in enumerate(micro_batch.sample_index.tolist()):
        start = batch.prompt(index).ids.numel() - 1
        num_response = int(lengths[index])
        # On the host: the result travels back to the controller, which holds no GPU.
        out[row, :num_response] = values[row, start : start + num_response].detach().cpu()
    return out

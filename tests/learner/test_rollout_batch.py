"""The step's batch: padded once with its mask, rows selected, split and sharded, the shards' results merged."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from lmmrl_megatron.learner.micro_batch import collate, response_values
from lmmrl_megatron.learner.rollout_batch import PromptInputs, RolloutBatch, RowValues

RESPONSE_LENGTHS = [3, 5, 1, 4, 2, 6]  # two rows per prompt


def make_batch() -> RolloutBatch:
    gen = torch.Generator().manual_seed(0)
    prompts = [
        PromptInputs(torch.randint(0, 50, (4,), generator=gen), torch.randn(8, 6, generator=gen), torch.tensor([[1, 2, 4]])),
        PromptInputs(torch.randint(0, 50, (2,), generator=gen)),
        PromptInputs(torch.randint(0, 50, (6,), generator=gen), torch.randn(4, 6, generator=gen), torch.tensor([[1, 2, 2]])),
    ]
    responses = [torch.randint(50, 100, (n,), generator=gen) for n in RESPONSE_LENGTHS]
    logprobs = [-torch.rand(n, generator=gen) for n in RESPONSE_LENGTHS]
    return RolloutBatch.from_rows(prompts, [0, 0, 1, 1, 2, 2], responses, rollout_logprobs=logprobs)


def rows_of(batch: RolloutBatch, column: str) -> list[torch.Tensor]:
    values = getattr(batch, column)
    return [values[i, :n] for i, n in enumerate(batch.response_lengths.tolist())]


def test_rows_are_right_padded_once_with_their_mask() -> None:
    batch = make_batch()
    assert (batch.num_rows, batch.width) == (6, max(RESPONSE_LENGTHS))
    assert batch.response_lengths.tolist() == RESPONSE_LENGTHS
    expected_mask = (torch.arange(batch.width) < torch.tensor(RESPONSE_LENGTHS)[:, None]).float()
    assert torch.equal(batch.response_mask, expected_mask)
    padding = ~batch.response_mask.bool()
    assert (batch.response_ids[padding] == 0).all() and (batch.rollout_logprobs[padding] == 0).all()
    assert batch.rollout_logprobs.dtype == torch.float32
    assert batch.token_fields() == ["rollout_logprobs"]
    assert batch.num_tokens() == [4 + 3, 4 + 5, 2 + 1, 2 + 4, 6 + 2, 6 + 6]


def test_a_prompt_and_its_images_are_shared_by_its_rows_not_copied() -> None:
    batch = make_batch()
    assert len(batch.prompts) == 3
    assert batch.prompt(0) is batch.prompt(1)
    picked = batch.select([5, 1])
    assert picked.prompt(0).pixel_values is batch.prompt(5).pixel_values
    assert picked.prompt(1).pixel_values is batch.prompt(1).pixel_values
    mb = collate(batch, [0, 1, 2])  # the micro-batch holds each row's images, in row order
    assert torch.equal(mb.pixel_values, torch.cat([batch.prompt(0).pixel_values] * 2))
    assert torch.equal(mb.image_grid_thw, torch.tensor([[1, 2, 4], [1, 2, 4]]))


def test_select_keeps_the_order_its_prompts_and_trims_to_its_longest_row() -> None:
    batch = make_batch()
    picked = batch.select([4, 2, 3])
    assert picked.response_lengths.tolist() == [2, 1, 4] and picked.width == 4
    assert [p.ids.numel() for p in picked.prompts] == [2, 6]  # only the prompts of its rows
    for new, old in enumerate([4, 2, 3]):
        assert picked.prompt(new) is batch.prompt(old)
        assert torch.equal(picked.response(new), batch.response(old))
        assert torch.equal(rows_of(picked, "rollout_logprobs")[new], rows_of(batch, "rollout_logprobs")[old])
    everything = batch.select(list(range(batch.num_rows)))
    for name in ("prompt_index", "response_ids", "response_mask", "rollout_logprobs"):
        assert torch.equal(getattr(everything, name), getattr(batch, name)), name


def test_split_then_rows_in_order_give_the_batch_back() -> None:
    batch = replace(make_batch(), advantages=torch.randn(6, 6))
    minis = batch.split(4)
    assert [m.num_rows for m in minis] == [4, 2]
    assert [m.width for m in minis] == [5, 6]
    for column in ("response_ids", "rollout_logprobs", "advantages"):
        assert all(torch.equal(a, b) for a, b in zip([r for m in minis for r in rows_of(m, column)], rows_of(batch, column)))
    with pytest.raises(ValueError, match="split size"):
        batch.split(0)


def test_shards_cover_every_row_once_and_their_results_merge_back_in_row_order() -> None:
    batch = make_batch()
    shards = [batch.shard(rank, 4) for rank in range(4)]
    assert shards == [[0, 4], [1, 5], [2], [3]]
    # Each "rank" answers for its rows as a worker does: pack, compute, cut back into the batch's width.
    parts = []
    for rows in reversed(shards):
        mb = collate(batch, rows)
        logprobs = response_values(mb, mb.rollout_logprobs, batch)
        parts.append(RowValues(mb.sample_index, logprobs, 2 * logprobs))
    merged = RowValues.merge(parts)
    assert merged.rows.tolist() == list(range(6))
    assert torch.equal(merged.values, batch.rollout_logprobs)
    assert torch.equal(merged.entropy, 2 * batch.rollout_logprobs)
    with pytest.raises(ValueError, match="rank"):
        batch.shard(4, 4)


def test_per_token_columns_land_on_the_prediction_positions_and_come_back() -> None:
    batch = replace(make_batch(), old_logprobs=torch.randn(6, 6) * make_batch().response_mask)
    mb = collate(batch, [3, 0])
    for row, index in enumerate([3, 0]):
        prompt_len, n = batch.prompt(index).ids.numel(), int(batch.response_lengths[index])
        assert torch.equal(mb.input_ids[row, prompt_len : prompt_len + n], batch.response(index))
        assert torch.equal(mb.old_logprobs[row, prompt_len - 1 : prompt_len - 1 + n], batch.old_logprobs[index, :n])
    assert torch.equal(response_values(mb, mb.old_logprobs, batch), batch.old_logprobs[[3, 0]])


@pytest.mark.parametrize(
    "change, field",
    [
        (dict(rollout_logprobs=[torch.zeros(3)] * 6), "rollout_logprobs"),  # row 1 has 5 tokens
        (dict(prompt_index=[0, 0, 1]), "prompt_index"),
        (dict(prompt_index=[0, 0, 1, 1, 2, 3]), "prompt_index"),
        (dict(advantages=[torch.zeros(n) for n in RESPONSE_LENGTHS[:5]]), "advantages"),
        (dict(values=[torch.zeros(n) for n in RESPONSE_LENGTHS]), "values"),  # not a column of the batch
    ],
)
def test_rows_that_do_not_line_up_are_refused_naming_the_field(change: dict, field: str) -> None:
    gen = torch.Generator().manual_seed(1)
    args = dict(
        prompts=[PromptInputs(torch.arange(3)) for _ in range(3)],
        prompt_index=[0, 0, 1, 1, 2, 2],
        response_ids=[torch.randint(0, 9, (n,), generator=gen) for n in RESPONSE_LENGTHS],
    )
    with pytest.raises(ValueError, match=field):
        RolloutBatch.from_rows(**(args | change))


def test_a_column_of_another_shape_is_refused_naming_it() -> None:
    batch = make_batch()
    with pytest.raises(ValueError, match="old_values"):
        replace(batch, old_values=torch.zeros(6, 5))
    with pytest.raises(ValueError, match="response_mask"):
        replace(batch, response_mask=torch.ones(5, 6))

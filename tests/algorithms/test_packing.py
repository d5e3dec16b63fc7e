import pytest
import torch

from lmmrl_megatron.algorithms.packing import (
    packed_to_padded,
    padded_to_packed,
    per_sequence_count,
    per_sequence_sum,
    sequence_index,
)


def test_round_trip_padded_packed_padded():
    padded = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0], [5.0, 6.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0]])
    packed, cu_seqlens = padded_to_packed(padded, mask)
    assert packed.tolist() == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    assert cu_seqlens.tolist() == [0, 3, 4, 6]
    unpacked, unpacked_mask = packed_to_padded(packed, cu_seqlens)
    assert torch.equal(unpacked, padded) and torch.equal(unpacked_mask, mask.bool())


def test_per_sequence_sum_packed_equals_padded():
    packed = torch.tensor([1.0, 2.0, float("nan"), 4.0, 5.0, 6.0])
    mask = torch.tensor([1, 1, 0, 1, 1, 1])
    cu_seqlens = torch.tensor([0, 3, 3, 6])  # the middle sequence is empty
    assert per_sequence_sum(packed, mask, cu_seqlens).tolist() == [3.0, 0.0, 15.0]
    assert per_sequence_count(mask, cu_seqlens).tolist() == [2, 0, 3]
    assert sequence_index(cu_seqlens, 6).tolist() == [0, 0, 0, 2, 2, 2]


def test_per_sequence_sum_passes_gradient_only_to_valid_tokens():
    packed = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    per_sequence_sum(packed, torch.tensor([1, 0, 1]), torch.tensor([0, 2, 3])).sum().backward()
    assert packed.grad.tolist() == [1.0, 0.0, 1.0]


@pytest.mark.parametrize(
    ("cu_seqlens", "match"),
    [
        (torch.tensor([1, 3, 6]), "start at 0"),
        (torch.tensor([0, 3, 5]), "end at the number of packed tokens"),
        (torch.tensor([0, 4, 3, 6]), "non-decreasing"),
        (torch.tensor([[0, 6]]), "1-D"),
    ],
)
def test_bad_cu_seqlens_are_errors(cu_seqlens, match):
    with pytest.raises(ValueError, match=match):
        per_sequence_sum(torch.ones(6), torch.ones(6), cu_seqlens)


def test_packed_values_must_be_one_dimensional():
    with pytest.raises(ValueError, match="must be 1-D"):
        per_sequence_sum(torch.ones(2, 3), torch.ones(2, 3), torch.tensor([0, 6]))

"""The sampler's epochs are permutations, and a resumed sampler continues exactly where the saved one was."""

from __future__ import annotations

import json

import pytest

from lmmrl_megatron.data.sampler import PromptSampler


def test_each_epoch_is_a_permutation_and_epochs_differ() -> None:
    sampler = PromptSampler(50, seed=3)
    epochs = [sampler.next_indices(50) for _ in range(3)]
    for order in epochs:
        assert sorted(order) == list(range(50))
    assert epochs[0] != epochs[1] != epochs[2]
    assert sampler.epoch == 2 and sampler.num_consumed == 150


def test_seed_changes_the_order_and_fixes_it() -> None:
    assert PromptSampler(50, seed=1).next_indices(50) == PromptSampler(50, seed=1).next_indices(50)
    assert PromptSampler(50, seed=1).next_indices(50) != PromptSampler(50, seed=2).next_indices(50)


def test_unshuffled_order_is_the_pool_order() -> None:
    assert PromptSampler(4, shuffle=False).next_indices(10) == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]


@pytest.mark.parametrize("stop_after", [0, 1, 2, 3, 5, 7])
def test_resume_replays_the_same_sequence(stop_after: int) -> None:
    """7 prompts in batches of 3 cross epoch boundaries mid-batch; resume at every kind of point."""
    uninterrupted = PromptSampler(7, seed=11)
    expected = [uninterrupted.next_indices(3) for _ in range(8)]

    first = PromptSampler(7, seed=11)
    seen = [first.next_indices(3) for _ in range(stop_after)]
    state = json.loads(json.dumps(first.state_dict()))  # it goes through a checkpoint file
    resumed = PromptSampler(7, seed=11)
    resumed.load_state_dict(state)
    seen += [resumed.next_indices(3) for _ in range(8 - stop_after)]
    assert seen == expected


def test_state_at_the_end_of_an_epoch() -> None:
    sampler = PromptSampler(5, seed=0)
    sampler.next_indices(5)
    state = sampler.state_dict()
    assert (state["epoch"], state["position"]) == (0, 5)
    resumed = PromptSampler(5, seed=0)
    resumed.load_state_dict(state)
    assert resumed.next_indices(5) == sampler.next_indices(5)


@pytest.mark.parametrize(
    ("change", "message"),
    [({"num_items": 8}, "num_items=8"), ({"seed": 1}, "seed=1"), ({"shuffle": 0}, "shuffle=0")],
)
def test_a_state_from_a_different_setup_is_rejected(change: dict[str, int], message: str) -> None:
    state = PromptSampler(7, seed=0).state_dict() | change
    with pytest.raises(ValueError, match=f"sampler state has {message}"):
        PromptSampler(7, seed=0).load_state_dict(state)


def test_invalid_states_are_rejected() -> None:
    sampler = PromptSampler(7, seed=0)
    with pytest.raises(ValueError, match="invalid position"):
        sampler.load_state_dict(sampler.state_dict() | {"position": 9})
    with pytest.raises(ValueError, match="lacks 'seed'"):
        sampler.load_state_dict({"epoch": 0, "position": 0, "num_items": 7, "shuffle": 1})
    with pytest.raises(ValueError, match="at least one prompt"):
        PromptSampler(0)

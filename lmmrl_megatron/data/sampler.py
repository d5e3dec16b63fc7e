"""A resumable, epoch-based prompt sampler.

Each epoch visits every pool index once, in an order that depends only on (seed, epoch), so the sampler's whole
state is two integers: the epoch and the position inside it. Saving them with a checkpoint and loading them back
gives a resumed run exactly the prompts, in the order, that an uninterrupted run would have seen. Batches run on
across epoch boundaries, so every prompt is used equally often and no tail is dropped.
"""

from __future__ import annotations

import numpy as np


class PromptSampler:
    def __init__(self, num_items: int, seed: int = 42, shuffle: bool = True) -> None:
        if num_items < 1:
            raise ValueError(f"the prompt sampler needs at least one prompt, got {num_items}")
        self.num_items = num_items
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.position = 0
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_items)
        # Seeding with (seed, epoch) makes an epoch's order independent of how the sampler got there.
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_items)

    def next_index(self) -> int:
        if self.position == self.num_items:
            self.epoch += 1
            self.position = 0
            self._order = self._epoch_order(self.epoch)
        index = int(self._order[self.position])
        self.position += 1
        return index

    def next_indices(self, count: int) -> list[int]:
        return [self.next_index() for _ in range(count)]

    @property
    def num_consumed(self) -> int:
        """Prompts handed out since the start, across epochs."""
        return self.epoch * self.num_items + self.position

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "num_items": self.num_items,
            "seed": self.seed,
            "shuffle": int(self.shuffle),
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from `state`; the pool size, seed and shuffle must match the run that saved it."""
        expected = {"num_items": self.num_items, "seed": self.seed, "shuffle": int(self.shuffle)}
        for key, value in expected.items():
            if key not in state:
                raise ValueError(f"sampler state lacks {key!r} (has: {', '.join(state)})")
            if int(state[key]) != value:
                raise ValueError(
                    f"sampler state has {key}={state[key]} but this run has {key}={value}: the prompt data or "
                    "data.seed/data.shuffle changed since the checkpoint, so resuming would not replay the same "
                    "prompts"
                )
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= self.num_items:
            raise ValueError(f"sampler state has an invalid position: epoch={epoch}, position={position}")
        self.epoch, self.position = epoch, position
        self._order = self._epoch_order(epoch)

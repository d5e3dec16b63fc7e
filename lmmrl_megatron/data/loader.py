"""Batches of encoded prompts for the trainer, resumable from a checkpoint.

    loader = build_prompt_loader(config.data, processor, batch_size=rollout_batch_size)
    batch = loader.next_batch()            # rollout_batch_size EncodedPrompts
    checkpoint["data"] = loader.state_dict()
    ...
    loader.load_state_dict(checkpoint["data"])   # the next batches are those an uninterrupted run gets

A prompt that turns out bad only when encoded (an image that is missing, unreachable or corrupt, a prompt too
long) stops the run under `bad_input: error`; under `skip` it is counted, remembered, and replaced by the
sampler's next prompt, so batches stay full and the sequence stays deterministic.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from lmmrl_megatron.data.bad_input import BadInputCounts, BadInputError, BadInputHandler
from lmmrl_megatron.data.config import DataConfig
from lmmrl_megatron.data.encode import EncodedPrompt, PromptEncoder
from lmmrl_megatron.data.pool import PromptPool, load_prompt_pool
from lmmrl_megatron.data.sampler import PromptSampler


@dataclass
class PromptBatch:
    """`prompts[i]` is pool slot `indices[i]`; `epoch` is the sampler's epoch after the batch was drawn."""

    prompts: list[EncodedPrompt]
    indices: list[int]
    epoch: int


class PromptLoader:
    def __init__(
        self,
        pool: PromptPool,
        encoder: PromptEncoder,
        batch_size: int,
        handler: BadInputHandler,
        seed: int = 42,
        shuffle: bool = True,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"the prompt batch size (rollout_batch_size) must be >= 1, got {batch_size}")
        self.pool = pool
        self.encoder = encoder
        self.batch_size = batch_size
        self.handler = handler
        self.sampler = PromptSampler(len(pool), seed=seed, shuffle=shuffle)
        self._bad_indices: set[int] = set()

    @property
    def skipped(self) -> BadInputCounts:
        """Records skipped so far, by reason: at reading time and when encoding."""
        return self.handler.counts

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def _encode_next(self) -> tuple[int, EncodedPrompt]:
        # Every index can be drawn at most once per pass, so after a full pass of failures nothing is usable.
        for _ in range(len(self.pool) + 1):
            index = self.sampler.next_index()
            if index in self._bad_indices:
                continue
            try:
                return index, self.encoder.encode(self.pool.records[index])
            except BadInputError as exc:
                self.handler.reject_error(exc)  # raises under `error`
                self._bad_indices.add(index)
        raise ValueError(f"no usable prompts left in data.prompt_data: {self.skipped.summary()}")

    def next_batch(self) -> PromptBatch:
        indices: list[int] = []
        prompts: list[EncodedPrompt] = []
        for _ in range(self.batch_size):
            index, prompt = self._encode_next()
            indices.append(index)
            prompts.append(prompt)
        return PromptBatch(prompts, indices, self.sampler.epoch)

    def __iter__(self) -> Iterator[PromptBatch]:
        while True:
            yield self.next_batch()

    def each_prompt_once(self) -> Iterator[tuple[int, EncodedPrompt]]:
        """Every pool record once, in pool order, encoded: for evaluation, where each test prompt counts once.

        Bad records get the same policy as in `next_batch` (an error, or skipped, counted and remembered); the
        sampler is not touched, so this can run between training batches."""
        for index, record in enumerate(self.pool.records):
            if index in self._bad_indices:
                continue
            try:
                prompt = self.encoder.encode(record)
            except BadInputError as exc:
                self.handler.reject_error(exc)  # raises under `error`
                self._bad_indices.add(index)
                continue
            yield index, prompt

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable: the sampler position, the prompts known to be bad, the skip counts."""
        return {
            "sampler": self.sampler.state_dict(),
            "bad_indices": sorted(self._bad_indices),
            "skipped": self.skipped.to_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("sampler", "bad_indices", "skipped"):
            if key not in state:
                raise ValueError(f"prompt loader state lacks {key!r} (has: {', '.join(state)})")
        self.sampler.load_state_dict(state["sampler"])
        self._bad_indices = {int(i) for i in state["bad_indices"]}
        self.handler.counts.load_state(state["skipped"])


def build_prompt_loader(config: DataConfig, processor: Any, batch_size: int, split: str | None = None) -> PromptLoader:
    """The prompt loader a run uses: `config.prompt_data` read into a pool, encoded with the model's processor."""
    handler = BadInputHandler(config.bad_input)
    pool = load_prompt_pool(config, split=split, handler=handler)
    encoder = PromptEncoder(
        processor,
        system_prompt=config.system_prompt,
        min_pixels=config.min_pixels,
        max_pixels=config.max_pixels,
        max_prompt_length=config.max_prompt_length,
        image_timeout_s=config.image_timeout_s,
    )
    return PromptLoader(pool, encoder, batch_size, handler, seed=config.seed, shuffle=config.shuffle)

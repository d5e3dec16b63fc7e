"""The prompt pool: every source of `data.prompt_data` read, checked, mixed and capped into one indexed list."""

from __future__ import annotations

from dataclasses import dataclass

from lmmrl_megatron.data.bad_input import BadInputCounts, BadInputHandler
from lmmrl_megatron.data.config import DataConfig
from lmmrl_megatron.data.mixing import interleave, mix_counts
from lmmrl_megatron.data.records import PromptRecord, iter_records


@dataclass
class PromptPool:
    """The prompts a run samples from.

    records: the pool, sources interleaved in proportion (a record repeats only under `all_exhausted`).
    source_ids: for each pool slot, the index into `sources` it came from.
    sources: the source specs, as configured.
    num_read: usable records read from each source (before mixing).
    skipped: records left out while reading, by reason (`bad_input: skip`).
    """

    records: list[PromptRecord]
    source_ids: list[int]
    sources: list[str]
    num_read: list[int]
    skipped: BadInputCounts

    def __len__(self) -> int:
        return len(self.records)

    def num_per_source(self) -> list[int]:
        return [self.source_ids.count(i) for i in range(len(self.sources))]


def load_prompt_pool(
    config: DataConfig, split: str | None = None, handler: BadInputHandler | None = None
) -> PromptPool:
    """Read, check and mix `config.prompt_data` (at `split`, default `config.split`) into a `PromptPool`."""
    if not config.prompt_data:
        raise ValueError("data.prompt_data is empty: give at least one prompt source")
    split = split or config.split
    handler = handler if handler is not None else BadInputHandler(config.bad_input)
    per_source: list[list[PromptRecord]] = []
    for spec in config.prompt_data:
        records = list(
            iter_records(
                spec,
                config.input_key,
                config.label_key,
                split=split,
                handler=handler,
                require_answer=config.require_answer,
                image_check=config.image_check,
            )
        )
        if not records:
            raise ValueError(
                f"data.prompt_data source {spec!r} (split {split!r}) has no usable records; {handler.counts.summary()}"
            )
        per_source.append(records)
    counts = mix_counts([len(r) for r in per_source], config.prompt_data_probs, config.max_samples, config.mix_strategy)
    if sum(counts) == 0:
        raise ValueError(f"data.max_samples/prompt_data_probs leave no prompts: {counts} from {config.prompt_data}")
    taken = [0] * len(per_source)
    records: list[PromptRecord] = []
    source_ids = interleave(counts)
    for source in source_ids:
        # The first records of each source in file order, cycling only when all_exhausted repeats a source.
        records.append(per_source[source][taken[source] % len(per_source[source])])
        taken[source] += 1
    return PromptPool(records, source_ids, list(config.prompt_data), [len(r) for r in per_source], handler.counts)

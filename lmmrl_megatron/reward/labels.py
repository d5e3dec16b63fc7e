"""Finding a prompt's reference answer in a dataset, for requests that carry no labels (as LMM-R1's verifier does)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Literal

logger = logging.getLogger(__name__)


def prompt_key(prompt: object) -> str:
    """A canonical text for a prompt, so the same messages match whether sent as a list or a JSON string of one.

    A JSON string of a list or object is re-serialised with sorted keys and no spaces; any other string is taken
    as plain prompt text (stripped).
    """
    value = prompt
    if isinstance(prompt, str):
        try:
            value = json.loads(prompt)
        except json.JSONDecodeError:
            return prompt.strip()
        if not isinstance(value, (list, dict)):
            return prompt.strip()
    return json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


@dataclass
class LabelIndex:
    """Reference answers by `prompt_key` of the prompt.

    num_conflicts: prompts that appear with different answers (the first answer is kept).
    skipped: the data reader's summary of bad records left out under the `skip` policy.
    """

    answers: dict[str, str] = field(default_factory=dict)
    num_conflicts: int = 0
    skipped: str = "0 skipped"

    def lookup(self, prompt: str) -> str | None:
        return self.answers.get(prompt_key(prompt))


def load_label_index(
    source: str, input_key: str, label_key: str, bad_input: Literal["error", "skip"] = "error"
) -> LabelIndex:
    """Index every record's answer by its prompt, for any source the data reader knows (.jsonl, .json, .parquet,
    `json@DIR`, a `datasets` folder), or several separated by commas (as LMM-R1's `--dataset`). Bad records raise
    a ValueError naming file and line, or under `skip` are left out and counted."""
    # Imported here: the data package pulls in torch, which the reward package itself does not need.
    from lmmrl_megatron.data import BadInputHandler, iter_records

    handler = BadInputHandler(bad_input)
    index = LabelIndex()
    for part in (part.strip() for part in source.split(",")):
        if not part:
            raise ValueError(f"dataset list {source!r} has an empty entry between commas")
        for record in iter_records(part, input_key, label_key, handler=handler):
            answer = record.answer.strip()
            if index.answers.setdefault(prompt_key(record.raw_message), answer) != answer:
                index.num_conflicts += 1
    index.skipped = handler.counts.summary()
    if index.num_conflicts:
        logger.warning("%s: %d prompts appear with different answers; the first is used", source, index.num_conflicts)
    if handler.counts.total:
        logger.warning("%s: %s", source, index.skipped)
    return index

"""Bad prompt records: the reasons, the error raised under `bad_input: error`, the counts kept under `skip`.

Bad input never crashes a run obscurely and never disappears silently: either the run stops with file, line and
reason, or the record is dropped and counted by reason, and the counts go to the trainer's logs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from typing import Literal, get_args

logger = logging.getLogger(__name__)

BadInputReason = Literal[
    "malformed_json",  # a line or a stringified `message` that is not valid JSON
    "missing_field",  # the record lacks the input key
    "bad_message",  # `message` is not a list of {role, content} dicts
    "unknown_content_type",  # a content part whose type is neither text nor image
    "empty_answer",  # the label is missing or blank
    "missing_image",  # an image file that does not exist, or a URL that cannot be fetched
    "corrupt_image",  # image bytes that Pillow cannot decode
    "prompt_too_long",  # more tokens than `max_prompt_length`
]
BAD_INPUT_REASONS: tuple[str, ...] = get_args(BadInputReason)

# Under `skip`, each reason's first few records are logged in full; the rest only show up in the counts.
_NUM_LOGGED_PER_REASON = 5


class BadInputError(ValueError):
    """A bad record under `bad_input: error`; the message reads `file:line: reason: detail`."""

    def __init__(self, where: str, reason: BadInputReason, detail: str) -> None:
        super().__init__(f"{where}: {reason}: {detail}")
        self.where = where
        self.reason = reason
        self.detail = detail


@dataclass
class BadInputCounts:
    """How many records were skipped, by reason (each field is one `BadInputReason`)."""

    malformed_json: int = 0
    missing_field: int = 0
    bad_message: int = 0
    unknown_content_type: int = 0
    empty_answer: int = 0
    missing_image: int = 0
    corrupt_image: int = 0
    prompt_too_long: int = 0

    def add(self, reason: BadInputReason, num: int = 1) -> None:
        assert reason in BAD_INPUT_REASONS, reason
        setattr(self, reason, getattr(self, reason) + num)

    def merge(self, other: BadInputCounts) -> None:
        for f in fields(self):
            self.add(f.name, getattr(other, f.name))  # type: ignore[arg-type]

    @property
    def total(self) -> int:
        return sum(getattr(self, f.name) for f in fields(self))

    def to_metrics(self, prefix: str = "data/skipped/") -> dict[str, int]:
        """Flat `{prefix + reason: count}` for the trainer's metric logger, with `prefix + "total"`."""
        metrics = {prefix + f.name: getattr(self, f.name) for f in fields(self)}
        metrics[prefix + "total"] = self.total
        return metrics

    def summary(self) -> str:
        """`3 skipped (malformed_json=1, missing_image=2)`, or `0 skipped`."""
        nonzero = [f"{f.name}={getattr(self, f.name)}" for f in fields(self) if getattr(self, f.name)]
        return f"{self.total} skipped" + (f" ({', '.join(nonzero)})" if nonzero else "")

    def to_state(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def load_state(self, state: dict[str, int]) -> None:
        """Set the counts in place (holders of this object see the restored values)."""
        unknown = set(state) - set(BAD_INPUT_REASONS)
        if unknown:
            raise ValueError(f"bad-input counts state has unknown reasons {sorted(unknown)}")
        for reason in BAD_INPUT_REASONS:
            setattr(self, reason, int(state.get(reason, 0)))


class BadInputHandler:
    """Applies the `bad_input` policy: raise `BadInputError`, or count the record (and log the first few)."""

    def __init__(self, policy: Literal["error", "skip"], counts: BadInputCounts | None = None) -> None:
        if policy not in ("error", "skip"):
            raise ValueError(f"bad_input policy must be 'error' or 'skip', got {policy!r}")
        self.policy = policy
        self.counts = counts if counts is not None else BadInputCounts()

    def reject(self, where: str, reason: BadInputReason, detail: str) -> None:
        """Handle one bad record; returns only under `skip` (the caller then drops the record)."""
        if self.policy == "error":
            raise BadInputError(where, reason, detail)
        self.counts.add(reason)
        if getattr(self.counts, reason) <= _NUM_LOGGED_PER_REASON:
            logger.warning("skipping bad prompt record %s: %s: %s", where, reason, detail)

    def reject_error(self, error: BadInputError) -> None:
        self.reject(error.where, error.reason, error.detail)

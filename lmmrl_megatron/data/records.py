"""Prompt records: a source's rows parsed and checked into `PromptRecord`s, under the bad-input policy.

    for record in iter_records("data/train.jsonl", "message", "answer"):
        record.messages, record.answer, record.origin, record.raw_message

This is the stable entry point for anything that needs the data set's prompts and answers (the trainer, the
reward server looking answers up by prompt).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from lmmrl_megatron.data.bad_input import BadInputHandler
from lmmrl_megatron.data.images import ImageError, check_image
from lmmrl_megatron.data.messages import ChatMessage, ImagePart, MessageError, image_parts, parse_messages
from lmmrl_megatron.data.sources import RawRow, RecordOrigin, SourceFile, read_rows, resolve_source


@dataclass(frozen=True)
class PromptRecord:
    """One prompt of a data set.

    messages: the parsed chat, images still as references.
    answer: the label as a string (numbers are written with `str`), "" only when answers are not required.
    origin: file and line/row, for error messages and logs.
    raw_message: the `message` field exactly as stored when it is a string (LMM-R1 sends this string to a remote
        reward server as the prompt), else its JSON dump.
    base_dir: the folder relative image paths are resolved against (the data file's folder).
    """

    messages: tuple[ChatMessage, ...]
    answer: str
    origin: RecordOrigin
    raw_message: str
    base_dir: Path

    @property
    def images(self) -> list[ImagePart]:
        return image_parts(list(self.messages))


def _answer_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return json.dumps(value, ensure_ascii=False)


def _raw_message_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    # Inline image bytes cannot go into JSON; a placeholder keeps the text stable and readable.
    return json.dumps(value, ensure_ascii=False, default=lambda o: f"<{type(o).__name__}>")


def parse_row(
    row: RawRow,
    base_dir: Path,
    input_key: str,
    label_key: str,
    handler: BadInputHandler,
    require_answer: bool = True,
    image_check: Literal["none", "exists", "verify"] = "none",
) -> PromptRecord | None:
    """The record in `row`, or None when it is bad and the policy is `skip` (under `error` it raises)."""
    where = str(row.origin)
    if row.fields is None:
        handler.reject(where, "malformed_json", row.error or "unreadable record")
        return None
    if input_key not in row.fields or row.fields[input_key] is None:
        handler.reject(where, "missing_field", f"record has no {input_key!r} field (has: {', '.join(row.fields)})")
        return None
    raw = row.fields[input_key]
    try:
        messages = parse_messages(raw)
    except MessageError as exc:
        handler.reject(where, exc.reason, f"{input_key!r}: {exc.detail}")
        return None
    answer = _answer_text(row.fields.get(label_key))
    if require_answer and not answer.strip():
        handler.reject(where, "empty_answer", f"{label_key!r} is missing or empty")
        return None
    try:
        for part in image_parts(messages):
            check_image(part.image, base_dir, image_check)
    except ImageError as exc:
        handler.reject(where, exc.reason, exc.detail)
        return None
    return PromptRecord(tuple(messages), answer, row.origin, _raw_message_text(raw), base_dir)


def iter_file_records(
    source: SourceFile,
    input_key: str = "message",
    label_key: str = "answer",
    *,
    split: str = "train",
    handler: BadInputHandler | None = None,
    require_answer: bool = True,
    image_check: Literal["none", "exists", "verify"] = "none",
) -> Iterator[PromptRecord]:
    handler = handler or BadInputHandler("error")
    for row in read_rows(source, (input_key, label_key), split):
        record = parse_row(row, source.base_dir, input_key, label_key, handler, require_answer, image_check)
        if record is not None:
            yield record


def iter_records(
    source: str,
    input_key: str = "message",
    label_key: str = "answer",
    *,
    split: str = "train",
    handler: BadInputHandler | None = None,
    require_answer: bool = True,
    image_check: Literal["none", "exists", "verify"] = "none",
) -> Iterator[PromptRecord]:
    """The records of one source spec (see `sources`), in file order.

    Bad records raise `BadInputError` (a `ValueError` reading `file:line: reason: detail`) unless `handler` has
    the `skip` policy, in which case they are left out and counted in `handler.counts`.
    """
    for source_file in resolve_source(source, split):
        yield from iter_file_records(
            source_file,
            input_key,
            label_key,
            split=split,
            handler=handler,
            require_answer=require_answer,
            image_check=image_check,
        )

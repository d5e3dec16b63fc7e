"""Where prompt records come from: source specs resolved to files, and the raw rows read from them.

A source is one of
  - a `.jsonl`, `.json` or `.parquet` file (a `.json` file may hold a JSON array or JSON lines);
  - `json@DIR` or `parquet@DIR`: the files of one split in DIR, as OpenRLHF/LMM-R1 read them with
    `load_dataset("json", data_dir=DIR)`: files whose name has the split as a word (`train.jsonl`,
    `train-00000-of-00002.parquet`, `my_test.json`) or that lie in a `DIR/<split>/` folder; when no file names any
    split, all files belong to `train`;
  - a directory written by `datasets`' `save_to_disk` (a `Dataset`, or a `DatasetDict` read at the split).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

FileFormat = Literal["jsonl", "json", "parquet", "hf_disk"]

_EXTENSIONS: dict[str, FileFormat] = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}
_DIR_PREFIXES: dict[str, tuple[str, ...]] = {
    "json": (".jsonl", ".json"),
    "jsonl": (".jsonl", ".json"),
    "parquet": (".parquet",),
}
_SPLIT_WORDS = ("train", "test", "validation", "valid", "val", "dev", "eval")


@dataclass(frozen=True)
class RecordOrigin:
    """Where a record came from: its file, its 1-based line (JSON files) and 0-based row in that file."""

    file: str
    row: int
    line: int | None = None

    def __str__(self) -> str:
        return f"{self.file}:{self.line}" if self.line is not None else f"{self.file}[row {self.row}]"


@dataclass(frozen=True)
class SourceFile:
    path: Path
    format: FileFormat

    @property
    def base_dir(self) -> Path:
        """The folder relative image paths are taken from."""
        return self.path if self.format == "hf_disk" else self.path.parent


@dataclass
class RawRow:
    """One record as read, before parsing: its fields, or the JSON syntax error that stopped reading it."""

    origin: RecordOrigin
    fields: dict[str, Any] | None
    error: str | None = None


def _mentions_split(path: Path, root: Path, split: str) -> bool:
    word = re.compile(rf"(^|[-_.]){re.escape(split)}([-_.]|$)", re.IGNORECASE)
    relative = path.relative_to(root)
    return any(word.search(part) for part in (*relative.parent.parts, relative.stem))


def resolve_split_dir(directory: Path, extensions: tuple[str, ...], split: str) -> list[Path]:
    """The files of `split` in `directory` (see the module doc); sorted, so shard order is stable."""
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.suffix in extensions)
    if not files:
        raise ValueError(f"{directory}: no {'/'.join(extensions)} files in this folder")
    if not any(_mentions_split(p, directory, word) for p in files for word in _SPLIT_WORDS):
        if split == "train":
            return files
        raise ValueError(f"{directory}: no file names a split, so all files are 'train'; split {split!r} is empty")
    chosen = [p for p in files if _mentions_split(p, directory, split)]
    if not chosen:
        names = ", ".join(str(p.relative_to(directory)) for p in files[:8])
        raise ValueError(f"{directory}: no files for split {split!r} (found: {names})")
    return chosen


def _is_saved_dataset(directory: Path) -> bool:
    return (directory / "dataset_dict.json").is_file() or (directory / "state.json").is_file()


def resolve_source(spec: str, split: str = "train") -> list[SourceFile]:
    """The files a source spec names, with their formats; `ValueError` naming the spec if it names none."""
    prefix, at, rest = spec.partition("@")
    if at and prefix in _DIR_PREFIXES and not Path(spec).exists():
        directory = Path(rest).expanduser()
        if not directory.is_dir():
            raise ValueError(f"prompt source {spec!r}: {directory} is not a folder")
        files = resolve_split_dir(directory, _DIR_PREFIXES[prefix], split)
        return [SourceFile(p, _EXTENSIONS[p.suffix]) for p in files]
    path = Path(spec).expanduser()
    if path.is_dir():
        if _is_saved_dataset(path):
            return [SourceFile(path, "hf_disk")]
        raise ValueError(
            f"prompt source {spec!r} is a folder but not a `datasets` save_to_disk folder; "
            f"for split files in a folder write json@{spec} or parquet@{spec}"
        )
    if not path.is_file():
        raise ValueError(f"prompt source {spec!r}: no such file or folder (hub data sets are not downloaded)")
    if path.suffix not in _EXTENSIONS:
        raise ValueError(f"prompt source {spec!r}: unknown file type {path.suffix!r}; use .jsonl, .json or .parquet")
    return [SourceFile(path, _EXTENSIONS[path.suffix])]


def _row_from_json(value: Any, origin: RecordOrigin) -> RawRow:
    if not isinstance(value, dict):
        return RawRow(origin, None, f"record is not a JSON object: {type(value).__name__}")
    return RawRow(origin, value)


def _read_jsonl(path: Path, text: str) -> Iterator[RawRow]:
    row = 0
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        origin = RecordOrigin(str(path), row, line_number)
        row += 1
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            yield RawRow(origin, None, f"invalid JSON ({exc.msg} at column {exc.colno})")
            continue
        yield _row_from_json(value, origin)


def _read_json_array(path: Path, text: str) -> Iterator[RawRow]:
    """Read `[obj, obj, ...]` element by element so each record knows its line, and a bad one is reported there."""
    decoder = json.JSONDecoder()
    whitespace = re.compile(r"\s*")
    pos = whitespace.match(text, text.index("[") + 1).end()
    row = 0
    while pos < len(text) and text[pos] != "]":
        line = text.count("\n", 0, pos) + 1
        origin = RecordOrigin(str(path), row, line)
        try:
            value, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            # Past a syntax error element boundaries are unknown, so the rest of the file is one bad record.
            yield RawRow(origin, None, f"invalid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})")
            return
        yield _row_from_json(value, origin)
        row += 1
        pos = whitespace.match(text, pos).end()
        if pos < len(text) and text[pos] == ",":
            pos = whitespace.match(text, pos + 1).end()
        elif pos < len(text) and text[pos] != "]":
            origin = RecordOrigin(str(path), row, text.count("\n", 0, pos) + 1)
            yield RawRow(origin, None, "invalid JSON (expected ',' or ']')")
            return


def _read_json(path: Path, text: str) -> Iterator[RawRow]:
    stripped = text.lstrip()
    if stripped.startswith("["):
        yield from _read_json_array(path, text)
    elif stripped.startswith("{") and "\n" not in stripped.rstrip():
        yield from _read_jsonl(path, text)  # a single record on one line
    elif stripped.startswith("{"):
        # Many LMM-R1 data sets are JSON lines saved as .json; a pretty-printed single object is the other case.
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            yield from _read_jsonl(path, text)
            return
        yield _row_from_json(value, RecordOrigin(str(path), 0, 1))
    elif stripped:
        yield RawRow(RecordOrigin(str(path), 0, 1), None, "invalid JSON (a .json file must hold an array or objects)")


def _read_parquet(path: Path, keys: tuple[str, ...]) -> Iterator[RawRow]:
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    columns = [k for k in keys if k in parquet.schema_arrow.names]
    row = 0
    for batch in parquet.iter_batches(columns=columns or None, batch_size=1024):
        for fields in batch.to_pylist():
            yield RawRow(RecordOrigin(str(path), row), fields)
            row += 1


def _read_saved_dataset(path: Path, split: str, keys: tuple[str, ...]) -> Iterator[RawRow]:
    from datasets import DatasetDict, load_from_disk

    dataset = load_from_disk(str(path))
    if isinstance(dataset, DatasetDict):
        if split not in dataset:
            raise ValueError(f"{path}: saved DatasetDict has no split {split!r} (has: {', '.join(dataset)})")
        dataset = dataset[split]
    columns = [k for k in keys if k in dataset.column_names]
    if columns:
        dataset = dataset.select_columns(columns)
    for row, fields in enumerate(dataset):
        yield RawRow(RecordOrigin(str(path), row), dict(fields) if columns else {})


def read_rows(source: SourceFile, keys: tuple[str, ...], split: str = "train") -> Iterator[RawRow]:
    """The raw rows of one file; `keys` are the fields needed (columnar formats read only those)."""
    if source.format == "parquet":
        yield from _read_parquet(source.path, keys)
    elif source.format == "hf_disk":
        yield from _read_saved_dataset(source.path, split, keys)
    else:
        try:
            text = source.path.read_text(encoding="utf-8-sig")  # tolerate a byte-order mark
        except UnicodeDecodeError as exc:
            raise ValueError(f"{source.path}: not UTF-8 text ({exc})") from exc
        yield from (_read_jsonl if source.format == "jsonl" else _read_json)(source.path, text)

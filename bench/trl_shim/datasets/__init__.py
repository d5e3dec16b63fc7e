"""Stand-in datasets (see bench/trl_shim/README.md): an in-memory `Dataset` of rows, enough for GRPOTrainer."""

from __future__ import annotations

from typing import Any

from _missing import placeholder


class Dataset:
    """Rows kept as dicts; indexable and sized, which is all the trainer's sampler and collator use."""

    def __init__(self, rows: list[dict[str, Any]]):
        self._rows = list(rows)

    @classmethod
    def from_list(cls, rows: list[dict[str, Any]]) -> Dataset:
        return cls(rows)

    @classmethod
    def from_dict(cls, columns: dict[str, list]) -> Dataset:
        names = list(columns)
        return cls([dict(zip(names, values)) for values in zip(*columns.values())])

    @property
    def cache_files(self) -> list[dict]:  # TRL's telemetry asks; in memory, as `from_list` of the real one
        return []

    @property
    def column_names(self) -> list[str]:
        return list(self._rows[0]) if self._rows else []

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, index):
        if isinstance(index, str):
            return [row[index] for row in self._rows]
        return self._rows[index]


class IterableDataset:  # only ever an isinstance target here
    pass


class DatasetDict(dict):
    pass


class IterableDatasetDict(dict):
    pass


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    return placeholder("datasets", name)

"""Every source type reads back the same records, with file and line origins."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lmmrl_megatron.data.records import iter_records
from lmmrl_megatron.data.sources import resolve_source
from tests.data.helpers import record, write_jsonl

ROWS = [record(answer=str(i), text=f"question {i}") for i in range(5)]


def _questions(source: str, **kwargs) -> list[tuple[str, str]]:
    return [(r.messages[0].content[-1].text, r.answer) for r in iter_records(source, **kwargs)]


EXPECTED = [(f"question {i}", str(i)) for i in range(5)]


def test_jsonl_records_carry_line_numbers(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in ROWS[:2]) + "\n\n" + json.dumps(ROWS[2]) + "\n")
    records = list(iter_records(str(path)))
    assert [r.answer for r in records] == ["0", "1", "2"]
    assert [(r.origin.line, r.origin.row) for r in records] == [(1, 0), (2, 1), (4, 2)]
    assert str(records[2].origin) == f"{path}:4"
    assert records[0].raw_message == ROWS[0]["message"]  # the stored string, unchanged
    assert records[0].base_dir == tmp_path


def test_json_array_with_line_numbers(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text(json.dumps(ROWS, indent=2))
    records = list(iter_records(str(path)))
    assert [(r.messages[0].content[-1].text, r.answer) for r in records] == EXPECTED
    lines = path.read_text().splitlines()
    for r in records:  # each record's line is where its object opens
        assert lines[r.origin.line - 1].strip() == "{"
    assert len({r.origin.line for r in records}) == 5


def test_json_file_holding_json_lines(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.json", ROWS)
    assert _questions(str(path)) == EXPECTED


def test_json_file_holding_one_pretty_printed_record(tmp_path: Path) -> None:
    path = tmp_path / "one.json"
    path.write_text(json.dumps(ROWS[0], indent=2))
    assert _questions(str(path)) == EXPECTED[:1]


def test_message_as_a_list_and_numeric_answer(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [record(answer=4, stringify=False), record(answer=0.5, stringify=False)])
    records = list(iter_records(str(path)))
    assert [r.answer for r in records] == ["4", "0.5"]
    assert json.loads(records[0].raw_message) == record(stringify=False)["message"]


def test_parquet_reads_only_needed_columns_and_rows(tmp_path: Path) -> None:
    path = tmp_path / "d.parquet"
    table = pa.table({"message": [r["message"] for r in ROWS], "answer": [r["answer"] for r in ROWS], "extra": [1] * 5})
    pq.write_table(table, path, row_group_size=2)
    records = list(iter_records(str(path)))
    assert [(r.messages[0].content[-1].text, r.answer) for r in records] == EXPECTED
    assert [r.origin.row for r in records] == [0, 1, 2, 3, 4] and records[0].origin.line is None
    assert str(records[3].origin) == f"{path}[row 3]"


def test_custom_input_and_label_keys(tmp_path: Path) -> None:
    rows = [{"prompt": r["message"], "solution": r["answer"]} for r in ROWS]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    assert _questions(str(path), input_key="prompt", label_key="solution") == EXPECTED


@pytest.mark.parametrize(
    ("layout", "prefix"),
    [
        ({"train.jsonl": ROWS[:3], "test.jsonl": ROWS[3:]}, "json"),
        ({"my_train.json": ROWS[:3], "data/test-00000.jsonl": ROWS[3:]}, "json"),
        ({"train/part-0.jsonl": ROWS[:2], "train/part-1.jsonl": ROWS[2:3], "test/x.jsonl": ROWS[3:]}, "json"),
        ({"train-00000-of-00001.parquet": ROWS[:3], "test-00000-of-00001.parquet": ROWS[3:]}, "parquet"),
    ],
)
def test_split_folders(tmp_path: Path, layout: dict[str, list[dict]], prefix: str) -> None:
    for name, rows in layout.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith(".parquet"):
            columns = {"message": [r["message"] for r in rows], "answer": [r["answer"] for r in rows]}
            pq.write_table(pa.table(columns), path)
        else:
            write_jsonl(path, rows)
    assert _questions(f"{prefix}@{tmp_path}") == EXPECTED[:3]
    assert _questions(f"{prefix}@{tmp_path}", split="test") == EXPECTED[3:]
    with pytest.raises(ValueError, match="no files for split 'validation'"):
        list(iter_records(f"{prefix}@{tmp_path}", split="validation"))


def test_split_folder_without_split_names_is_all_train(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "a.jsonl", ROWS[:2])
    write_jsonl(tmp_path / "b.jsonl", ROWS[2:])
    assert _questions(f"json@{tmp_path}") == EXPECTED
    with pytest.raises(ValueError, match="split 'test' is empty"):
        resolve_source(f"json@{tmp_path}", "test")


def test_saved_dataset_and_dataset_dict(tmp_path: Path) -> None:
    from datasets import Dataset, DatasetDict

    columns = {"message": [r["message"] for r in ROWS], "answer": [r["answer"] for r in ROWS]}
    Dataset.from_dict(columns).save_to_disk(str(tmp_path / "ds"))
    assert _questions(str(tmp_path / "ds")) == EXPECTED
    train = Dataset.from_dict({k: v[:4] for k, v in columns.items()})
    test = Dataset.from_dict({k: v[4:] for k, v in columns.items()})
    DatasetDict({"train": train, "test": test}).save_to_disk(str(tmp_path / "dd"))
    assert _questions(str(tmp_path / "dd")) == EXPECTED[:4]
    assert _questions(str(tmp_path / "dd"), split="test") == EXPECTED[4:]
    with pytest.raises(ValueError, match="no split 'dev'"):
        list(iter_records(str(tmp_path / "dd"), split="dev"))


def test_saved_dataset_with_list_messages(tmp_path: Path) -> None:
    from datasets import Dataset

    rows = [record(answer=str(i), text=f"question {i}", stringify=False) for i in range(3)]
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    assert _questions(str(tmp_path / "ds")) == EXPECTED[:3]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("missing.jsonl", "no such file or folder"),
        ("data.csv", "unknown file type '.csv'"),
        ("plain_dir", "not a `datasets` save_to_disk folder"),
        ("json@nowhere", "is not a folder"),
        ("json@empty_dir", "no .jsonl/.json files"),
    ],
)
def test_bad_source_specs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spec: str, message: str) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.csv").write_text("a,b\n")
    (tmp_path / "plain_dir").mkdir()
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match=message):
        resolve_source(spec)

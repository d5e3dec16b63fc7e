"""Every kind of bad record, under both policies: `error` names file, line and reason; `skip` counts by reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmmrl_megatron.data.bad_input import BAD_INPUT_REASONS, BadInputCounts, BadInputError, BadInputHandler
from lmmrl_megatron.data.config import DataConfig
from lmmrl_megatron.data.pool import load_prompt_pool
from lmmrl_megatron.data.records import iter_records
from tests.data.helpers import chat, record, write_jsonl

# (bad line as written, reason); each is checked at a known line of a file of otherwise good records.
BAD_LINES: list[tuple[str, str]] = [
    ('{"message": "[{\\"role\\": \\"user\\"", "answer": "1"', "malformed_json"),  # the line itself is cut short
    (json.dumps({"message": '[{"role": "user", "content": "hi"}', "answer": "1"}), "malformed_json"),
    (json.dumps(["not", "an", "object"]), "malformed_json"),
    (json.dumps({"prompt": json.dumps(chat()), "answer": "1"}), "missing_field"),
    (json.dumps({"message": json.dumps({"role": "user", "content": "hi"}), "answer": "1"}), "bad_message"),
    (json.dumps({"message": json.dumps([{"role": "user", "text": "hi"}]), "answer": "1"}), "bad_message"),
    (json.dumps({"message": json.dumps(["hi"]), "answer": "1"}), "bad_message"),
    (
        json.dumps({"message": json.dumps([{"role": "user", "content": [{"type": "audio"}]}]), "answer": "1"}),
        "unknown_content_type",
    ),
    (json.dumps(record(answer="")), "empty_answer"),
    (json.dumps(record(answer="   ")), "empty_answer"),
    (json.dumps(record(answer=None)), "empty_answer"),
    (json.dumps({"message": json.dumps(chat())}), "empty_answer"),
    (json.dumps(record(image="imgs/nope.png")), "missing_image"),
    (json.dumps(record(image="imgs/corrupt.png")), "corrupt_image"),  # only with image_check=verify
]


def _file_with(image_dir: Path, bad_line: str) -> Path:
    good = [json.dumps(record(answer=str(i), image="imgs/red.png")) for i in range(3)]
    return write_jsonl(image_dir.parent / "data.jsonl", [good[0], good[1], bad_line, good[2]])


@pytest.mark.parametrize(("bad_line", "reason"), BAD_LINES)
def test_error_policy_names_file_line_and_reason(image_dir: Path, bad_line: str, reason: str) -> None:
    path = _file_with(image_dir, bad_line)
    with pytest.raises(BadInputError) as info:
        list(iter_records(str(path), handler=BadInputHandler("error"), image_check="verify"))
    assert info.value.reason == reason
    assert str(info.value).startswith(f"{path}:3: {reason}: ")
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(("bad_line", "reason"), BAD_LINES)
def test_skip_policy_drops_and_counts(image_dir: Path, bad_line: str, reason: str) -> None:
    path = _file_with(image_dir, bad_line)
    handler = BadInputHandler("skip")
    records = list(iter_records(str(path), handler=handler, image_check="verify"))
    assert [r.answer for r in records] == ["0", "1", "2"]
    assert [r.origin.line for r in records] == [1, 2, 4]
    expected = BadInputCounts()
    expected.add(reason)  # type: ignore[arg-type]
    assert handler.counts == expected and handler.counts.total == 1


def test_skip_counts_every_case_together_and_logs(image_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    good = json.dumps(record(answer="7", image="imgs/red.png"))
    path = write_jsonl(image_dir.parent / "all.jsonl", [good] + [line for line, _ in BAD_LINES] + [good])
    config = DataConfig(prompt_data=[str(path)], bad_input="skip", image_check="verify")
    with caplog.at_level("WARNING", logger="lmmrl_megatron.data.bad_input"):
        pool = load_prompt_pool(config)
    assert len(pool) == 2
    expected: dict[str, int] = {reason: 0 for reason in BAD_INPUT_REASONS}
    for _, reason in BAD_LINES:
        expected[reason] += 1
    assert pool.skipped.to_state() == expected
    assert pool.skipped.total == len(BAD_LINES)
    assert pool.skipped.to_metrics()["data/skipped/empty_answer"] == 4
    assert pool.skipped.to_metrics()["data/skipped/total"] == len(BAD_LINES)
    assert "malformed_json=3" in pool.skipped.summary()
    assert f"{path}:2: malformed_json: invalid JSON" in caplog.text
    detail = "'message': message[0].content[0] has unsupported type 'audio'"
    assert f"{path}:9: unknown_content_type: {detail}" in caplog.text


def test_corrupt_image_passes_the_cheap_check(image_dir: Path) -> None:
    """With image_check=exists a corrupt file is found later, when its prompt is encoded (see test_loader)."""
    path = _file_with(image_dir, json.dumps(record(image="imgs/corrupt.png")))
    assert len(list(iter_records(str(path), image_check="exists"))) == 4


def test_answers_can_be_optional(image_dir: Path) -> None:
    path = _file_with(image_dir, json.dumps(record(answer="")))
    records = list(iter_records(str(path), require_answer=False))
    assert [r.answer for r in records] == ["0", "1", "", "2"]


def test_broken_json_array_reports_the_element_line(tmp_path: Path) -> None:
    good = json.dumps(record(answer="1"))
    path = tmp_path / "d.json"
    path.write_text(f"[\n{good},\n{good},\n{{\"message\": oops}},\n{good}\n]\n")
    with pytest.raises(BadInputError, match=f"^{path}:4: malformed_json: invalid JSON"):
        list(iter_records(str(path)))
    handler = BadInputHandler("skip")
    assert len(list(iter_records(str(path), handler=handler))) == 2  # past a syntax error the rest is one bad record
    assert handler.counts.malformed_json == 1


def test_a_source_with_nothing_usable_is_an_error(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", ["{oops", json.dumps(record(answer=""))])
    config = DataConfig(prompt_data=[str(path)], bad_input="skip")
    with pytest.raises(ValueError, match=r"has no usable records; 2 skipped \(malformed_json=1, empty_answer=1\)"):
        load_prompt_pool(config)


def test_counts_state_round_trip() -> None:
    counts = BadInputCounts(missing_image=2, empty_answer=1)
    restored = BadInputCounts()
    restored.load_state(counts.to_state())
    assert restored == counts
    with pytest.raises(ValueError, match="unknown reasons"):
        restored.load_state({"bogus": 1})

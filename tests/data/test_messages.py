from __future__ import annotations

import json

import pytest

from lmmrl_megatron.data.messages import (
    ChatMessage,
    ImagePart,
    MessageError,
    TextPart,
    image_parts,
    parse_messages,
    to_template_messages,
    with_system_prompt,
)


def test_stringified_and_list_forms_parse_the_same() -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image", "image": "a.png"}, {"type": "text", "text": "Count."}]},
    ]
    expected = [
        ChatMessage("system", "Be brief."),
        ChatMessage("user", (ImagePart("a.png"), TextPart("Count."))),
    ]
    assert parse_messages(messages) == expected
    assert parse_messages(json.dumps(messages)) == expected


def test_openai_image_url_parts_and_untyped_parquet_structs() -> None:
    content = [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
        {"type": "image_url", "image_url": "http://host/x.png"},
        # Parquet list-of-struct columns carry every key, None where unused, and sometimes no type.
        {"type": None, "text": None, "image": {"bytes": b"\x89PNG", "path": None}},
        {"type": "text", "text": "Which?", "image": None},
    ]
    (message,) = parse_messages([{"role": "user", "content": content}])
    assert message.content == (
        ImagePart("data:image/png;base64,AAAA"),
        ImagePart("http://host/x.png"),
        ImagePart(b"\x89PNG"),
        TextPart("Which?"),
    )


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ('[{"role": "user", "content": "hi"', "malformed_json"),
        ("just some text", "malformed_json"),
        ('{"role": "user", "content": "hi"}', "bad_message"),
        ("[]", "bad_message"),
        ([{"role": "user"}], "bad_message"),
        ([{"content": "hi"}], "bad_message"),
        (["hello"], "bad_message"),
        ([{"role": 3, "content": "hi"}], "bad_message"),
        ([{"role": "user", "content": 5}], "bad_message"),
        ([{"role": "user", "content": [{"type": "text"}]}], "bad_message"),
        ([{"role": "user", "content": [{"type": "video", "video": "a.mp4"}]}], "unknown_content_type"),
        ([{"role": "user", "content": [{"type": "image", "image": ""}]}], "missing_image"),
    ],
)
def test_bad_messages_raise_with_reason(raw: object, reason: str) -> None:
    with pytest.raises(MessageError) as info:
        parse_messages(raw)
    assert info.value.reason == reason


def test_system_prompt_replaces_a_leading_system_turn() -> None:
    user = ChatMessage("user", "Count.")
    assert with_system_prompt([user], "S") == [ChatMessage("system", "S"), user]
    assert with_system_prompt([ChatMessage("system", "old"), user], "S") == [ChatMessage("system", "S"), user]
    assert with_system_prompt([user], None) == [user]


def test_template_messages_use_image_placeholders_in_order() -> None:
    content = [
        {"type": "image", "image": "1.png"},
        {"type": "text", "text": "and"},
        {"type": "image", "image": "2.png"},
    ]
    raw = [{"role": "user", "content": content}]
    messages = parse_messages(raw)
    assert [p.image for p in image_parts(messages)] == ["1.png", "2.png"]
    assert to_template_messages(messages) == [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "and"}, {"type": "image"}]}
    ]
    assert raw[0]["content"][0]["image"] == "1.png"  # the input is not modified

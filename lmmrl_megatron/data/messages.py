"""OpenAI-style chat messages as LMM-R1 stores them, parsed into typed values.

A record's `message` is a list of `{"role": ..., "content": ...}`, given either as a list or as a JSON string of
one (LMM-R1 stringifies it). `content` is a string or a list of parts: `{"type": "text", "text": ...}`,
`{"type": "image", "image": REF}` or OpenAI's `{"type": "image_url", "image_url": {"url": REF}}`. REF is a path,
a `file://` or `http(s)://` URL, a `data:image/...;base64,` URI, raw image bytes, or (from parquet and
`datasets`) a `{"bytes": ..., "path": ...}` struct.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from lmmrl_megatron.data.bad_input import BadInputReason

ImageRef = str | bytes


@dataclass(frozen=True)
class TextPart:
    text: str


@dataclass(frozen=True)
class ImagePart:
    """An image reference, resolved and decoded only when the prompt is encoded (see `images.load_image`)."""

    image: ImageRef


ContentPart = TextPart | ImagePart


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str | tuple[ContentPart, ...]


class MessageError(Exception):
    """A message that cannot be parsed; the reader turns it into a bad-input report with file and line."""

    def __init__(self, reason: BadInputReason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def parse_messages(raw: Any) -> list[ChatMessage]:
    """Parse a record's `message` value (a list, or a JSON string of one) into typed messages."""
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise MessageError("malformed_json", f"message is not valid JSON ({exc.msg} at char {exc.pos})") from exc
    if hasattr(raw, "tolist"):  # numpy arrays, as pandas hands back list columns
        raw = raw.tolist()
    if not isinstance(raw, list) or not raw:
        raise MessageError("bad_message", f"message must be a non-empty list of {{role, content}}, got {_short(raw)}")
    return [_parse_message(item, index) for index, item in enumerate(raw)]


def _parse_message(item: Any, index: int) -> ChatMessage:
    if not isinstance(item, dict) or "role" not in item or "content" not in item:
        raise MessageError("bad_message", f"message[{index}] must be a dict with role and content, got {_short(item)}")
    role, content = item["role"], item["content"]
    if not isinstance(role, str) or not role:
        raise MessageError("bad_message", f"message[{index}].role must be a non-empty string, got {_short(role)}")
    if isinstance(content, str):
        return ChatMessage(role=role, content=content)
    if hasattr(content, "tolist"):
        content = content.tolist()
    if not isinstance(content, list):
        raise MessageError("bad_message", f"message[{index}].content must be a string or a list, got {_short(content)}")
    parts = tuple(_parse_part(part, f"message[{index}].content[{i}]") for i, part in enumerate(content))
    return ChatMessage(role=role, content=parts)


def _part_type(part: dict[str, Any]) -> str | None:
    # Parquet structs carry every key of the column with None where unused, so only non-null keys count.
    declared = part.get("type")
    if declared is not None:
        return declared
    for key in ("text", "image", "image_url"):
        if part.get(key) is not None:
            return key
    return None


def _parse_part(part: Any, where: str) -> ContentPart:
    if not isinstance(part, dict):
        raise MessageError("bad_message", f"{where} must be a dict, got {_short(part)}")
    part_type = _part_type(part)
    if part_type == "text":
        text = part.get("text")
        if not isinstance(text, str):
            raise MessageError("bad_message", f"{where} has type text but no string 'text'")
        return TextPart(text=text)
    if part_type == "image":
        return ImagePart(image=_image_ref(part.get("image"), where))
    if part_type == "image_url":
        url = part.get("image_url")
        if isinstance(url, dict):
            url = url.get("url")
        return ImagePart(image=_image_ref(url, where))
    raise MessageError("unknown_content_type", f"{where} has unsupported type {part_type!r} (text, image, image_url)")


def _image_ref(value: Any, where: str) -> ImageRef:
    if isinstance(value, dict):  # the `datasets` Image feature's storage: {"bytes": ..., "path": ...}
        value = value.get("bytes") or value.get("path")
    if isinstance(value, bytearray | memoryview):
        value = bytes(value)
    if hasattr(value, "save") and hasattr(value, "mode"):  # an already decoded PIL image
        value = _pil_to_png(value)
    if isinstance(value, bytes) and value:
        return value
    if isinstance(value, str) and value.strip():
        return value.strip()
    raise MessageError("missing_image", f"{where} has no image reference, got {_short(value)}")


def _pil_to_png(image: Any) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def image_parts(messages: list[ChatMessage]) -> list[ImagePart]:
    """The image parts in prompt order (the order the processor must receive the images in)."""
    return [p for m in messages if not isinstance(m.content, str) for p in m.content if isinstance(p, ImagePart)]


def with_system_prompt(messages: list[ChatMessage], system_prompt: str | None) -> list[ChatMessage]:
    """Put `system_prompt` first, replacing a leading system turn rather than stacking a second one."""
    if system_prompt is None:
        return list(messages)
    rest = messages[1:] if messages and messages[0].role == "system" else messages
    return [ChatMessage(role="system", content=system_prompt), *rest]


def to_template_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """The plain dicts a Hugging Face chat template expects; images become `{"type": "image"}` placeholders."""
    rendered: list[dict[str, Any]] = []
    for message in messages:
        if isinstance(message.content, str):
            rendered.append({"role": message.role, "content": message.content})
            continue
        parts = [
            {"type": "text", "text": p.text} if isinstance(p, TextPart) else {"type": "image"} for p in message.content
        ]
        rendered.append({"role": message.role, "content": parts})
    return rendered


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."

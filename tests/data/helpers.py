"""Helpers for the data tests: small PNGs and LMM-R1 style records."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from PIL import Image

RED = (220, 30, 30)
BLUE = (30, 60, 220)


def png_bytes(size: tuple[int, int] = (56, 56), color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def chat(image: Any | None = None, text: str = "How many shapes are in the image?") -> list[dict[str, Any]]:
    """A one-turn user chat with an optional image part, as LMM-R1 writes it (before stringifying)."""
    content: list[dict[str, Any]] = []
    if image is not None:
        content.append({"type": "image", "image": image})
    content.append({"type": "text", "text": text})
    return [{"role": "user", "content": content}]


def record(
    answer: Any = "3", image: Any | None = None, text: str = "How many shapes?", stringify: bool = True
) -> dict[str, Any]:
    messages = chat(image, text)
    return {"message": json.dumps(messages) if stringify else messages, "answer": answer}


def write_jsonl(path: Path, rows: list[dict[str, Any] | str]) -> Path:
    """Rows that are strings are written verbatim (for malformed lines)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path

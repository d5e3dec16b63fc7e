"""Turning an image reference from a prompt record into a decoded RGB `PIL.Image`.

References: `file://` URLs, absolute paths, paths relative to the dataset file's folder, `data:image/...;base64,`
URIs, `http(s)://` URLs (fetched with a timeout), and raw encoded bytes. Failures raise `ImageError` with the
bad-input reason: `missing_image` (no such file, unreachable URL) or `corrupt_image` (bytes Pillow cannot decode).
"""

from __future__ import annotations

import base64
import binascii
import io
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Literal

from PIL import Image, UnidentifiedImageError

from lmmrl_megatron.data.bad_input import BadInputReason
from lmmrl_megatron.data.messages import ImageRef


class ImageError(Exception):
    def __init__(self, reason: BadInputReason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def _describe(ref: ImageRef) -> str:
    if isinstance(ref, bytes):
        return f"<{len(ref)} image bytes>"
    return ref if len(ref) <= 120 else ref[:117] + "..."


def is_url(ref: ImageRef) -> bool:
    return isinstance(ref, str) and ref.lower().startswith(("http://", "https://"))


def is_data_uri(ref: ImageRef) -> bool:
    return isinstance(ref, str) and ref.lower().startswith("data:")


def local_path(ref: str, base_dir: Path | None) -> Path:
    """The file a `file://` URL or a plain path names; relative paths are taken from `base_dir`."""
    if ref.lower().startswith("file://"):
        # file:///abs/path is the usual form; file://relative/path is accepted as a relative path.
        ref = urllib.parse.unquote(ref[len("file://") :])
    path = Path(ref).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    return path


def _decode_data_uri(ref: str) -> bytes:
    header, sep, payload = ref.partition(",")
    if not sep or not header.lower().startswith("data:image/") or not header.lower().endswith(";base64"):
        raise ImageError("corrupt_image", f"unsupported data URI {header[:60]!r}: expected data:image/...;base64,")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageError("corrupt_image", f"data URI is not valid base64: {exc}") from exc


def _fetch_url(url: str, timeout_s: float) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.read()
    except urllib.error.HTTPError as exc:
        raise ImageError("missing_image", f"fetching {url} failed: HTTP {exc.code} {exc.reason}") from exc
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ImageError("missing_image", f"cannot fetch {url} (timeout {timeout_s}s): {reason}") from exc


def read_image_bytes(ref: ImageRef, base_dir: Path | None, timeout_s: float) -> bytes:
    """The encoded bytes `ref` points at (fetched, decoded from base64, or read from disk)."""
    if isinstance(ref, bytes):
        return ref
    if is_data_uri(ref):
        return _decode_data_uri(ref)
    if is_url(ref):
        return _fetch_url(ref, timeout_s)
    path = local_path(ref, base_dir)
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise ImageError("missing_image", f"image file not found: {path}") from exc
    except OSError as exc:
        raise ImageError("missing_image", f"cannot read image file {path}: {exc}") from exc


def decode_image(data: bytes, description: str) -> Image.Image:
    """Decode encoded bytes fully (so truncated files fail here, not inside the processor) into RGB."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageError("corrupt_image", f"cannot decode image {description}: {exc}") from exc
    return image if image.mode == "RGB" else image.convert("RGB")


def load_image(ref: ImageRef, base_dir: Path | None = None, timeout_s: float = 10.0) -> Image.Image:
    """Read and decode the image `ref` names, as RGB."""
    return decode_image(read_image_bytes(ref, base_dir, timeout_s), _describe(ref))


def check_image(ref: ImageRef, base_dir: Path | None, mode: Literal["none", "exists", "verify"]) -> None:
    """Load-time check: `exists` stats local files; `verify` also lets Pillow check local and inline images.

    URLs are never fetched here (a data set of remote images would otherwise be downloaded at start-up); they are
    fetched, and fail if unreachable, when their prompt is encoded.
    """
    if mode == "none" or is_url(ref):
        return
    if isinstance(ref, str) and not is_data_uri(ref):
        path = local_path(ref, base_dir)
        if not path.is_file():
            raise ImageError("missing_image", f"image file not found: {path}")
        if mode == "exists":
            return
    if mode == "exists":
        return
    data = read_image_bytes(ref, base_dir, timeout_s=1.0)
    try:
        Image.open(io.BytesIO(data)).verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageError("corrupt_image", f"cannot decode image {_describe(ref)}: {exc}") from exc

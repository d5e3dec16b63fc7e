"""Every image reference form decodes to the right picture; failures carry a reason and a readable detail."""

from __future__ import annotations

import base64
import socket
from pathlib import Path

import pytest

from lmmrl_megatron.data.images import ImageError, check_image, load_image
from tests.data.helpers import BLUE, RED, png_bytes


def _assert_picture(image, size: tuple[int, int], color: tuple[int, int, int]) -> None:
    assert image.mode == "RGB" and image.size == size
    assert image.getpixel((size[0] // 2, size[1] // 2)) == color


def test_absolute_path_and_file_url(image_dir: Path) -> None:
    _assert_picture(load_image(str(image_dir / "blue.png")), (84, 56), BLUE)
    _assert_picture(load_image(f"file://{image_dir / 'blue.png'}"), (84, 56), BLUE)


def test_relative_path_and_relative_file_url_use_the_dataset_folder(image_dir: Path) -> None:
    base = image_dir.parent
    _assert_picture(load_image("imgs/red.png", base_dir=base), (56, 56), RED)
    _assert_picture(load_image("file://imgs/red.png", base_dir=base), (56, 56), RED)


def test_file_url_with_escaped_characters(tmp_path: Path) -> None:
    path = tmp_path / "with space.png"
    path.write_bytes(png_bytes((56, 56), BLUE))
    _assert_picture(load_image(f"file://{str(path).replace(' ', '%20')}"), (56, 56), BLUE)


def test_data_uri_and_raw_bytes() -> None:
    data = png_bytes((56, 84), BLUE)
    _assert_picture(load_image("data:image/png;base64," + base64.b64encode(data).decode()), (56, 84), BLUE)
    _assert_picture(load_image(data), (56, 84), BLUE)


def test_non_rgb_images_are_converted(tmp_path: Path) -> None:
    from PIL import Image

    path = tmp_path / "la.png"
    Image.new("LA", (56, 56), (100, 255)).save(path)
    image = load_image(str(path))
    assert image.mode == "RGB" and image.getpixel((0, 0)) == (100, 100, 100)


def test_http_image_is_fetched(http_base: str) -> None:
    _assert_picture(load_image(f"{http_base}/red.png", timeout_s=5), (56, 56), RED)


def test_http_404_is_a_missing_image(http_base: str) -> None:
    with pytest.raises(ImageError, match="HTTP 404") as info:
        load_image(f"{http_base}/gone.png", timeout_s=5)
    assert info.value.reason == "missing_image"


def test_unreachable_http_is_a_clear_error() -> None:
    with socket.socket() as sock:  # a port nobody listens on once this socket closes
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/x.png"
    with pytest.raises(ImageError, match=f"cannot fetch {url}") as info:
        load_image(url, timeout_s=2)
    assert info.value.reason == "missing_image"


def test_http_timeout_is_a_clear_error(http_base: str) -> None:
    with pytest.raises(ImageError, match=r"cannot fetch .*/slow.png \(timeout 0.3s\)") as info:
        load_image(f"{http_base}/slow.png", timeout_s=0.3)
    assert info.value.reason == "missing_image"


@pytest.mark.parametrize(
    ("ref", "reason", "message"),
    [
        ("imgs/nope.png", "missing_image", "image file not found"),
        ("imgs/corrupt.png", "corrupt_image", "cannot decode image"),
        (b"not an image at all", "corrupt_image", "cannot decode image <19 image bytes>"),
        ("data:image/png;base64,@@@", "corrupt_image", "not valid base64"),
        ("data:text/plain,hello", "corrupt_image", "unsupported data URI"),
        ("data:image/png;base64," + base64.b64encode(b"garbage").decode(), "corrupt_image", "cannot decode"),
    ],
)
def test_bad_images(image_dir: Path, ref: str | bytes, reason: str, message: str) -> None:
    with pytest.raises(ImageError, match=message) as info:
        load_image(ref, base_dir=image_dir.parent)
    assert info.value.reason == reason


def test_load_time_checks(image_dir: Path) -> None:
    base = image_dir.parent
    check_image("imgs/corrupt.png", base, "exists")  # exists only stats the file
    with pytest.raises(ImageError) as info:
        check_image("imgs/corrupt.png", base, "verify")
    assert info.value.reason == "corrupt_image"
    with pytest.raises(ImageError) as info:
        check_image("imgs/nope.png", base, "exists")
    assert info.value.reason == "missing_image"
    check_image("imgs/nope.png", base, "none")
    check_image("http://127.0.0.1:9/never-fetched-at-load.png", base, "verify")
    check_image("imgs/red.png", base, "verify")

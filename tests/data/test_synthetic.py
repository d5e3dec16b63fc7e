"""The synthetic task generator: real files in LMM-R1's format whose answers agree with the pixels."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from lmmrl_megatron.data.images import load_image
from lmmrl_megatron.data.records import PromptRecord, iter_records
from lmmrl_megatron.data.synthetic import COLORS, IMAGE_SIDES, QUESTIONS, TASKS, write_task

NUM_TRAIN, NUM_TEST = 24, 8


def _generate(task: str, out: Path, seed: int) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "lmmrl_megatron.data.synthetic", "--task", task, "--n", str(NUM_TRAIN),
               "--n-test", str(NUM_TEST), "--out", str(out), "--seed", str(seed)]
    return subprocess.run(command, capture_output=True, text=True, check=True, timeout=120)


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = {}
    for task in TASKS:
        out[task] = tmp_path_factory.mktemp(task)
        result = _generate(task, out[task], seed=3)
        assert f"train: {out[task] / 'train.jsonl'}" in result.stdout
    return out


def _pixels(record: PromptRecord) -> np.ndarray:
    (part,) = record.images
    return np.asarray(load_image(part.image, record.base_dir))


def _count_components(mask: np.ndarray) -> int:
    """Connected regions of True (8-neighbourhood), by flood fill."""
    seen = np.zeros_like(mask)
    height, width = mask.shape
    count = 0
    for y, x in zip(*np.nonzero(mask)):
        if seen[y, x]:
            continue
        count += 1
        stack = [(y, x)]
        seen[y, x] = True
        while stack:
            cy, cx = stack.pop()
            for ny in range(max(cy - 1, 0), min(cy + 2, height)):
                for nx in range(max(cx - 1, 0), min(cx + 2, width)):
                    if mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        stack.append((ny, nx))
    return count


def _num_nonblank_cells(mask: np.ndarray, cell: int = 28) -> int:
    side = mask.shape[0]
    return sum(bool(mask[y : y + cell, x : x + cell].any()) for y in range(0, side, cell) for x in range(0, side, cell))


def _shape_from_pixels(mask: np.ndarray) -> str:
    """Classify one solid shape by how much of its bounding box it fills: 1 square, pi/4 circle, 1/2 triangle."""
    ys, xs = np.nonzero(mask)
    fill = mask.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    return "square" if fill > 0.93 else "circle" if fill > 0.68 else "triangle"


def _answer_from_pixels(task: str, pixels: np.ndarray) -> str:
    mask = (pixels != 255).any(axis=2)
    if task == "count_shapes":
        return str(_count_components(mask))
    if task == "color_of_shape":
        (color,) = {tuple(int(c) for c in p) for p in pixels[mask]}
        return next(name for name, rgb in COLORS.items() if rgb == color)
    return _shape_from_pixels(mask)


@pytest.mark.parametrize("task", TASKS)
def test_files_load_back_and_answers_match_the_drawings(generated: dict[str, Path], task: str) -> None:
    out = generated[task]
    assert (out / "train.jsonl").is_file() and (out / "test.jsonl").is_file()
    assert len(list((out / "images").glob("*.png"))) == NUM_TRAIN + NUM_TEST
    train = list(iter_records(f"json@{out}", image_check="verify"))
    test = list(iter_records(f"json@{out}", split="test", image_check="verify"))
    assert (len(train), len(test)) == (NUM_TRAIN, NUM_TEST)
    for record in train + test:
        assert record.raw_message.startswith('[{"role": "user"')  # stringified, as LMM-R1 stores it
        assert record.messages[0].content[-1].text == QUESTIONS[task]
        pixels = _pixels(record)
        assert pixels.shape[0] == pixels.shape[1] and pixels.shape[0] in IMAGE_SIDES[task]
        assert _answer_from_pixels(task, pixels) == record.answer, record.origin
        if task == "count_shapes":  # one shape per image token: the design that makes counting learnable
            assert _num_nonblank_cells((pixels != 255).any(axis=2)) == int(record.answer)


@pytest.mark.parametrize("task", TASKS)
def test_answers_are_balanced_so_the_text_alone_gives_chance(generated: dict[str, Path], task: str) -> None:
    answers = Counter(r.answer for r in iter_records(str(generated[task] / "train.jsonl")))
    num_classes = 4 if task == "count_shapes" else 3
    assert len(answers) == num_classes
    assert max(answers.values()) - min(answers.values()) <= 1
    assert "\\boxed{}" in QUESTIONS[task]


def test_same_seed_same_bytes_other_seed_other_data(tmp_path: Path, generated: dict[str, Path]) -> None:
    _generate("count_shapes", tmp_path / "again", seed=3)
    _generate("count_shapes", tmp_path / "other", seed=4)
    original = generated["count_shapes"]
    for name in ("train.jsonl", "test.jsonl", "images/train_000000.png", "images/test_000007.png"):
        assert (tmp_path / "again" / name).read_bytes() == (original / name).read_bytes()
    assert (tmp_path / "other" / "train.jsonl").read_bytes() != (original / "train.jsonl").read_bytes()
    first_image = "images/train_000000.png"
    assert (tmp_path / "other" / first_image).read_bytes() != (original / first_image).read_bytes()


def test_train_and_test_splits_differ(generated: dict[str, Path]) -> None:
    out = generated["shape_name"]
    train = (out / "images" / "train_000000.png").read_bytes()
    assert all((out / "images" / f"test_{i:06d}.png").read_bytes() != train for i in range(NUM_TEST))


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--task must be one of"):
        write_task("count_cats", 4, 1, tmp_path)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="--n must be >= 1"):
        write_task("count_shapes", 0, 1, tmp_path)
    result = subprocess.run([sys.executable, "-m", "lmmrl_megatron.data.synthetic", "--task", "nope", "--n", "1",
                             "--out", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "invalid choice: 'nope'" in result.stderr

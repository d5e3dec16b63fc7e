"""Synthetic multimodal tasks written as real files in LMM-R1's prompt format.

    python -m lmmrl_megatron.data.synthetic --task count_shapes --n 512 --out /tmp/shapes [--n-test 64] [--seed 0]

writes `OUT/train.jsonl`, `OUT/test.jsonl` and `OUT/images/*.png`. Each record's `message` is a stringified chat
with the image as a path relative to the file (read it as `json@OUT` or `OUT/train.jsonl`), and `answer` is one
word or digit. Tasks:
  count_shapes    1 to 4 separate shapes, one per 28-pixel cell of a 56-pixel image:
                  "How many shapes are in the image?"                            -> 1 | 2 | 3 | 4
  color_of_shape  one large shape: "What color is the shape?"                       -> red | green | blue
  shape_name      one large shape: "Which shape is in the image: circle, square or triangle?" -> its name
The question of a task never changes and every answer is equally frequent, so without looking at the image no model
beats chance. The answer space is tiny and images small (56 to 112 pixels a side). Supervised on 8 prompts a step
(AdamW, lr 1e-3, one CPU thread), the tiny Qwen2.5-VL of `lmmrl_megatron.testing.make_tiny` reaches on the test
split: color_of_shape 100% in 100 steps (under a minute), count_shapes 100% in 300 steps (about a minute),
shape_name 78% in 500 steps (about three minutes). Prompts ask for the answer in `\\boxed{}`.
"""

from __future__ import annotations

import argparse
import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

from PIL import Image, ImageDraw

SyntheticTask = Literal["count_shapes", "color_of_shape", "shape_name"]
TASKS: tuple[str, ...] = get_args(SyntheticTask)
ShapeKind = Literal["circle", "square", "triangle"]
SHAPE_KINDS: tuple[str, ...] = get_args(ShapeKind)
# Saturated, far-apart colours on a white background: trivially separable from pixels, impossible from text.
COLORS: dict[str, tuple[int, int, int]] = {"red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 60, 220)}
BACKGROUND = (255, 255, 255)
# Multiples of 28 (Qwen-VL's merged patch) so the processor does not need to stretch the images. Counting keeps
# one size: with a fixed number of image tokens the count is the share of non-blank tokens, which the tiny model
# learns (100% on the test split after 300 supervised steps of 8 prompts); with mixed sizes the same count is a
# different share, and it stayed at chance for 500 steps.
IMAGE_SIDES: dict[str, tuple[int, ...]] = {
    "count_shapes": (56,),
    "color_of_shape": (56, 84, 112),
    "shape_name": (56, 84, 112),
}
MAX_COUNT = 4
_ANSWER_INSTRUCTION = "Put your final answer within \\boxed{}."
QUESTIONS: dict[str, str] = {
    "count_shapes": f"How many shapes are in the image? {_ANSWER_INSTRUCTION}",
    "color_of_shape": f"What color is the shape? {_ANSWER_INSTRUCTION}",
    "shape_name": f"Which shape is in the image: circle, square or triangle? {_ANSWER_INSTRUCTION}",
}
CELL = 28  # Qwen-VL's merged patch (2x2 patches of 14 pixels): one image token
_CELL_MARGIN = 2  # pixels kept blank at each cell edge, so shapes in neighbouring cells never touch
_MIN_SHAPE = 14


@dataclass(frozen=True)
class Shape:
    kind: ShapeKind
    color: str
    left: int
    top: int
    size: int  # side of the square bounding box

    def box(self) -> tuple[int, int, int, int]:
        return (self.left, self.top, self.left + self.size - 1, self.top + self.size - 1)


@dataclass(frozen=True)
class Scene:
    width: int
    height: int
    shapes: tuple[Shape, ...]


@dataclass(frozen=True)
class SyntheticExample:
    scene: Scene
    question: str
    answer: str


@dataclass
class SyntheticSummary:
    """What `write_task` wrote: the split files and the answer counts of each split."""

    out_dir: Path
    files: dict[str, Path] = field(default_factory=dict)
    answer_counts: dict[str, dict[str, int]] = field(default_factory=dict)


def draw_scene(scene: Scene) -> Image.Image:
    """Render without anti-aliasing, so every shape is one solid colour region."""
    image = Image.new("RGB", (scene.width, scene.height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for shape in scene.shapes:
        fill = COLORS[shape.color]
        x0, y0, x1, y1 = shape.box()
        if shape.kind == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif shape.kind == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        else:
            draw.polygon([((x0 + x1) // 2, y0), (x0, y1), (x1, y1)], fill=fill)
    return image


def _random_shape(rng: random.Random, side: int, size: int) -> Shape:
    return Shape(
        kind=rng.choice(SHAPE_KINDS),  # type: ignore[arg-type]
        color=rng.choice(list(COLORS)),
        left=rng.randrange(0, side - size + 1),
        top=rng.randrange(0, side - size + 1),
        size=size,
    )


def _place_shapes(rng: random.Random, side: int, count: int) -> tuple[Shape, ...]:
    """`count` shapes in distinct cells of a grid of `CELL`-pixel squares, one shape well inside each cell.

    The cells are Qwen-VL's merged 28x28 patches, so each shape lands in exactly one image token and the count is
    the number of tokens that are not blank: a signal even a tiny vision tower passes on.
    """
    num_cells_per_side = side // CELL
    cells = rng.sample(range(num_cells_per_side**2), count)
    shapes = []
    for cell in cells:
        size = rng.randrange(_MIN_SHAPE, CELL - 2 * _CELL_MARGIN + 1)
        row, col = divmod(cell, num_cells_per_side)
        slack = CELL - 2 * _CELL_MARGIN - size
        left = col * CELL + _CELL_MARGIN + rng.randrange(0, slack + 1)
        top = row * CELL + _CELL_MARGIN + rng.randrange(0, slack + 1)
        kind: ShapeKind = rng.choice(SHAPE_KINDS)  # type: ignore[assignment]
        shapes.append(Shape(kind, rng.choice(list(COLORS)), left, top, size))
    return tuple(shapes)


def answer_space(task: SyntheticTask) -> tuple[str, ...]:
    if task == "count_shapes":
        return tuple(str(n) for n in range(1, MAX_COUNT + 1))
    return tuple(COLORS) if task == "color_of_shape" else SHAPE_KINDS


def balanced_answers(task: SyntheticTask, num: int, rng: random.Random) -> list[str]:
    """`num` answers with every class equally often (within one), in random order."""
    space = answer_space(task)
    answers = [space[i % len(space)] for i in range(num)]
    rng.shuffle(answers)
    return answers


def make_example(task: SyntheticTask, answer: str, rng: random.Random) -> SyntheticExample:
    """A random scene whose answer to the task's question is `answer`."""
    assert answer in answer_space(task), (task, answer)
    side = rng.choice(IMAGE_SIDES[task])
    if task == "count_shapes":
        scene = Scene(side, side, _place_shapes(rng, side, int(answer)))
        return SyntheticExample(scene, QUESTIONS[task], answer)
    # One large shape, at least half the image, so colour and form fill most of the merged patches.
    shape = _random_shape(rng, side, rng.randrange(side // 2, side - 4))
    if task == "color_of_shape":
        shape = Shape(shape.kind, answer, shape.left, shape.top, shape.size)
    else:
        shape = Shape(answer, shape.color, shape.left, shape.top, shape.size)  # type: ignore[arg-type]
    return SyntheticExample(Scene(side, side, (shape,)), QUESTIONS[task], answer)


def to_record(example: SyntheticExample, image_path: str, task: str) -> dict[str, str]:
    """An LMM-R1 record: the chat stringified, the image as a path relative to the data file."""
    messages = [
        {
            "role": "user",
            "content": [{"type": "image", "image": image_path}, {"type": "text", "text": example.question}],
        }
    ]
    return {"message": json.dumps(messages, ensure_ascii=False), "answer": example.answer, "task": task}


def write_task(
    task: SyntheticTask, num_train: int, num_test: int, out_dir: str | Path, seed: int = 0
) -> SyntheticSummary:
    """Generate and write both splits; the same (task, sizes, seed) always writes the same bytes."""
    if task not in TASKS:
        raise ValueError(f"--task must be one of {', '.join(TASKS)}, got {task!r}")
    if num_train < 1 or num_test < 0:
        raise ValueError(f"--n must be >= 1 and --n-test >= 0, got {num_train} and {num_test}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    summary = SyntheticSummary(out_dir=out)
    for split, num in (("train", num_train), ("test", num_test)):
        # A string seed is hashed deterministically by `random`, and keeps the splits' streams independent.
        rng = random.Random(f"{seed}/{task}/{split}")
        answers: Counter[str] = Counter()
        lines = []
        for index, answer in enumerate(balanced_answers(task, num, rng)):
            example = make_example(task, answer, rng)
            image_path = f"images/{split}_{index:06d}.png"
            draw_scene(example.scene).save(out / image_path, format="PNG")
            lines.append(json.dumps(to_record(example, image_path, task), ensure_ascii=False))
            answers[example.answer] += 1
        path = out / f"{split}.jsonl"
        path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        summary.files[split] = path
        summary.answer_counts[split] = dict(sorted(answers.items()))
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", required=True, choices=TASKS)
    parser.add_argument("--n", type=int, required=True, help="number of training prompts")
    parser.add_argument("--n-test", type=int, default=None, help="number of test prompts (default: n // 10, >= 1)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    num_test = args.n_test if args.n_test is not None else max(1, args.n // 10)
    summary = write_task(args.task, args.n, num_test, args.out, seed=args.seed)
    for split, path in summary.files.items():
        print(f"{split}: {path} answers {summary.answer_counts[split]}")


if __name__ == "__main__":
    main()

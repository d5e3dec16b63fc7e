"""Records through the tiny Qwen2.5-VL checkpoint's own chat template and processor."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from lmmrl_megatron.data.bad_input import BadInputError
from lmmrl_megatron.data.encode import PromptEncoder
from lmmrl_megatron.data.records import PromptRecord, iter_records
from tests.data.helpers import BLUE, chat, png_bytes, record, write_jsonl

QUESTION = "How many shapes are in the image?"


def _one(path: Path | str, **kwargs: Any) -> PromptRecord:
    (only,) = list(iter_records(str(path), **kwargs))
    return only


def _num_image_tokens(processor: Any, input_ids: torch.Tensor) -> int:
    return int((input_ids == processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")).sum())


def test_encodes_with_the_models_chat_template(processor: Any, image_dir: Path) -> None:
    path = write_jsonl(image_dir.parent / "d.jsonl", [record(answer="3", image="imgs/red.png", text=QUESTION)])
    prompt = PromptEncoder(processor).encode(_one(path))
    expected_text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert prompt.prompt_text == expected_text
    assert prompt.prompt_text.endswith("<|im_start|>assistant\n")
    assert prompt.answer == "3" and prompt.raw_message == json.dumps(chat("imgs/red.png", QUESTION))
    # 56x56 pixels = 4x4 patches of 14 = 2x2 merged tokens.
    assert prompt.image_grid_thw.tolist() == [[1, 4, 4]]
    assert prompt.pixel_values.shape == (16, 3 * 2 * 14 * 14)
    assert prompt.input_ids.dtype == torch.int64 and prompt.input_ids.dim() == 1
    assert _num_image_tokens(processor, prompt.input_ids) == 4
    decoded = processor.tokenizer.decode(prompt.input_ids)
    assert QUESTION in decoded and decoded.count("<|vision_start|>") == 1


def test_every_image_form_gives_the_same_pixels(processor: Any, image_dir: Path, http_base: str) -> None:
    blue_path = image_dir / "blue.png"
    blue = blue_path.read_bytes()
    refs = [
        "imgs/blue.png",
        str(blue_path),
        f"file://{blue_path}",
        "data:image/png;base64," + base64.b64encode(blue).decode(),
        f"{http_base}/blue.png",
    ]
    path = write_jsonl(image_dir.parent / "forms.jsonl", [record(image=ref) for ref in refs])
    records = list(iter_records(str(path)))
    # Raw bytes come from columnar files: a parquet list<struct> message with a binary image field.
    parts_type = pa.struct([("type", pa.string()), ("text", pa.string()), ("image", pa.binary())])
    message_type = pa.list_(pa.struct([("role", pa.string()), ("content", pa.list_(parts_type))]))
    content = [{"type": "image", "text": None, "image": blue}, {"type": "text", "text": "Which?", "image": None}]
    message = [{"role": "user", "content": content}]
    table = pa.table({"message": pa.array([message], type=message_type), "answer": ["blue"]})
    pq.write_table(table, image_dir.parent / "bytes.parquet")
    records.append(_one(image_dir.parent / "bytes.parquet"))
    # A `datasets` folder whose message holds an Image feature: rows come back with decoded PIL images.
    from datasets import Dataset, Features, Image, List, Value

    part = {"type": Value("string"), "text": Value("string"), "image": Image()}
    features = Features({"message": List({"role": Value("string"), "content": List(part)}), "answer": Value("string")})
    content[0]["image"] = {"bytes": blue, "path": None}
    Dataset.from_list([{"message": message, "answer": "blue"}], features=features).save_to_disk(image_dir.parent / "hf")
    records.append(_one(image_dir.parent / "hf"))

    encoder = PromptEncoder(processor)
    prompts = [encoder.encode(r) for r in records]
    reference = prompts[0]
    assert reference.image_grid_thw.tolist() == [[1, 4, 6]]  # 84x56 pixels
    for prompt in prompts[1:]:
        assert torch.equal(prompt.pixel_values, reference.pixel_values)
        assert torch.equal(prompt.image_grid_thw, reference.image_grid_thw)


def test_system_prompt_replaces_the_templates_default(processor: Any, image_dir: Path) -> None:
    path = write_jsonl(image_dir.parent / "d.jsonl", [record(image="imgs/red.png")])
    text = PromptEncoder(processor, system_prompt="Answer in \\boxed{}.").encode(_one(path)).prompt_text
    assert text.startswith("<|im_start|>system\nAnswer in \\boxed{}.<|im_end|>\n<|im_start|>user\n")
    assert "You are a helpful assistant." not in text


def test_min_and_max_pixels_bound_the_image_grid(processor: Any, tmp_path: Path) -> None:
    (tmp_path / "small.png").write_bytes(png_bytes((56, 56), BLUE))
    (tmp_path / "large.png").write_bytes(png_bytes((112, 112), BLUE))
    path = write_jsonl(tmp_path / "d.jsonl", [record(image="small.png"), record(image="large.png")])
    small, large = list(iter_records(str(path)))
    default = PromptEncoder(processor)
    assert default.encode(small).image_grid_thw.tolist() == [[1, 4, 4]]
    assert default.encode(large).image_grid_thw.tolist() == [[1, 8, 8]]
    upscaled = PromptEncoder(processor, min_pixels=112 * 112).encode(small)
    assert upscaled.image_grid_thw.tolist() == [[1, 8, 8]] and _num_image_tokens(processor, upscaled.input_ids) == 16
    downscaled = PromptEncoder(processor, max_pixels=56 * 56).encode(large)
    assert downscaled.image_grid_thw.tolist() == [[1, 4, 4]] and _num_image_tokens(processor, downscaled.input_ids) == 4
    with pytest.raises(ValueError, match="empty range"):
        PromptEncoder(processor, min_pixels=10**9)


def test_text_only_and_multi_image_prompts(processor: Any, image_dir: Path) -> None:
    two_images = [{"role": "user", "content": [{"type": "image", "image": "imgs/red.png"},
                                               {"type": "image", "image": "imgs/blue.png"},
                                               {"type": "text", "text": "Same colour?"}]}]
    rows = [record(image=None), {"message": json.dumps(two_images), "answer": "no"}]
    path = write_jsonl(image_dir.parent / "d.jsonl", rows)
    text_only, pair = [PromptEncoder(processor).encode(r) for r in iter_records(str(path))]
    assert text_only.pixel_values is None and text_only.image_grid_thw is None and text_only.num_images == 0
    assert _num_image_tokens(processor, text_only.input_ids) == 0
    assert pair.image_grid_thw.tolist() == [[1, 4, 4], [1, 4, 6]]  # the order of the message
    assert pair.pixel_values.shape[0] == 16 + 24
    assert _num_image_tokens(processor, pair.input_ids) == 4 + 6


@pytest.mark.parametrize(
    ("image", "reason"),
    [("imgs/nope.png", "missing_image"), ("imgs/corrupt.png", "corrupt_image")],
)
def test_bad_images_at_encode_time_name_the_record(processor: Any, image_dir: Path, image: str, reason: str) -> None:
    path = write_jsonl(image_dir.parent / "d.jsonl", [record(image="imgs/red.png"), record(image=image)])
    bad = list(iter_records(str(path), image_check="none"))[1]
    with pytest.raises(BadInputError, match=f"^{path}:2: {reason}: ") as info:
        PromptEncoder(processor).encode(bad)
    assert info.value.reason == reason


def test_unreachable_http_image_at_encode_time(processor: Any, tmp_path: Path, http_base: str) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [record(image=f"{http_base}/missing.png")])
    with pytest.raises(BadInputError, match=f"^{path}:1: missing_image: fetching .*/missing.png failed: HTTP 404"):
        PromptEncoder(processor).encode(_one(path))


def test_processor_rejects_an_absurd_aspect_ratio(processor: Any, tmp_path: Path) -> None:
    (tmp_path / "thin.png").write_bytes(png_bytes((2000, 5)))
    path = write_jsonl(tmp_path / "d.jsonl", [record(image="thin.png")])
    with pytest.raises(BadInputError, match="corrupt_image: the processor rejected the prompt: .*aspect ratio"):
        PromptEncoder(processor).encode(_one(path))


def test_prompt_too_long(processor: Any, image_dir: Path) -> None:
    path = write_jsonl(image_dir.parent / "d.jsonl", [record(image="imgs/red.png")])
    prompt = _one(path)
    length = PromptEncoder(processor).encode(prompt).num_tokens
    assert PromptEncoder(processor, max_prompt_length=length).encode(prompt).num_tokens == length
    expected = f"prompt_too_long: {length} tokens .* > data.max_prompt_length={length - 1}"
    with pytest.raises(BadInputError, match=expected):
        PromptEncoder(processor, max_prompt_length=length - 1).encode(prompt)

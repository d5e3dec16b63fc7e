"""The prompt loader: full batches of encoded prompts, bad prompts handled at encode time, exact resume."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from lmmrl_megatron.data.bad_input import BadInputError
from lmmrl_megatron.data.config import DataConfig
from lmmrl_megatron.data.loader import PromptBatch, build_prompt_loader
from lmmrl_megatron.data.synthetic import write_task
from tests.data.helpers import record, write_jsonl


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shapes")
    write_task("count_shapes", 11, 3, out, seed=1)
    return out


def _fingerprint(batch: PromptBatch) -> list[tuple[int, str, list[int], float]]:
    return [
        (index, p.answer, p.input_ids.tolist(), float(p.pixel_values.sum()))
        for index, p in zip(batch.indices, batch.prompts)
    ]


def test_batches_are_full_and_cover_the_pool(processor: Any, shapes_dir: Path) -> None:
    config = DataConfig(prompt_data=[f"json@{shapes_dir}"], system_prompt="Think, then answer.")
    loader = build_prompt_loader(config, processor, batch_size=4)
    assert len(loader.pool) == 11
    batches = [loader.next_batch() for _ in range(3)]  # 12 prompts: one epoch and one more
    assert all(len(b.prompts) == 4 for b in batches)
    indices = [i for b in batches for i in b.indices]
    assert sorted(indices[:11]) == list(range(11)) and batches[-1].epoch == 1
    prompt = batches[0].prompts[0]
    assert prompt.prompt_text.startswith("<|im_start|>system\nThink, then answer.")
    assert prompt.image_grid_thw.shape == (1, 3) and prompt.answer in {"1", "2", "3", "4"}
    assert prompt.record is loader.pool.records[batches[0].indices[0]]


def test_test_split_of_the_same_config(processor: Any, shapes_dir: Path) -> None:
    loader = build_prompt_loader(DataConfig(prompt_data=[f"json@{shapes_dir}"]), processor, batch_size=3, split="test")
    assert len(loader.pool) == 3 and all("test.jsonl" in r.origin.file for r in loader.pool.records)


@pytest.mark.parametrize("stop_after", [1, 3])
def test_resumed_loader_sees_the_same_prompts_in_the_same_order(
    processor: Any, shapes_dir: Path, stop_after: int
) -> None:
    config = DataConfig(prompt_data=[f"json@{shapes_dir}"], seed=7)
    uninterrupted = build_prompt_loader(config, processor, batch_size=4)
    expected = [_fingerprint(uninterrupted.next_batch()) for _ in range(5)]

    first = build_prompt_loader(config, processor, batch_size=4)
    seen = [_fingerprint(first.next_batch()) for _ in range(stop_after)]
    checkpoint = json.dumps(first.state_dict())  # what the trainer writes with its checkpoint
    resumed = build_prompt_loader(config, processor, batch_size=4)  # a fresh process builds everything again
    resumed.load_state_dict(json.loads(checkpoint))
    seen += [_fingerprint(resumed.next_batch()) for _ in range(5 - stop_after)]
    assert seen == expected
    other_seed = build_prompt_loader(DataConfig(prompt_data=[f"json@{shapes_dir}"], seed=8), processor, batch_size=4)
    assert [_fingerprint(other_seed.next_batch()) for _ in range(2)] != expected[:2]


def _mixed_quality_file(image_dir: Path) -> Path:
    rows = [record(answer=str(i), image="imgs/red.png") for i in range(6)]
    rows[1] = record(answer="missing", image="imgs/nope.png")
    rows[4] = record(answer="corrupt", image="imgs/corrupt.png")
    return write_jsonl(image_dir.parent / "mixed.jsonl", rows)


def test_skip_replaces_bad_prompts_and_counts_each_once(processor: Any, image_dir: Path) -> None:
    path = _mixed_quality_file(image_dir)
    config = DataConfig(prompt_data=[str(path)], bad_input="skip", image_check="none", seed=3)
    loader = build_prompt_loader(config, processor, batch_size=3)
    assert len(loader.pool) == 6  # nothing is decoded at load time with image_check=none
    batches = [loader.next_batch() for _ in range(6)]  # 18 good prompts: more than four passes over the pool
    answers = [p.answer for b in batches for p in b.prompts]
    assert all(len(b.prompts) == 3 for b in batches)
    assert set(answers) == {"0", "2", "3", "5"} and len(answers) == 18
    assert loader.skipped.missing_image == 1 and loader.skipped.corrupt_image == 1 and loader.skipped.total == 2
    state = loader.state_dict()
    assert state["bad_indices"] == [1, 4] and state["skipped"]["missing_image"] == 1

    resumed = build_prompt_loader(config, processor, batch_size=3)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    assert resumed.skipped.total == 2 and resumed.pool.skipped.total == 2
    assert [p.answer for p in resumed.next_batch().prompts] == [p.answer for p in loader.next_batch().prompts]
    assert resumed.skipped.total == 2  # known bad prompts are not decoded and counted again


def test_error_policy_stops_at_the_first_bad_prompt(processor: Any, image_dir: Path) -> None:
    path = _mixed_quality_file(image_dir)
    config = DataConfig(prompt_data=[str(path)], bad_input="error", image_check="none", shuffle=False)
    loader = build_prompt_loader(config, processor, batch_size=3)
    with pytest.raises(BadInputError, match=f"^{path}:2: missing_image: image file not found: .*nope.png"):
        loader.next_batch()
    with pytest.raises(BadInputError, match=f"^{path}:2: missing_image"):  # load-time check catches it too
        build_prompt_loader(DataConfig(prompt_data=[str(path)]), processor, batch_size=3)


def test_prompt_too_long_is_skipped(processor: Any, image_dir: Path) -> None:
    long_text = "How many shapes are in the image? " * 20
    rows = [record(answer="short", image="imgs/red.png"), record(answer="long", image="imgs/red.png", text=long_text)]
    path = write_jsonl(image_dir.parent / "d.jsonl", rows)
    config = DataConfig(prompt_data=[str(path)], bad_input="skip", max_prompt_length=60)
    loader = build_prompt_loader(config, processor, batch_size=4)
    assert [p.answer for p in loader.next_batch().prompts] == ["short"] * 4
    assert loader.skipped.prompt_too_long == 1


def test_no_usable_prompt_is_a_clear_error(processor: Any, image_dir: Path) -> None:
    rows = [record(image="imgs/corrupt.png"), record(image="imgs/corrupt.png")]
    config = DataConfig(prompt_data=[str(write_jsonl(image_dir.parent / "d.jsonl", rows))], bad_input="skip")
    loader = build_prompt_loader(config, processor, batch_size=1)
    with pytest.raises(ValueError, match=r"no usable prompts left .*2 skipped \(corrupt_image=2\)"):
        loader.next_batch()


def test_batch_size_and_state_are_checked(processor: Any, shapes_dir: Path) -> None:
    config = DataConfig(prompt_data=[f"json@{shapes_dir}"])
    with pytest.raises(ValueError, match="rollout_batch_size"):
        build_prompt_loader(config, processor, batch_size=0)
    loader = build_prompt_loader(config, processor, batch_size=2)
    with pytest.raises(ValueError, match="lacks 'bad_indices'"):
        loader.load_state_dict({"sampler": loader.sampler.state_dict(), "skipped": {}})
    assert torch.is_tensor(loader.next_batch().prompts[0].input_ids)

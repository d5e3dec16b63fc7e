from __future__ import annotations

import re

import pytest

from lmmrl_megatron.config.loader import load_config
from lmmrl_megatron.data.config import DataConfig


def test_defaults_are_valid() -> None:
    config = DataConfig()
    assert config.input_key == "message" and config.label_key == "answer"
    assert config.bad_input == "error" and config.prompt_data == []


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"prompt_data": ["a.jsonl", "b.jsonl"], "prompt_data_probs": [1.0]}, "prompt_data_probs"),
        ({"prompt_data": ["a.jsonl", "b.jsonl"], "prompt_data_probs": [0.3, 0.6]}, "prompt_data_probs"),
        ({"prompt_data": ["a.jsonl", "b.jsonl"], "prompt_data_probs": [1.5, -0.5]}, "prompt_data_probs[1]"),
        ({"prompt_data": ["a.jsonl", " "]}, "prompt_data[1]"),
        ({"max_samples": 0}, "max_samples"),
        ({"min_pixels": 0}, "min_pixels"),
        ({"min_pixels": 10_000, "max_pixels": 5_000}, "min_pixels"),
        ({"max_prompt_length": -1}, "max_prompt_length"),
        ({"bad_input": "ignore"}, "bad_input"),
        ({"image_check": "always"}, "image_check"),
        ({"mix_strategy": "random"}, "mix_strategy"),
        ({"image_timeout_s": 0.0}, "image_timeout_s"),
        ({"input_key": ""}, "input_key"),
        ({"label_key": ""}, "label_key"),
    ],
)
def test_invalid_values_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=re.escape(f"data.{field}")):
        DataConfig(**kwargs)


def test_probs_summing_to_one_are_accepted() -> None:
    config = DataConfig(prompt_data=["a.jsonl", "b.jsonl", "c.jsonl"], prompt_data_probs=[0.2, 0.3, 0.5])
    assert config.prompt_data_probs == [0.2, 0.3, 0.5]


def test_loads_through_the_project_config_loader(tmp_path) -> None:
    path = tmp_path / "data.yaml"
    path.write_text(
        "prompt_data: [json@/data/geo, /data/math.parquet]\nprompt_data_probs: [0.25, 0.75]\nbad_input: skip\n"
    )
    config = load_config(DataConfig, str(path), ["max_samples=100", "system_prompt=Think first."])
    assert config.prompt_data == ["json@/data/geo", "/data/math.parquet"]
    assert config.prompt_data_probs == [0.25, 0.75]
    assert config.bad_input == "skip" and config.max_samples == 100 and config.system_prompt == "Think first."
    with pytest.raises(ValueError, match="prompt_data_probs"):
        load_config(DataConfig, str(path), ["prompt_data_probs=[0.5, 0.6]"])

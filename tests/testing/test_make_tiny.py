"""The tiny checkpoint factory writes real Hugging Face checkpoints that transformers loads offline."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from lmmrl_megatron.testing.make_tiny import QWEN_VL_CHAT_TEMPLATE, apply_override, make_tiny_checkpoint

MESSAGES = [
    {
        "role": "user",
        "content": [{"type": "image", "image": "file:///x.png"}, {"type": "text", "text": "How many circles?"}],
    }
]


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def tiny_dir(request, tmp_path_factory) -> Path:
    return make_tiny_checkpoint(request.param, tmp_path_factory.mktemp(request.param), seed=3)


def test_loads_offline_and_generates_from_an_image(tiny_dir: Path, monkeypatch) -> None:
    from transformers import AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = AutoModelForImageTextToText.from_pretrained(tiny_dir)
    processor = AutoProcessor.from_pretrained(tiny_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)

    text = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|>How many circles?<|im_end|>\n<|im_start|>assistant\n"
    )
    image = Image.new("RGB", (84, 56), (200, 30, 30))  # non-square: 6x4 patches -> 3x2 merged tokens
    inputs = processor(text=[text], images=[image], return_tensors="pt")
    assert inputs["image_grid_thw"].tolist() == [[1, 4, 6]]
    num_image_tokens = int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert num_image_tokens == 6

    torch.manual_seed(0)
    out = model.generate(**inputs, max_new_tokens=6, do_sample=True)
    assert out.shape[1] > inputs["input_ids"].shape[1]
    logits = model(**inputs).logits
    assert logits.shape[-1] == model.config.text_config.vocab_size
    assert torch.isfinite(logits).all()


def test_special_tokens_and_config_ids_agree(tiny_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    config = json.loads((tiny_dir / "config.json").read_text())
    for key, token in [
        ("image_token_id", "<|image_pad|>"),
        ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"),
        ("vision_end_token_id", "<|vision_end|>"),
    ]:
        assert config[key] == tokenizer.convert_tokens_to_ids(token)
    ids = tokenizer("<|im_start|>user\nhi<|im_end|>")["input_ids"]
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert ids[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.eos_token == "<|im_end|>"
    generation = json.loads((tiny_dir / "generation_config.json").read_text())
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in generation["eos_token_id"]


def test_same_seed_same_weights_other_seed_other_weights(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    a = load_file(make_tiny_checkpoint("qwen2_vl", tmp_path / "a", seed=1) / "model.safetensors")
    b = load_file(make_tiny_checkpoint("qwen2_vl", tmp_path / "b", seed=1) / "model.safetensors")
    c = load_file(make_tiny_checkpoint("qwen2_vl", tmp_path / "c", seed=2) / "model.safetensors")
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_overrides_reach_the_saved_config(tmp_path: Path) -> None:
    from transformers import AutoConfig, AutoModelForImageTextToText

    out = make_tiny_checkpoint(
        "qwen2_5_vl",
        tmp_path / "odd",
        overrides=[
            "text_config.num_key_value_heads=1",
            "tie_word_embeddings=true",
            "text_config.vocab_size=500",
            "vision_config.fullatt_block_indexes=[0]",
        ],
    )
    config = AutoConfig.from_pretrained(out)
    assert config.text_config.num_key_value_heads == 1
    assert config.tie_word_embeddings is True
    assert config.text_config.vocab_size == 500
    assert list(config.vision_config.fullatt_block_indexes) == [0]
    model = AutoModelForImageTextToText.from_pretrained(out)
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def test_unknown_override_key_is_an_error() -> None:
    config = {"text_config": {"hidden_size": 8}}
    with pytest.raises(ValueError, match="unknown key 'hiden_size'"):
        apply_override(config, "text_config.hiden_size=3")
    with pytest.raises(ValueError, match="key=value"):
        apply_override(config, "text_config.hidden_size")
    apply_override(config, "text_config.hidden_size=16")
    assert config["text_config"]["hidden_size"] == 16


def test_command_line_entry_point(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    subprocess.run(
        [sys.executable, "-m", "lmmrl_megatron.testing.make_tiny", "--arch", "qwen2_vl", "--out", str(out),
         "--seed", "5", "--set", "text_config.num_hidden_layers=2"],
        check=True,
        capture_output=True,
    )
    assert json.loads((out / "config.json").read_text())["text_config"]["num_hidden_layers"] == 2
    assert "{% for message in messages %}" in QWEN_VL_CHAT_TEMPLATE
    assert (out / "chat_template.jinja").is_file() and (out / "tokenizer.json").is_file()


@pytest.mark.gpu
def test_gpu_checkpoint_leaves_no_cached_memory_behind(tmp_path: Path) -> None:
    # a benchmark writes its random checkpoint on the GPU and then trains there in the same process
    sizes = ["text_config.hidden_size=512", "text_config.intermediate_size=2048", "text_config.num_hidden_layers=8"]
    before = torch.cuda.memory_reserved()
    out = make_tiny_checkpoint("qwen2_5_vl", tmp_path / "gpu", overrides=sizes, dtype="bf16", device="cuda")
    assert (out / "model.safetensors").stat().st_size > 20 * 2**20  # the weights were big enough to be cached
    assert torch.cuda.memory_reserved() == before

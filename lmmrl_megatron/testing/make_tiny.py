"""Write tiny Qwen2-VL / Qwen2.5-VL checkpoints in the real Hugging Face format.

    python -m lmmrl_megatron.testing.make_tiny --arch qwen2_5_vl --out DIR [--seed N] [--set key=value ...]

The directory holds config.json, generation_config.json, model.safetensors (seeded random weights), a tokenizer
with Qwen's special tokens and a Qwen-VL style chat template, and a processor with small min/max pixels, so
`AutoModelForImageTextToText`, `AutoProcessor` and `AutoTokenizer` load it offline with `from_pretrained`.
`--set` edits any config field by dotted path (`text_config.num_key_value_heads=1`, `tie_word_embeddings=true`,
`vision_config.fullatt_block_indexes=[1]`); values are parsed as YAML scalars or lists.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path
from typing import Any

import torch
import yaml

from lmmrl_megatron.models.qwen_vl.config import TORCH_DTYPES as DTYPES
from lmmrl_megatron.testing.tokenizer import build_qwen_like_tokenizer

ARCHS = ("qwen2_vl", "qwen2_5_vl")

# Qwen-VL's chat template: a default system turn, images and videos as vision_start/pad/vision_end, ChatML turns.
QWEN_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Smallest images the processor will produce: 56x56 pixels = 4x4 patches of 14 = 2x2 merged tokens.
TINY_MIN_PIXELS = 56 * 56
TINY_MAX_PIXELS = 224 * 224

_TEXT_DEFAULTS: dict[str, Any] = {
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "hidden_act": "silu",
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6,
    # head_dim 16 -> 8 rotary frequencies split over (temporal, height, width).
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
}

_VISION_DEFAULTS: dict[str, dict[str, Any]] = {
    "qwen2_vl": {
        "depth": 2,
        "embed_dim": 32,
        "hidden_size": 64,  # Qwen2-VL's vision `hidden_size` is the merger's output width = text hidden size
        "mlp_ratio": 2,
        "num_heads": 2,
        "hidden_act": "quick_gelu",
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    },
    "qwen2_5_vl": {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "out_hidden_size": 64,
        "num_heads": 2,
        "hidden_act": "silu",
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 56,  # 2x2 merged tokens per window, so tiny images still span several windows
        "fullatt_block_indexes": [1],
        "tokens_per_second": 2,
    },
}


def default_config_dict(arch: str) -> dict[str, Any]:
    """The tiny config for `arch` before overrides and token ids, as a nested dict."""
    if arch not in ARCHS:
        raise ValueError(f"--arch must be one of {ARCHS}, got {arch!r}")
    return {
        "model_type": arch,
        "text_config": copy.deepcopy(_TEXT_DEFAULTS),
        "vision_config": copy.deepcopy(_VISION_DEFAULTS[arch]),
        "tie_word_embeddings": False,
    }


def set_text_head_dim(config: dict[str, Any], arch: str, head_dim: int) -> None:
    """Widen the text model to `head_dim` per attention head (vLLM's CPU attention needs >= 32): the hidden size,
    the M-RoPE sections (in the defaults' 2:3:3 proportion) and the vision merger's output width follow."""
    if head_dim % 16 != 0:
        raise ValueError(f"--text-head-dim must be a multiple of 16 (M-RoPE sections 2:3:3 of head_dim / 2), got {head_dim}")
    text = config["text_config"]
    text["hidden_size"] = text["num_attention_heads"] * head_dim
    unit = head_dim // 16
    text["rope_parameters"]["mrope_section"] = [2 * unit, 3 * unit, 3 * unit]
    merger_width_key = "hidden_size" if arch == "qwen2_vl" else "out_hidden_size"
    config["vision_config"][merger_width_key] = text["hidden_size"]


def apply_override(config: dict[str, Any], assignment: str) -> None:
    """Apply one `dotted.key=value` to a nested dict; the key must already exist (typos are errors)."""
    if "=" not in assignment:
        raise ValueError(f"--set expects key=value, got {assignment!r}")
    dotted_key, raw_value = assignment.split("=", 1)
    parts = dotted_key.strip().split(".")
    node = config
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if not isinstance(child, dict):
            raise ValueError(f"--set {dotted_key}: {'.'.join(parts[: depth + 1])!r} is not a config section")
        node = child
    if parts[-1] not in node:
        raise ValueError(f"--set {dotted_key}: unknown key {parts[-1]!r}; known: {sorted(node)}")
    node[parts[-1]] = yaml.safe_load(raw_value)


def _build_hf_config(arch: str, config: dict[str, Any]):
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

    config_class = Qwen2VLConfig if arch == "qwen2_vl" else Qwen2_5_VLConfig
    kwargs = {k: v for k, v in config.items() if k != "model_type"}
    return config_class(**kwargs)



def make_tiny_checkpoint(
    arch: str,
    out_dir: str | Path,
    seed: int = 0,
    overrides: list[str] | None = None,
    dtype: str = "fp32",
    text_head_dim: int | None = None,
    device: str = "cpu",
) -> Path:
    """Write a tiny, seeded, offline-loadable Qwen-VL checkpoint to `out_dir` and return its path.

    With `overrides` giving real sizes (and `dtype="bf16"`) it writes random full-size checkpoints for benchmarks.
    `text_head_dim` widens the text model first (see `set_text_head_dim`); overrides apply after it. `device`
    is where the random weights are drawn: "cuda" makes a 3B-shaped benchmark checkpoint in seconds instead of
    minutes of CPU initialisation (other values than on CPU for the same seed).
    """
    from transformers import AutoModelForImageTextToText, GenerationConfig, Qwen2Tokenizer
    from transformers.models.qwen2_vl import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    out = Path(out_dir)
    config = default_config_dict(arch)
    if text_head_dim is not None:
        set_text_head_dim(config, arch, text_head_dim)
    for assignment in overrides or []:
        apply_override(config, assignment)

    tokenizer = Qwen2Tokenizer(
        tokenizer_object=build_qwen_like_tokenizer(),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        chat_template=QWEN_VL_CHAT_TEMPLATE,
    )
    token_id = tokenizer.convert_tokens_to_ids
    num_tokens = len(tokenizer)
    if config["text_config"]["vocab_size"] < num_tokens:
        raise ValueError(f"text_config.vocab_size={config['text_config']['vocab_size']} < tokenizer size {num_tokens}")
    config["text_config"].update(
        bos_token_id=token_id("<|endoftext|>"), eos_token_id=token_id("<|im_end|>"), pad_token_id=token_id("<|endoftext|>")
    )
    config.update(
        image_token_id=token_id("<|image_pad|>"),
        video_token_id=token_id("<|video_pad|>"),
        vision_start_token_id=token_id("<|vision_start|>"),
        vision_end_token_id=token_id("<|vision_end|>"),
    )
    hf_config = _build_hf_config(arch, config)

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(hf_config, dtype=DTYPES[dtype])
    model.generation_config = GenerationConfig(
        bos_token_id=token_id("<|endoftext|>"),
        eos_token_id=[token_id("<|im_end|>"), token_id("<|endoftext|>")],
        pad_token_id=token_id("<|endoftext|>"),
    )
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    del model
    if torch.device(device).type == "cuda":
        # the caller often goes on to train on this GPU (bench/vs_trl.py's child starts Ray and the trainer next):
        # the allocator would otherwise keep the checkpoint's memory cached in this process (8.5 GiB at 3B)
        torch.cuda.empty_cache()

    image_processor = Qwen2VLImageProcessor(min_pixels=TINY_MIN_PIXELS, max_pixels=TINY_MAX_PIXELS)
    video_processor = Qwen2VLVideoProcessor(min_pixels=TINY_MIN_PIXELS, max_pixels=TINY_MAX_PIXELS)
    processor = Qwen2VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=QWEN_VL_CHAT_TEMPLATE,
    )
    processor.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", required=True, choices=ARCHS)
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="dtype of the saved weights")
    parser.add_argument("--text-head-dim", type=int, default=None, help="text head size (vLLM on CPU needs >= 32)")
    args = parser.parse_args(argv)
    out = make_tiny_checkpoint(
        args.arch, args.out, seed=args.seed, overrides=args.overrides, dtype=args.dtype, text_head_dim=args.text_head_dim
    )
    summary = json.loads((out / "config.json").read_text())
    print(f"wrote {args.arch} tiny checkpoint to {out} (text hidden {summary['text_config']['hidden_size']})")


if __name__ == "__main__":
    main()

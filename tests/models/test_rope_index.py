"""Our 3D position ids against transformers' `get_rope_index`, on many random batches of both families."""

from __future__ import annotations

import random

import pytest
import torch

from lmmrl_megatron.models.qwen_vl.rope_index import RopeIndexConfig, get_rope_index

IMAGE, VIDEO, START, END = 12, 13, 9, 10
MERGE = 2


def _hf_model(arch: str):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLModel, Qwen2VLConfig, Qwen2VLModel

    text = {"vocab_size": 64, "hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 1,
            "num_attention_heads": 2, "num_key_value_heads": 1,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [1, 1, 2]}}
    vision = {"depth": 1, "hidden_size": 16, "num_heads": 2, "spatial_merge_size": MERGE}
    if arch == "qwen2_vl":
        config, model_class = Qwen2VLConfig(text_config=text, vision_config={**vision, "embed_dim": 16}), Qwen2VLModel
    else:
        vision.update(out_hidden_size=16, intermediate_size=16, tokens_per_second=2)
        config, model_class = Qwen2_5_VLConfig(text_config=text, vision_config=vision), Qwen2_5_VLModel
    config.image_token_id, config.video_token_id = IMAGE, VIDEO
    with torch.device("meta"):
        return model_class(config)


def _random_batch(rng: random.Random, with_videos: bool):
    """A padded batch of samples mixing text, images of various sizes and (optionally) short videos."""
    samples, images, videos, seconds = [], [], [], []
    for _ in range(rng.randint(1, 4)):
        tokens: list[int] = []
        for _ in range(rng.randint(0, 3)):
            tokens += [rng.randint(20, 63) for _ in range(rng.randint(0, 5))]
            kind = rng.choice(["image", "image", "video"] if with_videos else ["image"])
            t = 1 if kind == "image" else 2
            h, w = MERGE * rng.randint(1, 5), MERGE * rng.randint(1, 5)
            if kind == "video":
                # Videos whose temporal extent stays within the spatial one, where transformers 5.x agrees with
                # the original Qwen rule we follow (see test_long_video_follows_the_original_qwen_rule).
                h = max(h, 2 * MERGE)
                seconds.append(0.5)
            (images if kind == "image" else videos).append([t, h, w])
            tokens += [START] + [IMAGE if kind == "image" else VIDEO] * (t * h * w // MERGE**2) + [END]
        tokens += [rng.randint(20, 63) for _ in range(rng.randint(1, 6))]
        samples.append(tokens)
    seq = max(map(len, samples)) + rng.randint(0, 3)
    input_ids = torch.zeros(len(samples), seq, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for b, tokens in enumerate(samples):
        left = rng.random() < 0.5
        span = slice(seq - len(tokens), seq) if left else slice(0, len(tokens))
        input_ids[b, span] = torch.tensor(tokens)
        mask[b, span] = 1
    as_grid = lambda rows: torch.tensor(rows, dtype=torch.long) if rows else None  # noqa: E731
    return input_ids, mask, as_grid(images), as_grid(videos), torch.tensor(seconds) if seconds else None


def _layout(arch: str) -> RopeIndexConfig:
    return RopeIndexConfig(IMAGE, VIDEO, MERGE, tokens_per_second=2 if arch == "qwen2_5_vl" else None)


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl"])
def test_matches_transformers_on_random_batches(arch: str) -> None:
    hf = _hf_model(arch)
    rng = random.Random(arch)
    num_with_images = 0
    for case in range(150):
        input_ids, mask, images, videos, seconds = _random_batch(rng, with_videos=case % 3 == 0)
        use_mask = case % 5 != 0 or bool(mask.all())
        if not use_mask:  # without a mask the whole row is real: no padding at all
            mask = torch.ones_like(mask)
        token_type = (input_ids == IMAGE).long() + 2 * (input_ids == VIDEO).long()
        extra = {"second_per_grid_ts": seconds} if arch == "qwen2_5_vl" else {}
        expected, expected_deltas = hf.get_rope_index(
            input_ids, token_type, image_grid_thw=images, video_grid_thw=videos,
            attention_mask=mask if use_mask else None, **extra,
        )
        ours, deltas = get_rope_index(
            input_ids, _layout(arch), image_grid_thw=images, attention_mask=mask if use_mask else None,
            video_grid_thw=videos, second_per_grid_ts=seconds,
        )
        assert torch.equal(ours, expected), f"case {case}: {input_ids.tolist()}"
        assert torch.equal(deltas, expected_deltas.reshape(-1, 1).to(deltas.dtype)), f"case {case}"
        num_with_images += int(images is not None)
    assert num_with_images > 50


def test_text_only_and_padding_independent_positions() -> None:
    layout = _layout("qwen2_vl")
    tokens = torch.tensor([[30, 31, START, IMAGE, IMAGE, IMAGE, IMAGE, IMAGE, IMAGE, END, 32]])
    grid = torch.tensor([[1, 4, 6]])  # merged 2 x 3
    right, _ = get_rope_index(torch.cat([tokens, torch.zeros(1, 3, dtype=torch.long)], 1), layout, grid,
                              attention_mask=torch.tensor([[1] * 11 + [0] * 3]))
    left, deltas = get_rope_index(torch.cat([torch.zeros(1, 3, dtype=torch.long), tokens], 1), layout, grid,
                                  attention_mask=torch.tensor([[0] * 3 + [1] * 11]))
    assert torch.equal(right[:, :, :11], left[:, :, 3:])
    # text 0,1, start 2, image rows (3,3..4) x cols (3,3..5), end at 3 + max(2, 3) = 6, text 7.
    assert right[:, 0, :11].tolist() == [
        [0, 1, 2, 3, 3, 3, 3, 3, 3, 6, 7],
        [0, 1, 2, 3, 3, 3, 4, 4, 4, 6, 7],
        [0, 1, 2, 3, 4, 5, 3, 4, 5, 6, 7],
    ]
    assert deltas.tolist() == [[7 + 1 - 11]]
    text_only, text_deltas = get_rope_index(torch.tensor([[5, 6, 7]]), layout)
    assert text_only.tolist() == [[[0, 1, 2]]] * 3 and text_deltas.tolist() == [[0]]


def test_token_count_mismatch_is_a_clear_error() -> None:
    tokens = torch.tensor([[30, START, IMAGE, IMAGE, IMAGE, END]])
    with pytest.raises(ValueError, match="3 pad tokens but the 1 grids need 4"):
        get_rope_index(tokens, _layout("qwen2_vl"), torch.tensor([[1, 4, 4]]))
    with pytest.raises(ValueError, match="image 0: its 4 pad tokens are not one consecutive run"):
        get_rope_index(torch.tensor([[IMAGE, IMAGE, 30, IMAGE, IMAGE]]), _layout("qwen2_vl"), torch.tensor([[1, 4, 4]]))


def test_long_video_follows_the_original_qwen_rule() -> None:
    """After a video, text continues at the video's largest position + 1 (Qwen's release and vLLM)."""
    tokens = torch.tensor([[30] + [VIDEO] * 4 + [31]])
    grid = torch.tensor([[4, 2, 2]])  # 4 frames of one merged token: temporal positions 1..4 (interval 1)
    positions, _ = get_rope_index(tokens, _layout("qwen2_vl"), video_grid_thw=grid)
    assert positions[0, 0].tolist() == [0, 1, 2, 3, 4, 5]
    assert positions[1, 0].tolist() == [0, 1, 1, 1, 1, 5]
    spaced, _ = get_rope_index(tokens, _layout("qwen2_5_vl"), video_grid_thw=grid, second_per_grid_ts=torch.tensor([1.5]))
    assert spaced[0, 0].tolist() == [0, 1, 4, 7, 10, 11]  # interval 2 tokens/s * 1.5 s = 3

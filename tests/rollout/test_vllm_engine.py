"""The vLLM rollout engine on a real vLLM (the CPU build): multimodal sampling, log-probs against a forward
pass, weight syncs that change the model and restore it bit for bit, the manifest check, the prompt check.

One engine serves the module (start-up costs ~15 s on 2 cores). The tiny checkpoint has a text head_dim of 32:
vLLM's CPU attention has no kernel for 16.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm")

from lmmrl_megatron.rollout import SamplingParams  # noqa: E402
from lmmrl_megatron.rollout.vllm_engine import VLLMEngineOptions, VLLMRolloutEngine, collapse_image_placeholders  # noqa: E402
from lmmrl_megatron.testing.make_tiny import make_tiny_checkpoint  # noqa: E402
from tests.rollout.prompts import make_prompts, teacher_forced_logprobs  # noqa: E402

GREEDY = SamplingParams(n=1, temperature=0, max_new_tokens=6)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_tiny_checkpoint("qwen2_5_vl", tmp_path_factory.mktemp("vllm") / "model", seed=0, text_head_dim=32)


@pytest.fixture(scope="module")
def engine(model_dir) -> VLLMRolloutEngine:
    options = VLLMEngineOptions(
        model_dir=str(model_dir), dtype="float32", enforce_eager=True, max_model_len=512, max_num_seqs=16,
        max_num_batched_tokens=1024,
    )
    return VLLMRolloutEngine(options)


@pytest.fixture(scope="module")
def weights(model_dir) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


def sync(engine: VLLMRolloutEngine, state: dict[str, torch.Tensor], num_buckets: int = 3) -> int:
    names = sorted(state)
    engine.begin_weight_update(names)
    for k in range(num_buckets):
        engine.update_weights([(n, state[n]) for n in names[k::num_buckets]])
    return engine.finish_weight_update()


def test_collapse_image_placeholders() -> None:
    ids = torch.tensor([1, 9, 12, 12, 12, 10, 5, 9, 12, 12, 10, 12])
    assert collapse_image_placeholders(ids, 12) == [1, 9, 12, 10, 5, 9, 12, 10, 12]


def test_generate_with_images_and_logprobs_of_a_forward_pass(engine, model_dir) -> None:
    from transformers import AutoModelForImageTextToText

    prompts = make_prompts(model_dir)
    params = SamplingParams(n=4, temperature=0.9, max_new_tokens=10, seed=7)
    outputs = engine.generate(prompts, params)
    assert [len(group) for group in outputs] == [4, 4, 4]
    reference = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    for prompt, group in zip(prompts, outputs):
        assert len({tuple(out.response_ids.tolist()) for out in group}) > 1, "n samples of one prompt must differ"
        for out in group:
            assert out.response_ids.shape == out.logprobs.shape and 1 <= out.response_ids.numel() <= 10
            assert out.finish_reason == ("stop" if int(out.response_ids[-1]) in engine.eos_token_ids else "length")
            assert not torch.isin(out.response_ids, torch.tensor(engine.banned_token_ids)).any()
            expected = teacher_forced_logprobs(reference, prompt, out.response_ids, 0.9, engine.banned_token_ids)
            torch.testing.assert_close(out.logprobs, expected, atol=2e-3, rtol=1e-3)


def test_a_prompt_twice_gets_different_samples(engine, model_dir) -> None:
    prompt = make_prompts(model_dir)[0]
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=8, seed=3)
    first = engine.generate([prompt, prompt], params)
    second = engine.generate([prompt, prompt], params)
    as_lists = lambda outs: [[o.response_ids.tolist() for o in group] for group in outs]  # noqa: E731
    assert as_lists(first)[0] != as_lists(first)[1]
    if engine.on_gpu:  # per-request seeds (see VLLMRolloutEngine.generate): the same seed repeats the samples
        assert as_lists(first) == as_lists(second)
    else:  # one engine-wide generator: a second call draws new samples
        assert as_lists(first) != as_lists(second)


def test_many_long_prompts_in_one_call(engine, model_dir) -> None:
    """More prompt tokens than one step's budget (1024): prefills are chunked, sampled tokens discarded."""
    prompts = make_prompts(model_dir)[:2] * 24
    outputs = engine.generate(prompts, SamplingParams(n=4, temperature=1.0, max_new_tokens=4, seed=5))
    assert len(outputs) == 48 and all(len(group) == 4 for group in outputs)


def test_weight_sync_changes_the_model_and_restores_it_bit_exactly(engine, model_dir, weights) -> None:
    prompts = make_prompts(model_dir)
    before = engine.generate(prompts, GREEDY)
    changed = {name: t * 3.0 if name == "lm_head.weight" else t for name, t in weights.items()}
    assert sync(engine, changed) == len(weights)
    during = engine.generate(prompts, GREEDY)
    assert any(not torch.equal(a[0].logprobs, b[0].logprobs) for a, b in zip(before, during))
    sync(engine, weights)
    after = engine.generate(prompts, GREEDY)
    for a, b in zip(before, after):
        assert torch.equal(a[0].response_ids, b[0].response_ids)
        assert torch.equal(a[0].logprobs, b[0].logprobs)


def test_vision_weights_reach_the_encoder_cache(engine, model_dir, weights) -> None:
    """A changed vision tower must change image prompts: the encoder cache of the old weights is dropped."""
    prompts = make_prompts(model_dir)
    before = engine.generate(prompts, GREEDY)
    changed = {name: t * 0.0 if name.startswith("visual.merger") else t for name, t in weights.items()}
    sync(engine, changed)
    during = engine.generate(prompts, GREEDY)
    assert not torch.equal(before[0][0].logprobs, during[0][0].logprobs)  # image prompt
    assert torch.equal(before[2][0].logprobs, during[2][0].logprobs)  # text-only prompt
    sync(engine, weights)


def test_the_manifest_check(engine, weights) -> None:
    names = sorted(weights)
    engine.begin_weight_update(names)
    engine.update_weights([(n, weights[n]) for n in names[1:]])
    with pytest.raises(ValueError, match="ended without 1 tensors"):
        engine.finish_weight_update()
    engine.begin_weight_update(names[1:])
    with pytest.raises(ValueError, match="not in the manifest"):
        engine.update_weights([(names[0], weights[names[0]])])
    sync(engine, weights)  # a complete sync after the failures works


def test_a_prompt_the_engine_would_expand_differently_is_refused(engine, model_dir) -> None:
    prompt = make_prompts(model_dir)[0]
    image_token = engine.image_token_id
    ids = prompt.prompt_ids
    position = int((ids == image_token).nonzero()[0])
    prompt.prompt_ids = torch.cat([ids[:position], ids[position : position + 1], ids[position:]])  # one pad too many
    with pytest.raises(ValueError, match="resized differently"):
        engine.generate([prompt], GREEDY)

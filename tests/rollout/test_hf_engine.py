"""The Hugging Face rollout engine: batched multimodal sampling, log-probs, weight updates, sleep/wake."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmmrl_megatron.rollout import SamplingParams
from lmmrl_megatron.rollout.hf_engine import HFRolloutEngine
from lmmrl_megatron.testing.make_tiny import make_tiny_checkpoint
from tests.rollout.prompts import make_prompts, teacher_forced_logprobs


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    return (make_tiny_checkpoint("qwen2_5_vl", root / "a", seed=0), make_tiny_checkpoint("qwen2_5_vl", root / "b", seed=1))


def test_generate_shapes_stop_and_logprobs_match_a_forward_pass(checkpoints) -> None:
    engine = HFRolloutEngine(str(checkpoints[0]))
    prompts = make_prompts(checkpoints[0])
    params = SamplingParams(n=3, temperature=0.9, max_new_tokens=12, seed=0)
    outputs = engine.generate(prompts, params)
    assert len(outputs) == len(prompts) and all(len(group) == 3 for group in outputs)
    for prompt, group in zip(prompts, outputs):
        for out in group:
            assert out.response_ids.shape == out.logprobs.shape
            assert 1 <= out.response_ids.numel() <= 12
            if out.finish_reason == "stop":
                assert int(out.response_ids[-1]) in engine.eos_token_ids
                assert not torch.isin(out.response_ids[:-1], torch.tensor(engine.eos_token_ids)).any()
            else:
                assert out.response_ids.numel() == 12
            assert (out.logprobs <= 0).all()
            assert not torch.isin(out.response_ids, torch.tensor(engine.suppressed_token_ids)).any()
            expected = teacher_forced_logprobs(engine.model, prompt, out.response_ids, 0.9, engine.suppressed_token_ids)
            torch.testing.assert_close(out.logprobs, expected, atol=2e-4, rtol=1e-4)


def test_same_seed_same_samples(checkpoints) -> None:
    engine = HFRolloutEngine(str(checkpoints[0]))
    prompts = make_prompts(checkpoints[0])
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=8, seed=123)
    first = engine.generate(prompts, params)
    second = engine.generate(prompts, params)
    for a, b in zip(first, second):
        for x, y in zip(a, b):
            assert torch.equal(x.response_ids, y.response_ids)
    greedy = engine.generate(prompts[:1], SamplingParams(n=2, temperature=0, max_new_tokens=8))
    assert torch.equal(greedy[0][0].response_ids, greedy[0][1].response_ids)


def test_update_weights_makes_the_engine_the_other_model(checkpoints) -> None:
    from safetensors.torch import load_file

    engine = HFRolloutEngine(str(checkpoints[0]))
    other = HFRolloutEngine(str(checkpoints[1]))
    prompts = make_prompts(checkpoints[0])
    params = SamplingParams(n=1, temperature=0, max_new_tokens=6)
    before = engine.generate(prompts, params)
    state = load_file(str(checkpoints[1] / "model.safetensors"))
    names = sorted(state)
    loaded = sum(engine.update_weights((n, state[n]) for n in bucket) for bucket in (names[::2], names[1::2]))
    assert loaded == len(names)
    after = engine.generate(prompts, params)
    reference = other.generate(prompts, params)
    for a, r in zip(after, reference):
        assert torch.equal(a[0].response_ids, r[0].response_ids)
        torch.testing.assert_close(a[0].logprobs, r[0].logprobs)
    assert any(not torch.equal(a[0].response_ids, b[0].response_ids) for a, b in zip(after, before))


def test_update_weights_rejects_unknown_names_and_shapes(checkpoints) -> None:
    engine = HFRolloutEngine(str(checkpoints[0]))
    with pytest.raises(ValueError, match="not a parameter"):
        engine.update_weights([("model.nope.weight", torch.zeros(1))])
    with pytest.raises(ValueError, match="has shape"):
        engine.update_weights([("lm_head.weight", torch.zeros(3, 3))])


def test_sleeping_engine_refuses_work(checkpoints) -> None:
    engine = HFRolloutEngine(str(checkpoints[0]))
    engine.sleep()
    with pytest.raises(AssertionError, match="wake_up"):
        engine.generate(make_prompts(checkpoints[0]), SamplingParams())
    engine.wake_up()
    assert engine.generate(make_prompts(checkpoints[0])[:1], SamplingParams(max_new_tokens=2))

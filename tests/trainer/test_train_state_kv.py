"""The trainer resumes a Qwen-VL policy whose KV heads are replicated (one KV head, TP=2), at TP=2 and at TP=1.

The actor is built as the trainer builds it (through the model's family: its chunks from the HF checkpoint, its forward),
takes one Adam step at TP=2 and saves its train state (model and distributed-optimizer state): the replicated KV
head is stored once. Resumed at TP=2, the next step equals the uninterrupted run's bit for bit (the optimizer
moments of the KV head came back); resumed at TP=1, the weights equal the saved ones bit for bit.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lmmrl_megatron.parallel.local_ranks import run_distributed
from lmmrl_megatron.testing.make_tiny import make_tiny_checkpoint
from tests.convert.qwen_workers import assert_same_state


def _batch(vision_ids: set[int]):
    from lmmrl_megatron.learner.rollout_batch import PromptInputs, RolloutBatch

    gen = torch.Generator().manual_seed(3)

    def ids(n: int) -> torch.Tensor:
        t = torch.randint(0, 64, (n,), generator=gen)
        return torch.where(torch.isin(t, torch.tensor(sorted(vision_ids))), torch.zeros_like(t), t)

    prompts, responses, advantages = [], [], []
    for p, r in [(5, 4), (3, 6), (7, 2)]:  # drawn in the order the rows were always drawn: prompt, response, advantages
        prompts.append(PromptInputs(ids(p)))
        responses.append(ids(r))
        advantages.append(torch.randn(r, generator=gen))
    return RolloutBatch.from_rows(prompts, [0, 1, 2], responses, advantages=advantages)


def _actor(hf_dir: str, tp: int):
    from lmmrl_megatron.config.sections import ModelConfig, OptimizerConfig, ParallelConfig
    from lmmrl_megatron.learner.megatron_learner import MegatronLearner
    from lmmrl_megatron.models.registry import family_of_hf_dir

    family = family_of_hf_dir(Path(hf_dir))
    torch.manual_seed(0)
    chunks, config = family.build_policy_chunks(ModelConfig(pretrain=hf_dir, dtype="fp32"), ParallelConfig(tp=tp), False)
    engine = MegatronLearner(chunks, family.forward, family.vocab_size(config), OptimizerConfig(lr=1e-2, clip_grad=0.0))
    return engine, config


def _export(engine, config) -> dict[str, np.ndarray]:
    from lmmrl_megatron.convert.export import export_hf_weights
    from lmmrl_megatron.models.registry import model_family

    chunks = [chunk.module for chunk in engine.model]
    shards_to_hf = model_family("qwen_vl").shards_to_hf(config, "local")
    return {name: t.numpy().copy() for bucket in export_hf_weights(chunks, shards_to_hf, 1 << 20) for name, t in bucket}


def _step(engine, config) -> None:
    from lmmrl_megatron.learner.micro_batch import collate

    tokens = config.tokens
    batch = _batch({tokens.image_token_id, tokens.video_token_id, tokens.vision_start_token_id,
                        tokens.vision_end_token_id})

    def loss_fn(logprobs, entropy, mb):
        return -(logprobs * mb.advantages * mb.loss_mask).sum() / mb.loss_mask.sum(), {}

    engine.train_step([collate(batch, list(range(batch.num_rows)))], loss_fn)


def train_save_resume(hf_dir: str, directory: str) -> dict[str, object]:
    """At TP=2: step, save, step (uninterrupted); a fresh actor loads the save and steps."""
    from lmmrl_megatron.trainer.train_state import load_train_state, save_train_state

    trained, config = _actor(hf_dir, 2)
    _step(trained, config)
    saved = _export(trained, config)
    save_train_state(Path(directory), {"actor": trained})
    _step(trained, config)
    resumed, _ = _actor(hf_dir, 2)
    load_train_state(Path(directory), {"actor": resumed})
    loaded = _export(resumed, config)
    _step(resumed, config)
    return {"saved": saved, "loaded": loaded, "uninterrupted": _export(trained, config), "resumed": _export(resumed, config)}


def resume_only(hf_dir: str, directory: str) -> dict[str, object]:
    from lmmrl_megatron.trainer.train_state import load_train_state

    resumed, config = _actor(hf_dir, 1)
    load_train_state(Path(directory), {"actor": resumed})
    loaded = _export(resumed, config)
    _step(resumed, config)  # the restored optimizer state fits this layout
    return {"loaded": loaded}


@pytest.mark.slow
def test_replicated_kv_train_state_resumes_at_tp2_and_tp1(tmp_path: Path) -> None:
    hf = make_tiny_checkpoint("qwen2_5_vl", tmp_path / "hf", overrides=["text_config.num_key_value_heads=1"])
    ckpt = tmp_path / "train_state"
    results = run_distributed(train_save_resume, 2, 2, 1, args=(str(hf), str(ckpt)))
    first = results[0]
    saved = {k: torch.from_numpy(v) for k, v in first["saved"].items()}
    for rank, result in enumerate(results):
        assert_same_state(result["loaded"], saved, f"resumed at tp=2, rank {rank}")
        uninterrupted = {k: torch.from_numpy(v) for k, v in result["uninterrupted"].items()}
        assert_same_state(result["resumed"], uninterrupted, f"step after the resume at tp=2, rank {rank}")
    assert not all(np.array_equal(first["uninterrupted"][k], v) for k, v in first["saved"].items())  # it trained
    (tp1,) = run_distributed(resume_only, 1, 1, 1, args=(str(hf), str(ckpt)))
    assert_same_state(tp1["loaded"], saved, "resumed at tp=1")

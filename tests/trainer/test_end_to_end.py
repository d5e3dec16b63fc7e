"""End-to-end RL through Ray on CPU: every estimator, TP and PP actors, both placements, weight sync.

Each run is the real thing at toy size: a local Ray cluster, Megatron-Core policy ranks on gloo, the Hugging Face
rollout engine, the reward pool, checkpoints. One Ray cluster serves the whole module; resuming and recovery are
tested in test_recovery.py.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from lmmrl_megatron.config import RunConfig, load_config
from tests.trainer.e2e import REPO, make_config, run

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_cluster")]
REQUIRED_KEYS = (
    "reward/mean", "reward/std", "response_length/mean", "kl", "entropy", "policy/clip_frac", "grad_norm",
    "time/generate", "time/reward", "time/logprob", "time/train", "time/sync",
)


def check_run(records: list[dict], num_steps: int) -> None:
    assert [r["step"] for r in records] == list(range(1, num_steps + 1))
    for record in records:
        for key in REQUIRED_KEYS:
            assert key in record, f"metrics.jsonl lacks {key}"
            assert isinstance(record[key], float) and math.isfinite(record[key]), (key, record[key])
        assert record["sync/num_tensors"] > 0 and record["sync/bytes"] > 0
        # The engine samples with the weights the trainer holds: after every sync both score tokens alike.
        assert record["rollout/logprob_abs_diff_max"] < 1e-3


@pytest.mark.parametrize("estimator", ["rloo", "grpo", "dr_grpo", "reinforce", "reinforce_baseline", "gae"])
def test_each_estimator_runs_end_to_end(assets, tmp_path: Path, estimator: str) -> None:
    extra = ["algorithm.kl_coef=0.01"] if estimator == "reinforce" else []  # one run with the reference and KL
    records = run(make_config(assets, tmp_path / estimator, f"algorithm.advantage_estimator={estimator}", *extra))
    check_run(records, 2)
    assert (tmp_path / estimator / "checkpoints" / "latest").is_file()
    if extra:
        assert records[-1]["kl_coef"] == pytest.approx(0.01)
    if estimator == "gae":  # PPO: the critic trains beside the actor
        assert all(math.isfinite(r["critic/grad_norm"]) and "critic/value_loss" in r for r in records)


def test_pipeline_parallel_actor_and_separate_placement(assets, tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    config = make_config(
        assets, tmp_path / "pp2", "parallel.tp=1", "parallel.pp=2", "trainer.colocate_all_models=false",
        # The entropy bonus moves the weights even when every reward of this toy task is equal (zero advantages).
        "checkpoint.save_hf=true", "trainer.actor.lr=1e-2", "algorithm.entropy_coef=0.01",
    )
    records = run(config)
    check_run(records, 2)
    assert all(r["grad_norm"] > 0 for r in records)
    # save_hf: the trained actor as a Hugging Face checkpoint that transformers loads, with trained weights.
    hf_dir = tmp_path / "pp2" / "checkpoints" / "step_00000002" / "hf"
    model = AutoModelForImageTextToText.from_pretrained(hf_dir)
    saved = load_file(str(hf_dir / "model.safetensors"))
    initial = load_file(str(assets["model"] / "model.safetensors"))
    assert saved.keys() == initial.keys()
    assert any(not torch.equal(saved[k], initial[k]) for k in saved)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_the_embedded_default_learns(assets, tmp_path: Path) -> None:
    """The tiny default's settings (16 prompts x 8 answers, lr 5e-3), fewer steps: the mean reward must rise."""
    config = load_config(
        RunConfig,
        REPO / "configs" / "rloo_tiny.yaml",
        [
            f"model.pretrain={assets['model']}",
            f"data.prompt_data=[{assets['color']}]",
            f"checkpoint.save_path={tmp_path / 'learn'}",
            "trainer.max_steps=24",
            "checkpoint.save_steps=0",
            "logging.progress_bar=false",
            "logging.use_tensorboard=false",
        ],
    )
    rewards = [r["reward/mean"] for r in run(config)]
    first, last = sum(rewards[:6]) / 6, sum(rewards[-6:]) / 6
    assert last > first + 0.1, rewards

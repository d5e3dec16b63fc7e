"""End-to-end RL through Ray on CPU: every estimator, TP and PP actors, both placements, weight sync.

Each run is the real thing at toy size: a local Ray cluster, Megatron-Core policy ranks on gloo, the Hugging Face
rollout engine, the reward pool, checkpoints. One Ray cluster serves the whole module; resuming and recovery are
tested in test_recovery.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from lmmrl_megatron.config import RunConfig, load_config
from lmmrl_megatron.trainer.checkpoint import CheckpointManager
from tests.trainer.e2e import REPO, make_config, run

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_cluster")]
REQUIRED_KEYS = (
    "reward/mean", "reward/std", "response_length/mean", "kl", "entropy", "policy/clip_frac", "grad_norm",
    "time/generate", "time/reward", "time/logprob", "time/train", "time/sync",
    "reward/num_failures", "reward/num_timeouts", "reward/num_rejected",
)


def check_run(records: list[dict], num_steps: int) -> None:
    assert [r["step"] for r in records] == list(range(1, num_steps + 1))
    for record in records:
        for key in REQUIRED_KEYS:
            assert key in record, f"metrics.jsonl lacks {key}"
            assert isinstance(record[key], float) and math.isfinite(record[key]), (key, record[key])
        assert record["sync/num_tensors"] > 0 and record["sync/bytes"] > 0
        if "time/offload" in record:  # colocated: the swap moved the optimizer state to the host
            assert record["swap/offload_gb"] > 0 and record["swap/offload_gbps"] > 0
    for before, record in zip(records, records[1:]):  # and back (the first onload precedes Adam's moments)
        if "time/onload" in record:
            assert record["swap/onload_gb"] == before["swap/offload_gb"] and record["swap/onload_gbps"] > 0
        # The engine samples with the weights the trainer holds: after every sync both score tokens alike.
        assert record["rollout/logprob_abs_diff_max"] < 1e-3


@pytest.mark.parametrize("estimator", ["rloo", "grpo", "dr_grpo", "reinforce", "reinforce_baseline", "gae"])
def test_each_estimator_runs_end_to_end(assets, tmp_path: Path, estimator: str) -> None:
    extra = ["algorithm.kl_coef=0.01"] if estimator == "reinforce" else []  # one run with the reference and KL
    if estimator == "dr_grpo":  # Dr. GRPO as its paper has it: the constant normaliser
        extra = ["algorithm.loss_agg_mode=seq_mean_token_sum_norm"]
    records = run(make_config(assets, tmp_path / estimator, f"algorithm.advantage_estimator={estimator}", *extra))
    check_run(records, 2)
    assert (tmp_path / estimator / "checkpoints" / "latest").is_file()
    if estimator == "reinforce":
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


def test_resume_reproduces_the_uninterrupted_run(assets, tmp_path: Path) -> None:
    # One warmup step, then a cosine to 1e-4 at the run's last step. The schedule is a function of the step, which
    # the checkpoint holds: the resumed steps 3 and 4 get the whole run's rates.
    schedule = ("trainer.actor.lr_scheduler=cosine", "trainer.actor.lr_warmup_steps=1", "trainer.actor.min_lr=1e-4")
    whole = run(make_config(assets, tmp_path / "whole", "trainer.max_steps=4", *schedule))
    first_half = run(make_config(assets, tmp_path / "split", "trainer.max_steps=2", *schedule))
    assert [r["lr/actor"] for r in first_half] == pytest.approx([5e-3, 5e-3])  # the whole run's first two rates
    resumed = run(make_config(assets, tmp_path / "split", "trainer.max_steps=4", "checkpoint.resume=auto", *schedule))
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]  # the resumed run appends to the same metrics.jsonl
    # warmup step, then 1e-4 + (5e-3 - 1e-4) * (1 + cos(pi * k / 3)) / 2 for k = 0, 1, 2
    assert [r["lr/actor"] for r in whole] == pytest.approx([5e-3, 5e-3, 3.775e-3, 1.325e-3])
    assert [r["lr/actor"] for r in resumed[2:]] == pytest.approx([3.775e-3, 1.325e-3])
    for key in ("reward/mean", "response_length/mean", "policy/pg_loss", "grad_norm", "entropy"):
        for step in range(4):
            assert resumed[step][key] == pytest.approx(whole[step][key], rel=1e-4, abs=1e-6), (key, step + 1)
    assert first_half[1]["reward/mean"] == whole[1]["reward/mean"]
    # A fresh run (resume=none) in the whole run's folder: its step-1 checkpoint is the one kept and found, and the
    # whole run's step 4 is moved aside, not pruned and not resumed from.
    fresh = run(make_config(assets, tmp_path / "whole", "trainer.max_steps=1", "checkpoint.resume=none"))
    assert [r["step"] for r in fresh] == [1]
    checkpoints = CheckpointManager(tmp_path / "whole" / "checkpoints")
    assert [p.name for p in checkpoints.committed()] == ["step_00000001"]
    (superseded,) = checkpoints.root.glob("superseded-*/step_00000004")
    assert (superseded / "COMPLETE").is_file()


def test_evaluation_before_and_after_training_plots_and_lmmrl_eval(assets, tmp_path: Path) -> None:
    """eval set: accuracy at step 0 and after the last step, the plots and the table written; lmmrl-eval on the run
    (its final checkpoint converted back to Hugging Face) reproduces the run's own last evaluation."""
    from safetensors.torch import load_file

    from lmmrl_megatron.cli.eval_models import evaluate_models

    run_dir = tmp_path / "run"
    config = make_config(
        assets, run_dir, f"eval.sets=[{{name: shapes, data: {assets['test']}, max_samples: 4}}]",
        # The entropy bonus moves the weights even when every reward of this toy task is equal (zero advantages).
        "trainer.actor.lr=1e-2", "algorithm.entropy_coef=0.01",
    )
    records = run(config)
    before, after = records[0], records[-1]
    assert before["step"] == 0 and "reward/mean" not in before
    check_run(records[1:], 2)
    assert "eval/shapes/accuracy" not in records[1]  # eval_steps 0: only before training and after the last step
    for record in (before, after):
        for metric in ("accuracy", "format", "response_length", "num_prompts"):
            assert math.isfinite(record[f"eval/shapes/{metric}"]), metric
        assert record["eval/shapes/num_prompts"] == 4
    assert (run_dir / "metrics.png").is_file() and (run_dir / "plots" / "eval_accuracy.png").is_file()
    assert "| shapes | accuracy" in (run_dir / "eval_summary.md").read_text()
    in_run = [json.loads(line) for line in (run_dir / "eval" / "step_00000002.jsonl").read_text().splitlines()]
    assert len(in_run) == 4

    [(label, metrics)] = evaluate_models(config, [("after", str(run_dir))], tmp_path / "eval_out")
    assert label == "after"
    for metric in ("accuracy", "format", "response_length"):
        assert metrics[f"eval/shapes/{metric}"] == after[f"eval/shapes/{metric}"]
    standalone = [json.loads(line) for line in (tmp_path / "eval_out" / "samples.jsonl").read_text().splitlines()]
    assert [s["response"] for s in standalone] == [s["response"] for s in in_run]
    converted = load_file(str(tmp_path / "eval_out" / "models" / "run_step_00000002" / "model.safetensors"))
    initial = load_file(str(assets["model"] / "model.safetensors"))
    assert any(not torch.equal(converted[k], initial[k]) for k in initial)  # it evaluated the trained weights
    assert "| shapes | accuracy" in (tmp_path / "eval_out" / "summary.md").read_text()


def test_the_embedded_default_learns(assets, tmp_path: Path) -> None:
    """The tiny default's settings (16 prompts x 8 answers, lr 5e-3), fewer steps: the mean reward must rise."""
    config = load_config(
        RunConfig,
        REPO / "configs" / "rloo_tiny.yaml",
        [
            f"model.pretrain={assets['default_model']}",
            f"data.prompt_data=[{assets['color']}]",
            f"checkpoint.save_path={tmp_path / 'learn'}",
            "trainer.max_steps=24",
            "checkpoint.save_steps=0",
            "logging.progress_bar=false",
            "logging.use_tensorboard=false",
            "eval.sets=[]",
        ],
    )
    rewards = [r["reward/mean"] for r in run(config)]
    first, last = sum(rewards[:6]) / 6, sum(rewards[-6:]) / 6
    assert last > first + 0.1, rewards


def test_remote_rewards_from_a_comma_separated_list_of_servers(assets, tmp_path: Path) -> None:
    """`reward.remote_rm_url` as OpenRLHF takes it: two servers, each batch split between them."""
    from lmmrl_megatron.reward.config import RewardConfig
    from lmmrl_megatron.reward.scorer import RewardScorer
    from lmmrl_megatron.reward.server import RewardService, serving

    functions = [{"name": str(REPO / "configs" / "rewards" / "short_answer.py") + ":commits_to_label", "weight": 1.0}]
    with RewardScorer(RewardConfig(functions=functions, num_workers=1)) as scorer, \
            serving(RewardService(scorer, "chatml", None)) as first, \
            serving(RewardService(scorer, "chatml", None)) as second:
        records = run(make_config(assets, tmp_path / "remote", f"reward.remote_rm_url={first.url},{second.url}"))
        requests = (first.service.num_requests, second.service.num_requests)
    check_run(records, 2)
    assert requests == (2, 2)  # one part of each step's batch went to each server
    assert all(r["reward/num_failures"] == 0.0 for r in records)

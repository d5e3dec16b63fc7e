"""Metrics reach metrics.jsonl, tensorboard and offline wandb; resuming drops lines past the resumed step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmmrl_megatron.config.sections import LoggingConfig
from lmmrl_megatron.trainer.metrics import MetricsLogger


def read_steps(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_jsonl_and_tensorboard(tmp_path: Path) -> None:
    logger = MetricsLogger(tmp_path, LoggingConfig(progress_bar=False), total_steps=3)
    for step in (1, 2, 3):
        logger.log(step, {"reward/mean": step / 10, "kl": float("nan")})
    logger.close()
    records = read_steps(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[1]["reward/mean"] == 0.2 and records[0]["kl"] == "nan"

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("reward/mean")] == [1, 2, 3]
    assert [e.value for e in events.Scalars("reward/mean")] == pytest.approx([0.1, 0.2, 0.3])


def test_resume_truncates_lines_after_the_checkpoint(tmp_path: Path) -> None:
    logger = MetricsLogger(tmp_path, LoggingConfig(progress_bar=False, use_tensorboard=False), total_steps=5)
    for step in range(1, 6):
        logger.log(step, {"reward/mean": step})
    logger.close()
    resumed = MetricsLogger(tmp_path, LoggingConfig(progress_bar=False, use_tensorboard=False), total_steps=5, start_step=3)
    resumed.log(4, {"reward/mean": 40})
    resumed.close()
    assert [(r["step"], r["reward/mean"]) for r in read_steps(tmp_path / "metrics.jsonl")] == [(1, 1), (2, 2), (3, 3), (4, 40)]


def test_wandb_offline_writes_a_local_run(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = LoggingConfig(progress_bar=False, use_tensorboard=False, use_wandb=True, wandb_mode="offline")
    logger = MetricsLogger(tmp_path, config, total_steps=1, run_config={"algorithm": "rloo"})
    logger.log(1, {"reward/mean": 0.5})
    logger.close()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].rglob("*.wandb"))


def test_a_run_from_step_zero_starts_afresh_and_a_step_zero_record_is_no_step(tmp_path: Path, capsys) -> None:
    config = LoggingConfig(progress_bar=False, use_tensorboard=False)
    first = MetricsLogger(tmp_path, config, total_steps=2)
    first.log(0, {"eval/a/accuracy": 0.1})  # evaluation before training, then a crash before any checkpoint
    first.close()
    again = MetricsLogger(tmp_path, LoggingConfig(use_tensorboard=False), total_steps=2)
    again.log(0, {"eval/a/accuracy": 0.1})
    assert again._bar.n == 0  # the progress bar counts RL steps only
    again.log(1, {"reward/mean": 1.0})
    assert again._bar.n == 1
    again.close()
    assert [r["step"] for r in read_steps(tmp_path / "metrics.jsonl")] == [0, 1]

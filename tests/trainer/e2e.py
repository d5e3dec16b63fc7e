"""What the end-to-end trainer tests share: the tiny run's config and a runner (fixtures in conftest.py)."""

from __future__ import annotations

import json
from pathlib import Path

from lmmrl_megatron.config import RunConfig, load_config

REPO = Path(__file__).resolve().parents[2]


def base_overrides(assets: dict[str, Path], run_dir: Path) -> list[str]:
    return [
        f"model.pretrain={assets['model']}",
        f"data.prompt_data=[{assets['data']}]",
        f"checkpoint.save_path={run_dir}",
        "rollout.rollout_batch_size=4",
        "rollout.n_samples_per_prompt=2",
        "rollout.max_new_tokens=6",
        "trainer.max_steps=2",
        "trainer.train_batch_size=8",
        "checkpoint.save_steps=0",
        "logging.progress_bar=false",
        "logging.use_tensorboard=false",
        "eval.sets=[]",  # the embedded default's test split; the eval test sets its own
    ]


def make_config(assets: dict[str, Path], run_dir: Path, *overrides: str) -> RunConfig:
    return load_config(RunConfig, REPO / "configs" / "rloo_tiny.yaml", base_overrides(assets, run_dir) + list(overrides))


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def run(config: RunConfig) -> list[dict]:
    from lmmrl_megatron.trainer.controller import RLTrainer

    trainer = RLTrainer(config)
    try:
        trainer.fit()
    finally:
        trainer.close()
    return read_metrics(Path(config.checkpoint.save_path))


def without_timings(records: list[dict]) -> list[dict]:
    """Every logged figure but the wall-clock ones (`time/*`, seconds `*_s`, rates `*_gbps`), which no two runs share."""
    return [{k: v for k, v in r.items() if not is_timing(k)} for r in records]


def is_timing(key: str) -> bool:
    return key.startswith("time/") or key.endswith(("_s", "_gbps"))

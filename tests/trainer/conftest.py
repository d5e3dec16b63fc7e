"""Fixtures of the end-to-end trainer tests: the tiny model and data (made once for the package) and a Ray
cluster per test module that asks for it."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmmrl_megatron.testing.make_tiny import make_tiny_checkpoint


@pytest.fixture(scope="package")
def assets(tmp_path_factory) -> dict[str, Path]:
    from lmmrl_megatron.data.synthetic import main as synthetic_main

    root = tmp_path_factory.mktemp("e2e")
    model = make_tiny_checkpoint("qwen2_5_vl", root / "model", seed=0)
    default_model = make_tiny_checkpoint("qwen2_5_vl", root / "default_model", seed=0, text_head_dim=32)  # run_tiny.sh's
    synthetic_main(["--task", "count_shapes", "--n", "64", "--out", str(root / "data"), "--seed", "0"])
    synthetic_main(["--task", "color_of_shape", "--n", "256", "--out", str(root / "color"), "--seed", "0"])
    return {
        "root": root,
        "model": model,
        "default_model": default_model,
        "data": root / "data" / "train.jsonl",
        "test": root / "data" / "test.jsonl",
        "color": root / "color" / "train.jsonl",
    }


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(num_cpus=16, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()

"""RL through Ray with `rollout.backend: vllm`: a real vLLM engine (CPU build) fed by the Megatron actor's export.

After every sync the engine must score its samples as the trainer does (`rollout/logprob_abs_diff_max`): the
actor at TP=2 exports gathered shards, at PP=2 it brings the second stage's buckets to the first.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("vllm")

from tests.trainer.e2e import make_config, run  # noqa: E402
from tests.trainer.test_end_to_end import check_run  # noqa: E402

pytestmark = pytest.mark.slow

VLLM_ON_CPU = ["rollout.backend=vllm", "rollout.enforce_eager=true", "rollout.max_model_len=512"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    from lmmrl_megatron.data.synthetic import main as synthetic_main
    from lmmrl_megatron.testing.make_tiny import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("vllm_e2e")
    model = make_tiny_checkpoint("qwen2_5_vl", root / "model", seed=0, text_head_dim=32)
    synthetic_main(["--task", "count_shapes", "--n", "64", "--out", str(root / "data"), "--seed", "0"])
    return {"root": root, "model": model, "data": root / "data" / "train.jsonl", "test": root / "data" / "test.jsonl"}


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    import ray

    ray.init(num_cpus=16, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


# TP=2 colocated (weights through the object store); PP=2 with the engine on a bundle of its own, weights
# broadcast over a gloo group of the sending rank and the engine's worker.
CASES = {
    "tp2_colocated": ["parallel.tp=2", "parallel.pp=1", "EVAL"],  # also evaluates through the engine
    "pp2_separate_broadcast": [
        "parallel.tp=1", "parallel.pp=2", "trainer.colocate_all_models=false", "rollout.weight_transport=broadcast"
    ],
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_rloo_with_vllm_engines_after_tp_and_pp_syncs(assets, tmp_path: Path, case: str) -> None:
    overrides = [
        f"eval.sets=[{{name: shapes, data: {assets['test']}, max_samples: 4}}]" if o == "EVAL" else o for o in CASES[case]
    ]
    config = make_config(
        assets, tmp_path / case, *overrides, *VLLM_ON_CPU,
        # The entropy bonus moves the weights even when every reward of this toy task is equal (zero advantages),
        # so a sync that did not arrive would show in the second step's log-prob agreement.
        "trainer.actor.lr=1e-2", "algorithm.entropy_coef=0.01", "trainer.max_steps=3",
    )
    records = run(config)
    evaluated = [r["step"] for r in records if "eval/shapes/accuracy" in r]
    assert evaluated == ([0, 3] if "EVAL" in CASES[case] else [])
    records = [r for r in records if r["step"] > 0]
    check_run(records, 3)
    assert all(r["grad_norm"] > 0 for r in records)
    assert records[0]["sync/num_tensors"] == records[-1]["sync/num_tensors"]

"""Restoring the optimizer gives every parameter its own Adam step count, at the saved value.

megatron-core 0.19.2 restores one `step` tensor shared by every parameter; torch's Adam increments it in place
once per parameter, so after a resume the count (and Adam's bias correction) ran ahead by the number of
parameters at each step. Fast: the tiny GPT on one gloo rank, one step before and one after a save/load.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lmmrl_megatron.learner.micro_batch import collate
from lmmrl_megatron.parallel.local_ranks import run_distributed
from tests.learner.test_megatron_learner import gpt_forward, make_batch


def save_load_and_step(directory: str) -> dict[str, object]:
    from lmmrl_megatron.config.sections import OptimizerConfig
    from lmmrl_megatron.learner.megatron_learner import MegatronLearner
    from lmmrl_megatron.testing.tiny_gpt import VOCAB, build_tiny_gpt
    from lmmrl_megatron.trainer.policy_worker import optimizer_step_count
    from lmmrl_megatron.trainer.train_state import load_train_state, save_train_state

    batch = make_batch()
    micro_batches = [collate(batch, list(range(batch.num_rows)))]

    def loss_fn(logprobs, entropy, mb):
        return -(logprobs * mb.advantages * mb.loss_mask).sum() / mb.loss_mask.sum(), {}

    def engine() -> MegatronLearner:
        torch.manual_seed(0)
        return MegatronLearner([build_tiny_gpt()], gpt_forward, VOCAB, OptimizerConfig(lr=1e-2, clip_grad=0.0))

    def steps(e: MegatronLearner) -> list[torch.Tensor]:
        return [s["step"] for c in getattr(e.optimizer, "chained_optimizers", [e.optimizer]) for s in c.optimizer.state.values()]

    trained = engine()
    trained.train_step(micro_batches, loss_fn)
    save_train_state(Path(directory), {"actor": trained})
    trained.train_step(micro_batches, loss_fn)  # the uninterrupted run's second step

    resumed = engine()
    load_train_state(Path(directory), {"actor": resumed})
    loaded = steps(resumed)
    distinct = len({id(t) for t in loaded})
    loaded_values = sorted({float(t) for t in loaded})
    resumed.train_step(micro_batches, loss_fn)
    same_weights = all(
        torch.equal(a, b) for a, b in zip(trained.model[0].module.parameters(), resumed.model[0].module.parameters())
    )
    return {
        "num_params": len(loaded), "distinct": distinct, "loaded": loaded_values,
        "after": sorted({float(t) for t in steps(resumed)}), "count": optimizer_step_count(resumed.optimizer),
        "same_weights": same_weights,
    }


def test_each_parameter_resumes_with_its_own_step_count(tmp_path: Path) -> None:
    (result,) = run_distributed(save_load_and_step, world_size=1, args=(str(tmp_path / "ckpt"),))
    assert result["num_params"] > 1
    assert result["distinct"] == result["num_params"]  # no shared tensor
    assert result["loaded"] == [1.0]
    assert result["after"] == [2.0] and result["count"] == 2.0  # one increment per step, not per parameter
    assert result["same_weights"]  # and the step after the resume is the uninterrupted run's

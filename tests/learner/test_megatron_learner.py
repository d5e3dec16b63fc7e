"""The Megatron learner gives the same log-probs and the same optimizer step at every parallel layout.

Rows of different lengths are split into micro-batches by a token budget and, under data parallelism, spread
unevenly over ranks; the loss is a token-mean over the global batch. Log-probs, entropy, grad norm and the
log-probs after one Adam step must equal the single-process run's.
"""

from __future__ import annotations

import pytest
import torch

from lmmrl_megatron.config.sections import OptimizerConfig
from lmmrl_megatron.learner.micro_batch import collate, response_values, split_by_token_budget
from lmmrl_megatron.learner.rollout_batch import PromptInputs, RolloutBatch
from lmmrl_megatron.parallel.local_ranks import run_distributed
from lmmrl_megatron.testing.tiny_gpt import VOCAB

LENGTHS = [(5, 7), (3, 2), (8, 6), (4, 9), (6, 1), (2, 5)]  # (prompt, response) tokens
TOKEN_BUDGET = 30


def make_batch(**per_token) -> RolloutBatch:
    """One prompt per row; `per_token` adds columns (a list of one tensor per row each)."""
    gen = torch.Generator().manual_seed(11)
    prompts, responses, advantages = [], [], []
    for num_prompt, num_response in LENGTHS:
        prompts.append(PromptInputs(torch.randint(0, VOCAB, (num_prompt,), generator=gen)))
        responses.append(torch.randint(0, VOCAB, (num_response,), generator=gen))
        advantages.append(torch.randn(num_response, generator=gen))
    return RolloutBatch.from_rows(prompts, list(range(len(prompts))), responses, advantages=advantages, **per_token)


def unpadded_values(stats, batch: RolloutBatch) -> dict[int, torch.Tensor]:
    """Each row's response values, by row of the batch."""
    out = {}
    lengths = batch.response_lengths.tolist()
    for st in stats:
        values = response_values(st.micro_batch, st.values, batch)
        out.update({i: values[row, : lengths[i]] for row, i in enumerate(st.micro_batch.sample_index.tolist())})
    return out


def gpt_forward(model, micro_batch):
    seq_len = micro_batch.input_ids.shape[1]
    position_ids = torch.arange(seq_len).unsqueeze(0).expand_as(micro_batch.input_ids)
    return model(micro_batch.input_ids, position_ids, attention_mask=None)


def learner_worker(offload_before_training: bool = False) -> dict[str, object]:
    from megatron.core import parallel_state as ps

    from lmmrl_megatron.learner.megatron_learner import MegatronLearner
    from lmmrl_megatron.testing.tiny_gpt import build_tiny_gpt

    batch = make_batch()
    mine = batch.shard(ps.get_data_parallel_rank(), ps.get_data_parallel_world_size())
    global_tokens = int(batch.response_mask.sum())
    num_tokens = batch.num_tokens()
    groups = split_by_token_budget([num_tokens[i] for i in mine], TOKEN_BUDGET)
    micro_batches = [collate(batch, [mine[j] for j in group]) for group in groups]

    learner = MegatronLearner([build_tiny_gpt()], gpt_forward, VOCAB, OptimizerConfig(lr=1e-2, clip_grad=0.0), temperature=0.8)

    def token_mean_pg_loss(logprobs, entropy, mb):
        loss = -(logprobs * mb.advantages * mb.loss_mask).sum() / global_tokens
        return loss, {"loss": loss.item(), "num_tokens": float(mb.loss_mask.sum())}

    before = unpadded_values(learner.forward_only(micro_batches), batch)
    if offload_before_training:  # what a colocated rollout phase does between the forward and the update
        buffers = [buffer for chunk in learner.model for buffer in chunk.buffers]
        learner.offload()
        assert all(b.grad_data.untyped_storage().size() == 0 for b in buffers), "gradient buffers not freed"
        try:
            learner.train_step(micro_batches, token_mean_pg_loss)
        except AssertionError as exc:
            assert "onload" in str(exc)
        else:
            raise AssertionError("train_step ran on an offloaded learner")
        learner.onload()
        assert all(b.grad_data.untyped_storage().size() > 0 for b in buffers)
    metrics = learner.train_step(micro_batches, token_mean_pg_loss)
    after = unpadded_values(learner.forward_only(micro_batches), batch)
    return {"last_stage": ps.is_pipeline_last_stage(), "before": before, "after": after, "metrics": metrics}


def merge(results: list[dict]) -> dict[str, object]:
    last = [r for r in results if r["last_stage"]]
    before, after, loss = {}, {}, 0.0
    seen_dp = set()
    for r in last:
        before.update(r["before"])
        after.update(r["after"])
    for r in last:  # TP ranks of one DP group report the same loss; count each DP group once
        key = tuple(sorted(r["before"]))
        if key not in seen_dp:
            seen_dp.add(key)
            loss += r["metrics"]["loss"]
    return {"before": before, "after": after, "loss": loss, "grad_norm": last[0]["metrics"]["grad_norm"]}


@pytest.fixture(scope="module")
def reference() -> dict[str, object]:
    return merge(run_distributed(learner_worker, world_size=1))


def test_micro_batches_respect_the_token_budget() -> None:
    batch = make_batch()
    groups = split_by_token_budget(batch.num_tokens(), TOKEN_BUDGET)
    assert sorted(i for g in groups for i in g) == list(range(batch.num_rows))
    for group in groups:
        mb = collate(batch, group)
        assert mb.input_ids.numel() <= TOKEN_BUDGET or len(group) == 1
        for row, index in enumerate(group):
            response = batch.response(index)
            assert int(mb.loss_mask[row].sum()) == response.numel()
            # the masked labels are exactly the response tokens
            assert torch.equal(mb.labels[row][mb.loss_mask[row].bool()], response)
            assert torch.equal(mb.advantages[row][mb.loss_mask[row].bool()], batch.advantages[index, : response.numel()])


def test_a_micro_batch_moves_every_tensor_to_the_model_device() -> None:
    """Workers build micro-batches on the host and move them to the model's device: no field may stay behind."""
    from dataclasses import fields, replace

    batch = make_batch(old_logprobs=[torch.randn(r) for _, r in LENGTHS])
    batch = replace(batch, prompts=[PromptInputs(p.ids, torch.randn(4, 6), torch.tensor([[1, 2, 2]])) for p in batch.prompts])
    host = collate(batch, [0, 2])
    moved = host.to("meta")
    tensors = {f.name: getattr(moved, f.name) for f in fields(moved) if isinstance(getattr(host, f.name), torch.Tensor)}
    assert {"input_ids", "labels", "loss_mask", "advantages", "old_logprobs", "pixel_values"} <= tensors.keys()
    assert all(t.device.type == "meta" for t in tensors.values()), {k: t.device for k, t in tensors.items()}
    assert all(tensors[name].shape == getattr(host, name).shape for name in tensors)
    assert host.input_ids.device.type == "cpu"  # the original is left as it was


def test_reference_step_changes_the_policy(reference) -> None:
    assert len(reference["before"]) == len(LENGTHS)
    moved = max((reference["after"][i] - reference["before"][i]).abs().max().item() for i in reference["before"])
    assert moved > 1e-3
    assert reference["grad_norm"] > 0


@pytest.mark.parametrize("world_size,tp,pp", [(2, 1, 1), (2, 2, 1), (2, 1, 2)], ids=["dp2", "tp2", "pp2"])
def test_layouts_match_reference(world_size: int, tp: int, pp: int, reference) -> None:
    result = merge(run_distributed(learner_worker, world_size=world_size, tp=tp, pp=pp))
    assert result["before"].keys() == reference["before"].keys()
    for index in reference["before"]:
        torch.testing.assert_close(result["before"][index], reference["before"][index], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(result["after"][index], reference["after"][index], rtol=1e-4, atol=1e-4)
    assert result["loss"] == pytest.approx(reference["loss"], rel=1e-5)
    assert result["grad_norm"] == pytest.approx(reference["grad_norm"], rel=1e-4)


def test_offload_then_onload_leaves_the_update_unchanged(reference) -> None:
    """Freeing the gradient buffers while a colocated learner generates must not change the next optimizer step."""
    result = merge(run_distributed(learner_worker, world_size=2, tp=2, args=(True,)))
    for index in reference["before"]:
        torch.testing.assert_close(result["after"][index], reference["after"][index], rtol=1e-4, atol=1e-4)
    assert result["grad_norm"] == pytest.approx(reference["grad_norm"], rel=1e-4)


def lr_worker() -> dict[str, object]:
    from lmmrl_megatron.learner.megatron_learner import MegatronLearner
    from lmmrl_megatron.testing.tiny_gpt import build_tiny_gpt

    batch = make_batch()
    micro_batches = [collate(batch, list(range(batch.num_rows)))]
    config = OptimizerConfig(lr=1e-2, clip_grad=0.0, weight_decay=0.1)
    learner = MegatronLearner([build_tiny_gpt()], gpt_forward, VOCAB, config)

    def loss_fn(logprobs, entropy, mb):
        return -(logprobs * mb.advantages * mb.loss_mask).sum() / mb.loss_mask.sum(), {}

    def weights():
        return torch.cat([p.detach().flatten().clone() for p in learner.model[0].parameters()])

    start = weights()
    learner.train_step(micro_batches, loss_fn, lr=0.0)
    unchanged = torch.equal(weights(), start)
    groups = [(g["lr"], g["weight_decay"], g.get("wd_mult", 1.0)) for g in learner.optimizer.param_groups]
    learner.train_step(micro_batches, loss_fn, lr=1e-2)
    return {"unchanged_at_lr_0": unchanged, "moved_at_lr": not torch.equal(weights(), start), "groups": groups}


def test_the_learning_rate_of_a_step_reaches_the_optimizer() -> None:
    [result] = run_distributed(lr_worker, world_size=1)
    assert result["unchanged_at_lr_0"] and result["moved_at_lr"]
    groups = result["groups"]
    assert {lr for lr, _, _ in groups} == {0.0}
    # weight decay only where Megatron's groups allow it (wd_mult 0: biases and norms)
    assert {(wd, mult) for _, wd, mult in groups} == {(0.1, 1.0), (0.0, 0.0)}

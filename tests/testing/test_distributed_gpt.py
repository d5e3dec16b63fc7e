"""Real Megatron-Core tensor and pipeline parallelism on CPU: a small GPT trained one step at several layouts.

Every layout builds the same logical model (weights drawn from a generator seeded by the parameter's global name
and sliced to the rank's TP shard), runs forward+backward through Megatron's pipeline schedule over two
micro-batches, and must give the loss and the embedding gradient of the unsharded reference.
"""

from __future__ import annotations

import pytest
import torch

from lmmrl_megatron.parallel.local_ranks import run_distributed
from lmmrl_megatron.testing.tiny_gpt import VOCAB, build_tiny_gpt

SEQ, MICRO_BATCH, NUM_MICROBATCHES = 16, 2, 2


def _batches() -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, VOCAB, (NUM_MICROBATCHES, MICRO_BATCH, SEQ + 1), generator=gen)
    return [{"tokens": t[:, :-1], "labels": t[:, 1:]} for t in tokens]


def one_training_step() -> dict[str, object]:
    """Worker body: build the GPT for this rank's stage, run one forward+backward, return loss and grads."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    model = build_tiny_gpt()

    position_ids = torch.arange(SEQ).unsqueeze(0).expand(MICRO_BATCH, SEQ)

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        output = model(batch["tokens"], position_ids, attention_mask=None, labels=batch["labels"])

        def loss_func(per_token_loss):
            loss = per_token_loss.float().mean()
            return loss, {"loss": loss.detach()}

        return output, loss_func

    losses = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(_batches()),
        model=[model],
        num_microbatches=NUM_MICROBATCHES,
        seq_length=SEQ,
        micro_batch_size=MICRO_BATCH,
        forward_only=False,
    )
    result: dict[str, object] = {"stage": ps.get_pipeline_model_parallel_rank(), "tp_rank": ps.get_tensor_model_parallel_rank()}
    if ps.is_pipeline_last_stage():
        result["loss"] = torch.stack([m["loss"] for m in losses]).mean().item()
    if ps.is_pipeline_first_stage():
        grad = model.embedding.word_embeddings.weight.grad
        # Gather the vocab-sharded embedding gradient so every layout is compared on the full table.
        shards = [torch.empty_like(grad) for _ in range(ps.get_tensor_model_parallel_world_size())]
        torch.distributed.all_gather(shards, grad, group=ps.get_tensor_model_parallel_group())
        result["embedding_grad"] = torch.cat(shards, dim=0)
    return result


@pytest.fixture(scope="module")
def reference() -> dict[str, object]:
    (result,) = run_distributed(one_training_step, world_size=1)
    return result


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2), (2, 2)], ids=["tp2", "pp2", "tp2pp2"])
def test_gpt_forward_backward_matches_reference(tp: int, pp: int, reference: dict[str, object]) -> None:
    results = run_distributed(one_training_step, world_size=tp * pp, tp=tp, pp=pp)
    last = [r for r in results if r["stage"] == pp - 1]
    first = [r for r in results if r["stage"] == 0]
    assert len(last) == tp and len(first) == tp
    for r in last:
        assert r["loss"] == pytest.approx(reference["loss"], rel=1e-5)
    for r in first:
        torch.testing.assert_close(r["embedding_grad"], reference["embedding_grad"], rtol=1e-4, atol=1e-6)
    assert reference["embedding_grad"].abs().sum() > 0

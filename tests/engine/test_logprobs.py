"""Vocabulary-parallel log-probs and entropy equal the unsharded computation, values and gradients."""

from __future__ import annotations

import pytest
import torch

from lmmrl_megatron.engine.logprobs import vocab_parallel_logprobs
from lmmrl_megatron.parallel.local_ranks import run_distributed

PADDED_VOCAB, REAL_VOCAB, TEMPERATURE = 16, 13, 0.7


def make_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, PADDED_VOCAB, generator=gen, dtype=torch.float64) * 3
    labels = torch.randint(0, REAL_VOCAB, (2, 5), generator=gen)
    weights_lp = torch.randn(2, 5, generator=gen, dtype=torch.float64)
    weights_ent = torch.randn(2, 5, generator=gen, dtype=torch.float64)
    return logits, labels, weights_lp, weights_ent


def reference() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    logits, labels, w_lp, w_ent = make_inputs()
    logits = logits.clone().requires_grad_()
    logp_all = torch.log_softmax(logits[..., :REAL_VOCAB] / TEMPERATURE, dim=-1)
    logp = logp_all.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    ((logp * w_lp).sum() + (entropy * w_ent).sum()).backward()
    return logp.detach(), entropy.detach(), logits.grad


def sharded(tp_rank: int, tp_size: int, group=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    logits, labels, w_lp, w_ent = make_inputs()
    shard = logits.chunk(tp_size, dim=-1)[tp_rank].clone().requires_grad_()
    logp, entropy = vocab_parallel_logprobs(shard, labels, REAL_VOCAB, tp_rank, group, temperature=TEMPERATURE)
    ((logp * w_lp).sum() + (entropy * w_ent).sum()).backward()
    return logp.detach().double(), entropy.detach().double(), shard.grad


def tp_worker() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from megatron.core import parallel_state as ps

    return sharded(ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_group())


def test_single_shard_matches_log_softmax() -> None:
    ref_logp, ref_ent, ref_grad = reference()
    logp, ent, grad = sharded(0, 1)
    torch.testing.assert_close(logp, ref_logp, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ent, ref_ent, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad[..., :REAL_VOCAB].double(), ref_grad[..., :REAL_VOCAB], rtol=1e-4, atol=1e-6)
    assert torch.all(grad[..., REAL_VOCAB:] == 0)  # padding rows never receive gradient


@pytest.mark.parametrize("tp", [2, 4])
def test_tensor_parallel_matches_log_softmax(tp: int) -> None:
    ref_logp, ref_ent, ref_grad = reference()
    for rank, (logp, ent, grad) in enumerate(run_distributed(tp_worker, world_size=tp, tp=tp)):
        torch.testing.assert_close(logp, ref_logp, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ent, ref_ent, rtol=1e-5, atol=1e-6)
        expected = torch.cat([ref_grad[..., :REAL_VOCAB], torch.zeros(2, 5, PADDED_VOCAB - REAL_VOCAB, dtype=torch.float64)], -1)
        torch.testing.assert_close(grad.double(), expected.chunk(tp, dim=-1)[rank], rtol=1e-4, atol=1e-6)

"""Vocabulary-parallel log-probs and entropy equal the unsharded computation, values and gradients."""

from __future__ import annotations

import pytest
import torch

from lmmrl_megatron.parallel.local_ranks import run_distributed
from lmmrl_megatron.parallel.vocab_parallel import gather_vocab_parallel_logits, vocab_parallel_log_probs

PADDED_VOCAB, REAL_VOCAB, TEMPERATURE = 16, 13, 0.7
EXCLUDED = (2, 7)  # one in each half of the vocabulary (the TP=2 shards)


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
    logp, entropy = vocab_parallel_log_probs(shard, labels, REAL_VOCAB, group, TEMPERATURE, with_entropy=True)
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


def _without_excluded(labels: torch.Tensor) -> torch.Tensor:
    return labels.masked_fill(torch.isin(labels, torch.tensor(EXCLUDED)), 0)


def excluded_reference() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """log_softmax over the real columns that are not excluded; the excluded ones get no probability."""
    logits, labels, w_lp, w_ent = make_inputs()
    logits = logits.clone().requires_grad_()
    kept = [c for c in range(REAL_VOCAB) if c not in EXCLUDED]
    logp_kept = torch.log_softmax(logits[..., kept], dim=-1)
    kept_index = torch.searchsorted(torch.tensor(kept), _without_excluded(labels))
    logp = logp_kept.gather(-1, kept_index.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_kept.exp() * logp_kept).sum(-1)
    ((logp * w_lp).sum() + (entropy * w_ent).sum()).backward()
    return logp.detach(), entropy.detach(), logits.grad


def excluded_worker() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from megatron.core import parallel_state as ps

    logits, labels, w_lp, w_ent = make_inputs()
    tp_rank, tp = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    shard = logits.chunk(tp, dim=-1)[tp_rank].clone().requires_grad_()
    logp, entropy = vocab_parallel_log_probs(shard, _without_excluded(labels), REAL_VOCAB,
                                             ps.get_tensor_model_parallel_group(), excluded_token_ids=EXCLUDED,
                                             with_entropy=True)
    ((logp * w_lp).sum() + (entropy * w_ent).sum()).backward()
    return logp.detach().double(), entropy.detach().double(), shard.grad


def test_excluded_tokens_get_no_probability_at_tp2() -> None:
    ref_logp, ref_ent, ref_grad = excluded_reference()
    for rank, (logp, ent, grad) in enumerate(run_distributed(excluded_worker, world_size=2, tp=2)):
        torch.testing.assert_close(logp, ref_logp, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ent, ref_ent, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad, ref_grad.chunk(2, dim=-1)[rank], rtol=1e-4, atol=1e-6)
        assert torch.all(grad[..., [c - rank * 8 for c in (*EXCLUDED, 13, 14, 15) if c // 8 == rank]] == 0)


def test_log_probs_alone_ignore_negative_labels_and_match_log_softmax() -> None:
    logits, labels, w_lp, _ = make_inputs()
    labels[0, :2] = -100  # ignore index: log-prob 0, no gradient
    ref = logits.clone().requires_grad_()
    ref_logp = torch.log_softmax(ref[..., :REAL_VOCAB], -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    ref_logp = ref_logp.masked_fill(labels < 0, 0.0)
    (ref_logp * w_lp).sum().backward()
    ours = logits.clone().requires_grad_()
    logp, entropy = vocab_parallel_log_probs(ours, labels, REAL_VOCAB)
    (logp * w_lp).sum().backward()
    assert entropy is None
    assert torch.all(logp[0, :2] == 0) and torch.all(ours.grad[0, :2] == 0)
    torch.testing.assert_close(logp.double(), ref_logp.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.grad[..., :REAL_VOCAB].double(), ref.grad[..., :REAL_VOCAB], rtol=1e-4, atol=1e-6)


def test_entropy_gradient_alone_is_exact_and_finite_under_a_large_scale() -> None:
    """A gradient scale (fp16 loss scaling reaches 2**32) times log p of a masked column (~ -1e30) would
    overflow to -inf and give inf * 0 = NaN: the backward multiplies by p first."""
    logits, labels, _, w_ent = make_inputs()
    logits, scale = logits.float(), 2.0**32
    ref = logits.clone().requires_grad_()
    logp_all = torch.log_softmax(ref[..., :REAL_VOCAB], -1)
    (-(logp_all.exp() * logp_all).sum(-1) * w_ent.float()).sum().backward()
    ours = logits.clone().requires_grad_()
    _, entropy = vocab_parallel_log_probs(ours, labels, REAL_VOCAB, with_entropy=True)
    (entropy * w_ent.float() * scale).sum().backward()
    assert torch.isfinite(ours.grad).all() and torch.all(ours.grad[..., REAL_VOCAB:] == 0)
    torch.testing.assert_close(ours.grad[..., :REAL_VOCAB] / scale, ref.grad[..., :REAL_VOCAB], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logits_are_left_unchanged_and_the_gradient_has_their_dtype(dtype: torch.dtype) -> None:
    """The input is saved for backward as it came: never overwritten, no fp32 copy; bf16 logits are read in fp32."""
    logits, labels, w_lp, _ = make_inputs()
    logits = logits.to(dtype).requires_grad_()
    before = logits.detach().clone()
    logp, _ = vocab_parallel_log_probs(logits, labels, REAL_VOCAB, temperature=TEMPERATURE)
    (logp * w_lp.float()).sum().backward()
    assert torch.equal(logits.detach(), before)
    assert logp.dtype == torch.float32 and logits.grad.dtype == dtype
    exact = before.double()[..., :REAL_VOCAB].requires_grad_()  # the reference on the very same (rounded) values
    exact_logp = torch.log_softmax(exact / TEMPERATURE, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    (exact_logp * w_lp).sum().backward()
    torch.testing.assert_close(logp.double(), exact_logp.detach(), rtol=1e-5, atol=1e-5)
    grad_tol = dict(rtol=1e-4, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(logits.grad[..., :REAL_VOCAB].double(), exact.grad, **grad_tol)
    assert torch.all(logits.grad[..., REAL_VOCAB:] == 0)


def test_long_rows_run_in_pieces_with_the_same_result(monkeypatch: pytest.MonkeyPatch) -> None:
    """The eager bodies run over pieces of rows (bounded temporaries); the split changes no figure."""
    from lmmrl_megatron.parallel import vocab_parallel

    logits, labels, w_lp, w_ent = make_inputs()
    results = []
    for piece_elements in (2**25, PADDED_VOCAB * 3):  # one piece; pieces of 3 rows (10 rows: 3 + 3 + 3 + 1)
        monkeypatch.setattr(vocab_parallel, "_PIECE_ELEMENTS", piece_elements)
        x = logits.clone().requires_grad_()
        logp, entropy = vocab_parallel_log_probs(x, labels, REAL_VOCAB, temperature=TEMPERATURE, with_entropy=True)
        ((logp * w_lp).sum() + (entropy * w_ent).sum()).backward()
        results.append((logp, entropy, x.grad))
    for one, pieces in zip(*results):
        torch.testing.assert_close(one, pieces, rtol=0, atol=0)


def test_temperature_must_be_positive() -> None:
    logits, labels, _, _ = make_inputs()
    with pytest.raises(ValueError, match="temperature"):
        vocab_parallel_log_probs(logits, labels, REAL_VOCAB, temperature=0.0)


def gather_worker() -> torch.Tensor:
    from megatron.core import parallel_state as ps

    logits = make_inputs()[0]
    shard = logits.chunk(ps.get_tensor_model_parallel_world_size(), dim=-1)[ps.get_tensor_model_parallel_rank()]
    return gather_vocab_parallel_logits(shard, REAL_VOCAB, ps.get_tensor_model_parallel_group())


def test_gather_gives_every_rank_the_real_vocabulary() -> None:
    for gathered in run_distributed(gather_worker, world_size=2, tp=2):
        assert torch.equal(gathered, make_inputs()[0][..., :REAL_VOCAB])

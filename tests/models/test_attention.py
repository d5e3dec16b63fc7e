"""SdpaAttention against a naive float64 softmax(QK^T)V with explicit masks, for every layout it accepts."""

from __future__ import annotations

import math

import pytest
import torch
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.enums import AttnMaskType

from lmmrl_megatron.models.attention import SdpaAttention
from lmmrl_megatron.parallel.local_ranks import run_distributed

HEAD_DIM = 8


def _attention(num_heads: int, num_groups: int, mask_type: AttnMaskType) -> SdpaAttention:
    config = TransformerConfig(
        num_layers=1,
        hidden_size=num_heads * HEAD_DIM,
        num_attention_heads=num_heads,
        num_query_groups=num_groups,
        kv_channels=HEAD_DIM,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    return SdpaAttention(config, layer_number=1, attn_mask_type=mask_type, attention_type="self")


def _qkv(seq: int, batch: int, heads: int, groups: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(seq, batch, heads, HEAD_DIM, generator=gen)
    k = torch.randn(seq, batch, groups, HEAD_DIM, generator=gen)
    v = torch.randn(seq, batch, groups, HEAD_DIM, generator=gen)
    return q, k, v


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """[sq, b, h, d] x [sk, b, g, d] with `allowed` [b, sq, sk] (True = may attend) -> [sq, b, h*d] in float64.

    Query head i reads KV group i // (h / g), Megatron's grouping. Rows with nothing allowed come out as NaN.
    """
    q, k, v = q.double(), k.double(), v.double()
    rep = q.size(2) // k.size(2)
    k = k.repeat_interleave(rep, dim=2)
    v = v.repeat_interleave(rep, dim=2)
    scores = torch.einsum("qbhd,kbhd->bhqk", q, k) / math.sqrt(q.size(-1))
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("bhqk,kbhd->qbhd", probs, v)
    return out.reshape(q.size(0), q.size(1), -1)


def _block_diagonal(cu_seqlens: list[int], total: int, causal: bool) -> torch.Tensor:
    allowed = torch.zeros(total, total, dtype=torch.bool)
    for start, end in zip(cu_seqlens[:-1], cu_seqlens[1:]):
        block = torch.ones(end - start, end - start, dtype=torch.bool)
        allowed[start:end, start:end] = block.tril() if causal else block
    return allowed


def test_causal_matches_naive() -> None:
    q, k, v = _qkv(seq=7, batch=2, heads=4, groups=4)
    out = _attention(4, 4, AttnMaskType.causal)(q, k, v, None)
    allowed = torch.ones(7, 7, dtype=torch.bool).tril().expand(2, 7, 7)
    assert out.shape == (7, 2, 4 * HEAD_DIM)
    torch.testing.assert_close(out.double(), naive_attention(q, k, v, allowed), rtol=1e-5, atol=1e-5)


def test_padding_mask_matches_naive_on_valid_tokens() -> None:
    seq, lengths = 6, [6, 4]
    q, k, v = _qkv(seq=seq, batch=2, heads=2, groups=2, seed=1)
    key_valid = torch.arange(seq)[None, :] < torch.tensor(lengths)[:, None]  # [b, sk]
    megatron_mask = ~key_valid[:, None, None, :].expand(2, 1, seq, seq)  # True = masked out
    out = _attention(2, 2, AttnMaskType.padding)(q, k, v, megatron_mask)
    ref = naive_attention(q, k, v, key_valid[:, None, :].expand(2, seq, seq))
    for b, length in enumerate(lengths):
        torch.testing.assert_close(out[:length, b].double(), ref[:length, b], rtol=1e-5, atol=1e-5)


def test_causal_with_left_padding_stays_finite() -> None:
    """Left padding under a causal mask leaves query rows with nothing to attend to: no NaN may come out."""
    seq, pad = 5, 2
    q, k, v = _qkv(seq=seq, batch=1, heads=2, groups=1, seed=2)
    key_valid = torch.arange(seq) >= pad
    megatron_mask = ~(key_valid[None, :] & torch.ones(seq, seq, dtype=torch.bool).tril())[None, None]
    out = _attention(2, 1, AttnMaskType.causal)(q, k, v, megatron_mask)
    assert torch.isfinite(out).all()
    ref = naive_attention(q, k, v, ~megatron_mask[:, 0])
    torch.testing.assert_close(out[pad:].double(), ref[pad:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("groups", [2, 1], ids=["gqa2", "mqa"])
def test_grouped_query_attention_matches_naive(groups: int) -> None:
    q, k, v = _qkv(seq=9, batch=2, heads=4, groups=groups, seed=3)
    out = _attention(4, groups, AttnMaskType.causal)(q, k, v, None)
    allowed = torch.ones(9, 9, dtype=torch.bool).tril().expand(2, 9, 9)
    torch.testing.assert_close(out.double(), naive_attention(q, k, v, allowed), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_packed_thd_segments_never_attend_across_boundaries(causal: bool) -> None:
    cu = [0, 3, 8, 9, 13, 16]  # lengths 3, 5, 1, 4, 3: two segments share a length (one batched call)
    total = cu[-1]
    q, k, v = _qkv(seq=total, batch=1, heads=4, groups=2, seed=4)
    cu_t = torch.tensor(cu, dtype=torch.int32)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_t, cu_seqlens_kv=cu_t, max_seqlen_q=5, max_seqlen_kv=5)
    mask_type = AttnMaskType.causal if causal else AttnMaskType.no_mask
    out = _attention(4, 2, mask_type)(q.squeeze(1), k.squeeze(1), v.squeeze(1), None, packed_seq_params=params)
    assert out.shape == (total, 4 * HEAD_DIM)
    ref = naive_attention(q, k, v, _block_diagonal(cu, total, causal)[None])
    torch.testing.assert_close(out.double(), ref[:, 0], rtol=1e-5, atol=1e-5)


def test_block_diagonal_sbhd_batch_one_with_empty_segment() -> None:
    """The vision tower's form: [t, 1, h, d] with cu_seqlens over images/windows, bidirectional."""
    cu = [0, 4, 4, 8, 12, 17]  # an empty segment and three of length 4
    total = cu[-1]
    q, k, v = _qkv(seq=total, batch=1, heads=2, groups=2, seed=5)
    params = PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=torch.tensor(cu, dtype=torch.int32))
    out = _attention(2, 2, AttnMaskType.no_mask)(q, k, v, None, packed_seq_params=params)
    assert out.shape == (total, 1, 2 * HEAD_DIM)
    ref = naive_attention(q, k, v, _block_diagonal(cu, total, causal=False)[None])
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_packed_with_padding_between_segments() -> None:
    """cu_seqlens_q_padded: segments start at padded offsets; padding tokens produce zeros and are never read."""
    real, padded = [0, 3, 7], [0, 4, 8]  # lengths 3 and 4, each padded to a multiple of 4
    q, k, v = _qkv(seq=8, batch=1, heads=2, groups=2, seed=6)
    params = PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=torch.tensor(real, dtype=torch.int32),
        cu_seqlens_kv=torch.tensor(real, dtype=torch.int32),
        cu_seqlens_q_padded=torch.tensor(padded, dtype=torch.int32),
        cu_seqlens_kv_padded=torch.tensor(padded, dtype=torch.int32),
    )
    attention = _attention(2, 2, AttnMaskType.causal)
    out = attention(q.squeeze(1), k.squeeze(1), v.squeeze(1), None, packed_seq_params=params)
    real_rows = torch.tensor([0, 1, 2, 4, 5, 6, 7])
    assert torch.count_nonzero(out[3]) == 0
    ref = naive_attention(q[real_rows], k[real_rows], v[real_rows], _block_diagonal(real, 7, causal=True)[None])
    torch.testing.assert_close(out[real_rows].double(), ref[:, 0], rtol=1e-5, atol=1e-5)


def test_packed_gradients_match_naive() -> None:
    cu = [0, 2, 7, 12]
    q, k, v = (t.double().requires_grad_() for t in _qkv(seq=12, batch=1, heads=4, groups=2, seed=7))
    params = PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=torch.tensor(cu, dtype=torch.int32))
    weights = torch.randn(12, 1, 4 * HEAD_DIM, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    out = _attention(4, 2, AttnMaskType.causal)(q, k, v, None, packed_seq_params=params)
    grads = torch.autograd.grad((out * weights).sum(), (q, k, v))
    ref = naive_attention(q, k, v, _block_diagonal(cu, 12, causal=True)[None])
    ref_grads = torch.autograd.grad((ref * weights).sum(), (q, k, v))
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)


def gpt_layer_outputs_with_both_attentions() -> tuple[torch.Tensor, torch.Tensor]:
    """Worker: one GPT layer with Megatron's DotProductAttention and with ours, same weights and input."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import build_module

    config = TransformerConfig(
        num_layers=1,
        hidden_size=32,
        num_attention_heads=4,
        num_query_groups=2,
        use_cpu_initialization=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        add_qkv_bias=True,
    )
    outputs = []
    hidden = torch.randn(11, 2, 32, generator=torch.Generator().manual_seed(9))
    state = None
    for core_attention in (None, SdpaAttention):
        spec = get_gpt_layer_local_spec()
        if core_attention is not None:
            spec.submodules.self_attention.submodules.core_attention = core_attention
        layer = build_module(spec, config=config, layer_number=1)
        if state is None:
            state = layer.state_dict()
        else:
            layer.load_state_dict(state)
        with torch.no_grad():
            output, _ = layer(hidden_states=hidden, attention_mask=None)
        outputs.append(output.detach())
    return outputs[0], outputs[1]


def test_drop_in_for_dot_product_attention_in_a_gpt_layer() -> None:
    ((megatron_out, ours),) = run_distributed(gpt_layer_outputs_with_both_attentions, world_size=1, timeout_s=120)
    torch.testing.assert_close(ours, megatron_out, rtol=1e-5, atol=1e-5)
    assert megatron_out.abs().sum() > 0


def _cuda_qkv(total: int, heads: int, groups: int, head_dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator(device="cuda").manual_seed(10)
    shapes = [(total, heads, head_dim), (total, groups, head_dim), (total, groups, head_dim)]
    return tuple(torch.randn(s, generator=gen, device="cuda", dtype=dtype).requires_grad_() for s in shapes)


def _gpu_attention(heads: int, groups: int, head_dim: int, mask_type: AttnMaskType) -> SdpaAttention:
    config = TransformerConfig(
        num_layers=1, hidden_size=heads * head_dim, num_attention_heads=heads, num_query_groups=groups,
        kv_channels=head_dim, hidden_dropout=0.0, attention_dropout=0.0,
    )
    return SdpaAttention(config, layer_number=1, attn_mask_type=mask_type, attention_type="self")


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_gpu_varlen_kernel_matches_grouped_reference(causal: bool) -> None:
    """bf16 on GPU takes the flash/cuDNN varlen kernel; it must agree with the fp32 grouped-SDPA path."""
    cu = [0, 100, 356, 357, 1000, 1512]
    heads, groups, head_dim = 8, 2, 64
    attention = _gpu_attention(heads, groups, head_dim, AttnMaskType.causal if causal else AttnMaskType.no_mask)
    cu_t = torch.tensor(cu, dtype=torch.int32, device="cuda")
    params = PackedSeqParams(
        qkv_format="thd", cu_seqlens_q=cu_t, cu_seqlens_kv=cu_t, max_seqlen_q=643, max_seqlen_kv=643
    )
    q, k, v = _cuda_qkv(cu[-1], heads, groups, head_dim, torch.bfloat16)
    assert attention._can_use_varlen(q, params, causal)
    out = attention(q, k, v, None, packed_seq_params=params)
    cotangent = torch.randn_like(out)
    grads = torch.autograd.grad((out * cotangent).sum(), (q, k, v))
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    assert not attention._can_use_varlen(q32, params, causal)
    ref = attention(q32, k32, v32, None, packed_seq_params=params)
    ref_grads = torch.autograd.grad((ref * cotangent.float()).sum(), (q32, k32, v32))
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.float(), want, rtol=5e-2, atol=5e-2)


@pytest.mark.gpu
def test_gpu_long_causal_sequence_never_builds_the_score_matrix() -> None:
    """1 x 8192 tokens, 16 heads: a materialised bf16 score matrix alone would be 2 GiB; stay far below."""
    seq, heads, groups, head_dim = 8192, 16, 2, 128
    attention = _gpu_attention(heads, groups, head_dim, AttnMaskType.causal)
    gen = torch.Generator(device="cuda").manual_seed(11)
    q = torch.randn(seq, 1, heads, head_dim, generator=gen, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(seq, 1, groups, head_dim, generator=gen, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(seq, 1, groups, head_dim, generator=gen, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = attention(q, k, v, None)
    out.float().sum().backward()
    torch.cuda.synchronize()
    peak_extra = torch.cuda.max_memory_allocated() - base
    assert peak_extra < 256 * 2**20, f"attention used {peak_extra / 2**20:.0f} MiB beyond its inputs"
    # Spot-check the last query row against an explicit softmax over all keys.
    q_last, k_all, v_all = q[-1, 0].float(), k[:, 0].float(), v[:, 0].float()
    k_rep, v_rep = k_all.repeat_interleave(heads // groups, 1), v_all.repeat_interleave(heads // groups, 1)
    probs = torch.softmax(torch.einsum("hd,khd->hk", q_last, k_rep) / head_dim**0.5, dim=-1)
    want = torch.einsum("hk,khd->hd", probs, v_rep).reshape(-1)
    torch.testing.assert_close(out[-1, 0].float(), want, rtol=2e-2, atol=2e-2)

"""Core attention on PyTorch's scaled_dot_product_attention, a drop-in for Megatron-Core's `DotProductAttention`.

Megatron-Core's local `DotProductAttention` materialises the full [b, heads, s, s] score matrix and refuses packed
sequences. `SdpaAttention` keeps its constructor and forward contract (so a `ModuleSpec` can name it as
`core_attention`) but computes with `torch.nn.functional.scaled_dot_product_attention`, which picks the flash,
cuDNN or memory-efficient kernel on GPU and the math kernel on CPU.

Layouts it accepts (the same as Megatron's `SelfAttention` hands to its core attention):
- `[s, b, heads, dim]` query/key/value with an optional boolean `attention_mask` broadcastable to
  `[b, 1, sq, sk]` (True = masked out, Megatron's convention) and a causal mask type;
- packed sequences described by `PackedSeqParams`: `qkv_format="thd"` with `[t, heads, dim]` tensors, or
  `qkv_format="sbhd"` with batch 1 (`[t, 1, heads, dim]`). Attention never crosses a `cu_seqlens` boundary.
  The `sbhd` form exists for callers with per-token rotary frequencies (the vision tower, M-RoPE): Megatron's
  `SelfAttention` applies rotary to `sbhd` in one elementwise op, while for `thd` it loops over segments with a
  host sync per segment.

Packed attention runs on GPU through `torch.nn.attention.varlen.varlen_attn` (flash / cuDNN varlen kernels; half
precision, no dropout). Elsewhere segments are grouped by length and each group is one batched SDPA call, so the
number of kernel launches is the number of distinct segment lengths, not the number of segments, and no
S x S mask is ever built.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

try:  # torch >= 2.10 ships flash/cuDNN varlen attention with autograd
    from torch.nn.attention.varlen import varlen_attn as _varlen_attn
except ImportError:  # pragma: no cover - depends on the installed torch
    _varlen_attn = None
# Its keywords changed across releases: causality was `is_causal` before `window_size`, GQA came later.
_VARLEN_PARAMS = frozenset(inspect.signature(_varlen_attn).parameters) if _varlen_attn is not None else frozenset()

# On CUDA, cuDNN's fused attention first: on Hopper its forward + backward is the fastest SDPA kernel for the
# decoder's causal GQA shapes (bench/kernels.py); SDPA falls through to the next backend for inputs a kernel refuses.
_CUDA_BACKEND_PRIORITY = [
    SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH
]

# `enable_gqa` lets SDPA share each KV head across its query group without copying KV (torch >= 2.5).
_SDPA_SUPPORTS_GQA = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)

_CAUSAL_MASK_TYPES = (AttnMaskType.causal, AttnMaskType.padding_causal, AttnMaskType.causal_bottom_right)
_VARLEN_DTYPES = (torch.float16, torch.bfloat16)
_PACKED_FORMATS = ("thd", "sbhd")


@dataclass(frozen=True)
class PackedSegments:
    """Host-side description of packed segments: where each starts in the token axis and how long it is."""

    starts_q: list[int]
    lengths_q: list[int]
    starts_kv: list[int]
    lengths_kv: list[int]

    @staticmethod
    def from_params(params: PackedSeqParams) -> "PackedSegments":
        """Read `cu_seqlens_*` (and their `_padded` variants, which give where segments start) in one host sync."""
        cu_q = params.cu_seqlens_q
        cu_kv = params.cu_seqlens_kv if params.cu_seqlens_kv is not None else cu_q
        starts_q = params.cu_seqlens_q_padded if params.cu_seqlens_q_padded is not None else cu_q
        starts_kv = params.cu_seqlens_kv_padded if params.cu_seqlens_kv_padded is not None else cu_kv
        tensors = [cu_q, cu_kv, starts_q, starts_kv]
        if len({t.numel() for t in tensors}) != 1:
            raise ValueError(f"PackedSeqParams: cu_seqlens tensors differ in length: {[t.numel() for t in tensors]}")
        cu_q_l, cu_kv_l, st_q_l, st_kv_l = torch.stack([t.to(torch.int64) for t in tensors]).tolist()
        return PackedSegments(
            starts_q=st_q_l[:-1],
            lengths_q=[b - a for a, b in zip(cu_q_l[:-1], cu_q_l[1:])],
            starts_kv=st_kv_l[:-1],
            lengths_kv=[b - a for a, b in zip(cu_kv_l[:-1], cu_kv_l[1:])],
        )


@dataclass
class HostPackedSeqParams(PackedSeqParams):
    """`PackedSeqParams` that also carry the segment bounds on the host.

    Callers that know the bounds before moving them to the device (the vision tower computes them from
    `image_grid_thw` on the CPU) pass them here, sparing the grouped-SDPA path a device-to-host sync per layer.
    """

    host_segments: PackedSegments | None = None


class SdpaAttention(MegatronModule):
    """Megatron core attention (the `DotProductAttention` contract) computed with PyTorch SDPA kernels."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection: ProcessGroupCollection | None = None,
    ) -> None:
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError(
                f"SdpaAttention: context_parallel_size={config.context_parallel_size}; only 1 is supported"
            )
        if config.softmax_type != "vanilla":
            raise ValueError(f"SdpaAttention: softmax_type={config.softmax_type!r}; only 'vanilla' is supported")
        if config.window_size is not None:
            raise ValueError(f"SdpaAttention: sliding window_size={config.window_size} is not supported")
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        head_dim = config.kv_channels
        # apply_query_key_layer_scaling divides the scale by layer_number and multiplies it back inside the
        # softmax, a no-op in exact arithmetic; SDPA's kernels are stable without it, so it is ignored.
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
    ) -> Tensor:
        """Attention over `[s, b, np, hn]` (or packed) tensors; returns `[s, b, np * hn]` (`[t, np * hn]` for thd)."""
        if attention_bias is not None:
            raise ValueError("SdpaAttention: attention_bias is not supported")
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        causal = mask_type in _CAUSAL_MASK_TYPES
        if packed_seq_params is not None:
            if attention_mask is not None:
                raise ValueError("SdpaAttention: packed sequences take no attention_mask (segments are the mask)")
            return self._packed_forward(query, key, value, packed_seq_params, causal)
        return self._dense_forward(query, key, value, attention_mask, causal, mask_type)

    # ----------------------------------------------------------------------------------------------------------
    # Padded batches: [s, b, heads, dim]

    def _dense_forward(
        self, query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None, causal: bool, mask_type: AttnMaskType
    ) -> Tensor:
        seq_q, batch, seq_k = query.size(0), query.size(1), key.size(0)
        keep = None
        if mask is not None or (causal and seq_q != seq_k):
            keep = _keep_mask(mask, seq_q, seq_k, causal, mask_type, query.device)
            causal = False  # folded into `keep`
        # [s, b, h, d] -> [b, h, s, d]; strided views, SDPA needs only the last dim contiguous.
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        out = self._sdpa(q, k, v, keep, causal)
        return out.permute(2, 0, 1, 3).reshape(seq_q, batch, -1)

    def _sdpa(self, q: Tensor, k: Tensor, v: Tensor, keep: Tensor | None, causal: bool) -> Tensor:
        """SDPA over `[..., heads, s, d]`, sharing KV heads across query groups without copying where possible."""
        num_rep = q.size(-3) // k.size(-3)
        assert q.size(-3) == num_rep * k.size(-3), f"query heads {q.size(-3)} not a multiple of kv heads {k.size(-3)}"
        # With a mask on GPU only the memory-efficient kernel applies, which does not take enable_gqa: repeat KV.
        use_gqa = num_rep > 1 and _SDPA_SUPPORTS_GQA and (keep is None or not q.is_cuda)
        if num_rep > 1 and not use_gqa:
            k = k.repeat_interleave(num_rep, dim=-3)
            v = v.repeat_interleave(num_rep, dim=-3)
        dropout_p = self.dropout_p if self.training else 0.0
        kwargs = {"enable_gqa": True} if use_gqa else {}
        with contextlib.ExitStack() as stack:
            if q.is_cuda:
                stack.enter_context(sdpa_kernel(_CUDA_BACKEND_PRIORITY, set_priority=True))
            if dropout_p > 0.0 and not self.config.sequence_parallel:
                # Heads are split over TP ranks: each rank needs its own dropout stream (as DotProductAttention).
                stack.enter_context(tensor_parallel.get_cuda_rng_tracker().fork())
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=keep, dropout_p=dropout_p, is_causal=causal, scale=self.softmax_scale, **kwargs
            )

    # ----------------------------------------------------------------------------------------------------------
    # Packed sequences

    def _packed_forward(
        self, query: Tensor, key: Tensor, value: Tensor, params: PackedSeqParams, causal: bool
    ) -> Tensor:
        if params.qkv_format not in _PACKED_FORMATS:
            raise ValueError(
                f"SdpaAttention: packed qkv_format={params.qkv_format!r}; expected one of {_PACKED_FORMATS}"
            )
        if params.cu_seqlens_q is None:
            raise ValueError("SdpaAttention: PackedSeqParams.cu_seqlens_q is required for packed attention")
        if params.qkv_format == "sbhd":
            if query.size(1) != 1:
                raise ValueError(f"SdpaAttention: packed 'sbhd' needs batch 1, got query of shape {tuple(query.shape)}")
            query, key, value = query.squeeze(1), key.squeeze(1), value.squeeze(1)
        if self._can_use_varlen(query, params, causal):
            out = self._packed_varlen(query, key, value, params, causal)
        else:
            segments = params.host_segments if isinstance(params, HostPackedSeqParams) else None
            if segments is None:
                segments = PackedSegments.from_params(params)
            out = self._packed_grouped(query, key, value, segments, causal)
        out = out.reshape(out.size(0), -1)
        return out.unsqueeze(1) if params.qkv_format == "sbhd" else out

    def _can_use_varlen(self, query: Tensor, params: PackedSeqParams, causal: bool) -> bool:
        padded = params.cu_seqlens_q_padded is not None or params.cu_seqlens_kv_padded is not None
        head_dim = query.size(-1)
        return (
            _varlen_attn is not None
            and query.is_cuda
            and query.dtype in _VARLEN_DTYPES
            and (self.dropout_p == 0.0 or not self.training)
            # With padding between segments, varlen over the padded bounds is exact for real tokens only when
            # causal (real tokens never see the padding after them).
            and (not padded or causal)
            and head_dim % 8 == 0
            and head_dim <= 256
        )

    def _packed_varlen(self, q: Tensor, k: Tensor, v: Tensor, params: PackedSeqParams, causal: bool) -> Tensor:
        cu_q = params.cu_seqlens_q_padded if params.cu_seqlens_q_padded is not None else params.cu_seqlens_q
        cu_q = cu_q.to(torch.int32)
        self_attention = params.cu_seqlens_kv is None or params.cu_seqlens_kv is params.cu_seqlens_q
        if self_attention and params.cu_seqlens_kv_padded is None:
            cu_kv = cu_q  # the same tensor object: cuDNN's causal varlen needs it to trust the alignment
        else:
            cu_kv = params.cu_seqlens_kv_padded if params.cu_seqlens_kv_padded is not None else params.cu_seqlens_kv
            cu_kv = cu_kv.to(torch.int32)
        # max_seqlen_* describe real lengths; padded bounds are longer, so measure those (one host sync).
        max_q = params.max_seqlen_q if params.cu_seqlens_q_padded is None else None
        max_q = int(max_q) if max_q is not None else _max_length(cu_q)
        if cu_kv is cu_q:
            max_kv = max_q
        else:
            max_kv = params.max_seqlen_kv if params.cu_seqlens_kv_padded is None else None
            max_kv = int(max_kv) if max_kv is not None else _max_length(cu_kv)
        kwargs: dict[str, object] = {"scale": self.softmax_scale}
        if "window_size" in _VARLEN_PARAMS:
            kwargs["window_size"] = (-1, 0) if causal else (-1, -1)
        else:
            kwargs["is_causal"] = causal
        if q.size(1) != k.size(1):
            if "enable_gqa" in _VARLEN_PARAMS:
                kwargs["enable_gqa"] = True
            else:  # older varlen: share KV heads by copying them
                k = k.repeat_interleave(q.size(1) // k.size(1), dim=1)
                v = v.repeat_interleave(q.size(1) // v.size(1), dim=1)
        return _varlen_attn(q, k, v, cu_q, cu_kv, max_q, max_kv, **kwargs)

    def _packed_grouped(self, q: Tensor, k: Tensor, v: Tensor, segments: PackedSegments, causal: bool) -> Tensor:
        """Segments of equal length are stacked into one `[n, heads, len, dim]` batch: one SDPA call per length.

        Segments are cut with one `torch.split` per tensor and joined with stack/cat, whose backward passes are
        one cat and views: O(tokens) work however many segments, and no atomics (unlike index_select/narrow).
        """
        groups: dict[tuple[int, int], list[int]] = {}
        for index, (len_q, len_kv) in enumerate(zip(segments.lengths_q, segments.lengths_kv)):
            if len_q > 0 and len_kv > 0:  # an empty segment contributes nothing; its queries (if any) stay zero
                groups.setdefault((len_q, len_kv), []).append(index)
        q_views = _segment_views(q, segments.starts_q, segments.lengths_q)
        k_views = _segment_views(k, segments.starts_kv, segments.lengths_kv)
        v_views = _segment_views(v, segments.starts_kv, segments.lengths_kv)
        outputs: dict[int, Tensor] = {}
        for (len_q, len_kv), members in groups.items():
            assert not causal or len_q == len_kv, f"causal packed attention needs equal lengths, got {len_q}/{len_kv}"
            qq, kk, vv = (_stack([views[i] for i in members]) for views in (q_views, k_views, v_views))
            res = self._sdpa(qq.transpose(1, 2), kk.transpose(1, 2), vv.transpose(1, 2), None, causal)
            outputs.update(zip(members, res.transpose(1, 2).unbind(0)))  # each [len_q, heads, dim]
        return _assemble_segments(outputs, segments, q.size(0), (q.size(1), v.size(2)), q)

def _keep_mask(
    mask: Tensor | None, seq_q: int, seq_k: int, causal: bool, mask_type: AttnMaskType, device: torch.device
) -> Tensor:
    """SDPA's boolean mask (True = attend) from Megatron's (True = masked out), with causality folded in.

    A query row with nothing left to attend to (left padding under a causal mask) would come out as NaN from
    SDPA; such rows are opened to every key instead, giving finite garbage at positions the loss ignores.
    """
    keep = torch.ones(seq_q, seq_k, dtype=torch.bool, device=device) if mask is None else ~mask.to(torch.bool)
    if causal:
        # Bottom-right alignment (the last query sees every key) only where asked for; top-left otherwise.
        offset = seq_k - seq_q if mask_type == AttnMaskType.causal_bottom_right else 0
        keep = keep & torch.ones(seq_q, seq_k, dtype=torch.bool, device=device).tril(diagonal=offset)
    empty_rows = ~keep.any(dim=-1, keepdim=True)
    return keep | empty_rows


def _segment_views(x: Tensor, starts: list[int], lengths: list[int]) -> dict[int, Tensor]:
    """Views of the non-empty segments of `x` (dim 0), by segment index, from one `torch.split`."""
    sizes: list[int] = []
    slot: dict[int, int] = {}
    cursor = 0
    for index in sorted(range(len(starts)), key=lambda i: starts[i]):
        if lengths[index] == 0:
            continue
        assert starts[index] >= cursor, f"packed segments overlap at token {starts[index]}"
        if starts[index] > cursor:
            sizes.append(starts[index] - cursor)  # padding between segments
        slot[index] = len(sizes)
        sizes.append(lengths[index])
        cursor = starts[index] + lengths[index]
    assert cursor <= x.size(0), f"packed segments end at {cursor}, past the {x.size(0)} tokens"
    if cursor < x.size(0):
        sizes.append(x.size(0) - cursor)
    parts = torch.split(x, sizes)
    return {index: parts[position] for index, position in slot.items()}


def _stack(views: list[Tensor]) -> Tensor:
    """[n, len, ...] from n equal-length segment views (no copy for one)."""
    return views[0].unsqueeze(0) if len(views) == 1 else torch.stack(views)


def _assemble_segments(
    outputs: dict[int, Tensor], segments: PackedSegments, num_tokens: int, row_shape: tuple[int, int], like: Tensor
) -> Tensor:
    """Per-segment outputs back in token order; tokens outside every segment (padding) get zeros."""
    pieces: list[Tensor] = []
    cursor = 0
    for index in sorted(range(len(segments.starts_q)), key=lambda i: segments.starts_q[i]):
        start, length = segments.starts_q[index], segments.lengths_q[index]
        if length == 0:
            continue
        assert start >= cursor, f"packed segments overlap at token {start}"
        if start > cursor:
            pieces.append(like.new_zeros(start - cursor, *row_shape))
        piece = outputs.get(index)
        pieces.append(piece if piece is not None else like.new_zeros(length, *row_shape))
        cursor = start + length
    assert cursor <= num_tokens, f"packed segments end at {cursor}, past the {num_tokens} tokens"
    if cursor < num_tokens:
        pieces.append(like.new_zeros(num_tokens - cursor, *row_shape))
    return torch.cat(pieces) if pieces else like.new_zeros(num_tokens, *row_shape)


def _max_length(cu_seqlens: Tensor) -> int:
    """Longest segment of a cumulative-lengths tensor (a host sync)."""
    return int((cu_seqlens[1:] - cu_seqlens[:-1]).max())

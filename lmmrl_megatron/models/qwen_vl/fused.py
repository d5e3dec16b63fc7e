"""Fused decoder pieces for the local (no transformer-engine / apex) layer spec: fewer kernels, less Python.

    spec = decoder_block_spec(decoder_config, "local", num_layers, fused=True)   # what QwenVLBuildOptions picks

Megatron-Core's local path is exact but slow on the host for a GPU that is faster than its Python: per layer it
recomputes the M-RoPE cos/sin for q and again for k and rotates with chunk + neg + cat (plus a cat of an empty
pass-through part), wraps every TP=1 linear in identity autograd functions (copy / reduce / matmul-with-grad-
accumulation, each with a Python backward), and runs SwiGLU as chunk, silu, an `add` of a zero `glu_linear_offset`
and mul, storing the SiLU output for backward. Here:

- `FusedRopeSelfAttention`: rotary applied to q and k in one autograd function, from cos/sin computed once per
  forward and shared by all layers (`RopeCosSinCache`, keyed on the frequency tensor Megatron hands every layer);
- `FusedSwiGLUMLP`: SiLU(gate) * up in one autograd function that saves only its input;
- `FusedRMSNorm`: the same fp32 RMSNorm (Qwen2's cast-then-scale order) as one autograd function with a hand
  backward, keeping only its input (the unfused one keeps an fp32 copy of it, the normalised tensor and more);
- `PlainColumnLinear` / `PlainRowLinear`: at TP=1 a plain `F.linear` (the same parameters and attributes, so
  loading, checkpoints and the optimizer see Megatron's layers unchanged); at TP>1 Megatron's forward.

The element-wise bodies are plain torch. On CUDA with Triton importable they run through `torch.compile` (one
kernel each); elsewhere, or if compiling fails, the same functions run eagerly, so the CPU tests check the very
code the GPU compiles. The eager bodies repeat Megatron's operations in its order, so in fp32 the fused model
matches the unfused one to rounding (tests/models/test_fused_decoder.py).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.mlp import MLP
from torch import Tensor

from lmmrl_megatron.maybe_compiled import MaybeCompiled
from lmmrl_megatron.models.qwen_vl.spec import RMSNorm

# ---------------------------------------------------------------------------------------------- rotary


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = torch.chunk(x, 2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rotate_half_transposed(y: Tensor) -> Tensor:
    """The adjoint of `_rotate_half` ([-x2, x1] -> [y2, -y1]): what its backward applies to the gradient."""
    y1, y2 = torch.chunk(y, 2, dim=-1)
    return torch.cat((y2, -y1), dim=-1)


def _rope_forward(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    # Megatron's `_apply_rotary_pos_emb_bshd` order: (t * cos) + (rotate_half(t) * sin)
    return (q * cos) + (_rotate_half(q) * sin), (k * cos) + (_rotate_half(k) * sin)


def _rope_backward(grad_q: Tensor, grad_k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    return (
        grad_q * cos + _rotate_half_transposed(grad_q * sin),
        grad_k * cos + _rotate_half_transposed(grad_k * sin),
    )


_rope_forward_kernel = MaybeCompiled(_rope_forward)
_rope_backward_kernel = MaybeCompiled(_rope_backward)


class _FusedRope(torch.autograd.Function):
    """Rotary of q and k together; saves only cos/sin (the inputs are not needed for the gradient)."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        ctx.save_for_backward(cos, sin)
        return _rope_forward_kernel(q, k, cos, sin)

    @staticmethod
    def backward(ctx, grad_q: Tensor, grad_k: Tensor):
        cos, sin = ctx.saved_tensors
        dq, dk = _rope_backward_kernel(grad_q, grad_k, cos, sin)
        return dq, dk, None, None


def apply_fused_rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """q [s, b, heads, d], k [s, b, kv_heads, d], cos/sin [s, b, 1, d] in q's dtype."""
    return _FusedRope.apply(q, k, cos, sin)


class RopeCosSinCache:
    """cos/sin of the last frequency tensor seen, per dtype: computed by the first layer, reused by the others.

    Every decoder layer of one forward receives the same `rotary_pos_emb` tensor object from `GPTModel`; keying on
    its identity (a strong reference is held, so the id cannot be reused) is exact. A different tensor (the next
    micro-batch, a recomputed forward) just computes again.
    """

    def __init__(self) -> None:
        self._freqs: Tensor | None = None
        self._tables: dict[torch.dtype, tuple[Tensor, Tensor]] = {}

    def clear(self) -> None:
        """Forget the tables: the next layer computes them again (a CUDA graph capture must record that)."""
        self._freqs, self._tables = None, {}

    def get(self, freqs: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        if freqs is not self._freqs:
            self._freqs, self._tables = freqs, {}
        tables = self._tables.get(dtype)
        if tables is None:
            # Megatron: (cos(freqs) * mscale).to(t.dtype) with mscale 1 (checked by the caller)
            tables = (torch.cos(freqs).to(dtype), torch.sin(freqs).to(dtype))
            self._tables[dtype] = tables
        return tables


_ROPE_CACHE = RopeCosSinCache()


def clear_rope_cache() -> None:
    """Make the next decoder forward compute its rotary tables (see `RopeCosSinCache.clear`)."""
    _ROPE_CACHE.clear()


class FusedRopeSelfAttention(SelfAttention):
    """Megatron's `SelfAttention` with rotary applied by `apply_fused_rope` right after the q/k/v split.

    Megatron's own rotary is skipped by handing its forward `rotary_pos_emb=None`; the frequencies are held for
    the duration of that one call (so full recompute, which re-runs the layer with its arguments, sees them again;
    selective recompute checkpoints only the core attention, after the rotary). Cases the fused path does not
    cover (packed 'thd', inference contexts, interleaved / MLA / YaRN rotary, a separate q/k embedding) go to
    Megatron's forward unchanged.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pending_freqs: Tensor | None = None
        mscale = self._yarn_concentration_factor
        self._fusable_config = (
            not self.config.rotary_interleaved
            and not self.config.multi_latent_attention
            and not self.config.attention_output_gate
            and (mscale is None or mscale == 1.0)
        )

    def _fusable(self, rotary_pos_emb: Any, packed_seq_params: Any, kwargs: dict[str, Any]) -> bool:
        return (
            self._fusable_config
            and isinstance(rotary_pos_emb, Tensor)
            and (packed_seq_params is None or packed_seq_params.qkv_format != "thd")
            and kwargs.get("inference_context") is None
            and kwargs.get("inference_params") is None
            and kwargs.get("key_value_states") is None
            and rotary_pos_emb.size(-1) == self.config.kv_channels
        )

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None, *args: Any,
                rotary_pos_emb: Any = None, packed_seq_params: Any = None, **kwargs: Any):
        if args or not self._fusable(rotary_pos_emb, packed_seq_params, kwargs):
            return super().forward(hidden_states, attention_mask, *args, rotary_pos_emb=rotary_pos_emb,
                                   packed_seq_params=packed_seq_params, **kwargs)
        self._pending_freqs = rotary_pos_emb
        try:
            return super().forward(hidden_states, attention_mask, rotary_pos_emb=None,
                                   packed_seq_params=packed_seq_params, **kwargs)
        finally:
            self._pending_freqs = None

    def get_query_key_value_tensors(self, hidden_states: Tensor, key_value_states: Tensor | None = None,
                                    output_gate: bool = False, split_qkv: bool = True):
        out = super().get_query_key_value_tensors(hidden_states, key_value_states, output_gate, split_qkv)
        freqs = self._pending_freqs
        if freqs is None:
            return out
        assert split_qkv and not output_gate and len(out) == 3, "fused rotary expects a plain q/k/v split"
        query, key, value = out
        cos, sin = _ROPE_CACHE.get(freqs, query.dtype)
        query, key = apply_fused_rope(query, key, cos, sin)
        return query, key, value


# ---------------------------------------------------------------------------------------------- SwiGLU


def _swiglu_forward(x: Tensor) -> Tensor:
    gate, up = torch.chunk(x, 2, dim=-1)
    return F.silu(gate) * up


def _swiglu_backward(grad: Tensor, x: Tensor) -> Tensor:
    # What autograd computes for silu(gate) * up: d_up = grad * silu(gate), d_gate = silu'(gate) * (grad * up)
    gate, up = torch.chunk(x, 2, dim=-1)
    return torch.cat((torch.ops.aten.silu_backward(grad * up, gate), grad * F.silu(gate)), dim=-1)


_swiglu_forward_kernel = MaybeCompiled(_swiglu_forward)
_swiglu_backward_kernel = MaybeCompiled(_swiglu_backward)


class _FusedSwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return _swiglu_forward_kernel(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return _swiglu_backward_kernel(grad, x)


def fused_swiglu(x: Tensor) -> Tensor:
    """SiLU(first half) * second half of the last dim, one autograd node that keeps only `x` for backward."""
    return _FusedSwiGLU.apply(x)


class FusedSwiGLUMLP(MLP):
    """Megatron's `MLP` with the gated SiLU in `fused_swiglu`; other activations go to Megatron's forward."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        config = self.config
        self._fused = (
            config.gated_linear_unit
            and config.activation_func is F.silu
            and not config.use_te_activation_func
            and not config.bias_activation_fusion
            and config.activation_func_clamp_value is None
            and config.glu_linear_offset == 0.0  # Megatron adds it to the linear half even when it is zero
        )

    def forward(self, hidden_states: Tensor, per_token_scale: Tensor | None = None, **kwargs: Any):
        if not self._fused or per_token_scale is not None:
            return super().forward(hidden_states, per_token_scale, **kwargs)
        intermediate, bias = self.linear_fc1(hidden_states)
        if bias is not None:
            intermediate = intermediate + bias
        return self.linear_fc2(fused_swiglu(intermediate))


# ---------------------------------------------------------------------------------------------- TP=1 linears


def _plain_at_tp1(layer: ColumnParallelLinear | RowParallelLinear) -> bool:
    """Whether Megatron's forward of this linear is exactly `F.linear` (+ bias handling): TP=1, no fusions."""
    config = layer.config
    group = getattr(layer, "tp_group", None)
    tp_size = group.size() if group is not None else config.tensor_model_parallel_size
    return (
        tp_size == 1
        and not layer.sequence_parallel
        and not layer.gradient_accumulation_fusion
        and not getattr(layer, "explicit_expert_comm", False)
        and not config.defer_embedding_wgrad_compute
        and not config.cpu_offloading
        and getattr(layer, "gtp_remat_size", 1) == 1
    )


class PlainColumnLinear(ColumnParallelLinear):
    """`ColumnParallelLinear` whose forward is `F.linear` at TP=1 (identity communication skipped)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._plain = _plain_at_tp1(self)

    def forward(self, input_: Tensor, weight: Tensor | None = None, runtime_gather_output: bool | None = None):
        if not self._plain or weight is not None or self.weight is None:
            return super().forward(input_, weight, runtime_gather_output)
        if self.skip_bias_add:
            return F.linear(input_, self.weight), self.bias
        return F.linear(input_, self.weight, self.bias), None


class PlainRowLinear(RowParallelLinear):
    """`RowParallelLinear` whose forward is `F.linear` at TP=1 (identity communication skipped)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._plain = _plain_at_tp1(self)

    def forward(self, input_: Tensor):
        if not self._plain:
            return super().forward(input_)
        if self.skip_bias_add:
            return F.linear(input_, self.weight), self.bias
        return F.linear(input_, self.weight, self.bias), None


# ---------------------------------------------------------------------------------------------- RMSNorm


def _rms_norm_forward(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    # spec.RMSNorm's operations in its order: normalise in fp32, cast back, then scale
    states = x.float()
    states = states * torch.rsqrt(states.pow(2).mean(-1, keepdim=True) + eps)
    return weight * states.to(x.dtype)


def _rms_norm_backward(grad: Tensor, x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    states = x.float()
    rstd = torch.rsqrt(states.pow(2).mean(-1, keepdim=True) + eps)
    normed = (states * rstd).to(x.dtype)
    grad_weight = (grad * normed).reshape(-1, grad.size(-1)).sum(0)
    grad_normed = (grad * weight).float()
    # d/dx of x * rstd(x): rstd * g - x * rstd^3 * mean(g * x)
    grad_x = rstd * grad_normed - states * (rstd.pow(3) * (grad_normed * states).mean(-1, keepdim=True))
    return grad_x.to(x.dtype), grad_weight.to(weight.dtype)


_rms_norm_forward_kernel = MaybeCompiled(_rms_norm_forward)
_rms_norm_backward_kernel = MaybeCompiled(_rms_norm_backward)


class _FusedRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.eps = eps
        return _rms_norm_forward_kernel(x, weight, eps)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        grad_x, grad_weight = _rms_norm_backward_kernel(grad.contiguous(), x, weight, ctx.eps)
        return grad_x, grad_weight, None


class FusedRMSNorm(RMSNorm):
    """`spec.RMSNorm` (same parameter and attributes) computed by one autograd function."""

    def forward(self, hidden_states: Tensor) -> Tensor:
        if hidden_states.dtype != self.weight.dtype:
            return super().forward(hidden_states)  # mixed dtypes: keep the reference's type promotion
        return _FusedRMSNorm.apply(hidden_states, self.weight, self.eps)

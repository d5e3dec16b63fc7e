"""CUDA graphs of a Megatron-Core decoder stack for training micro-batches: one replay instead of ~1,800 launches.

    graphs = DecoderGraphs.attach(gpt_model.decoder, max_graphs=4, bucket_tokens=256)   # QwenVLModel does this
    graphs.enabled = False          # every call eager again (benchmarks compare both on one model)

Why: on an H200 a 3B text-only step needs 145 ms of kernels but takes 173-240 ms, because the GPU waits on the
Python of Megatron-Core's layers between kernels (docs/benchmarks.md). Replaying a captured graph of the whole
decoder forward, and another of its backward, takes that Python out of the step.

What is graphed: `TransformerBlock.forward` for a training forward with autograd on, over a dense causal batch
(no attention mask, no packed sequences, no inference context): the learner's right-padded micro-batches. Each
shape gets its own pair of graphs from `torch.cuda.make_graphed_callables` (warm-up iterations, then forward and
backward captured) of `functional_forward`, the block run on fresh leaves aliasing its parameters (see
`_graph_for` for why); up to `max_graphs`; every other call runs the block eagerly, unchanged. The sequence is padded
up to a multiple of `bucket_tokens` first so that varying rollout lengths share graphs: with causal attention the
appended rows never reach the real ones, and their outputs are cut off again (their gradient is zero).

Memory: all graphs share one pool. That is safe because no two graphs' live tensors overlap in time: a graphed
forward is always followed by its own backward before the next graphed forward, which `_pending` enforces (a
forward while one is still waiting for its backward runs eagerly: pipeline schedules with several micro-batches
in flight, or a forward whose backward is never taken while its output is alive). What each graph keeps for good
is its static inputs and outputs and one gradient buffer per parameter (2 bytes a parameter in bf16): the planner
counts `max_graphs` of those.

Not graphed, by design: pipeline stages after the first (Megatron hands them their input through
`set_input_tensor`), full recompute (its point is not keeping activations, which a graph does), dropout and
sequence parallelism (both go through Megatron's RNG tracker, which is not graph-safe), fp8/fp4, CPU offloading.
A capture that fails (an op that synchronises with the host, a kernel that refuses capture) raises, naming the
shape: an aborted capture leaves the CUDA generator unusable, so there is no silent fallback.

Gradients: the replayed backward returns each parameter's gradient in a static buffer of its graph, which
autograd hands to the parameter. With Megatron's DDP (the learner) its hook adds that into the main-grad buffer at
once. A plain `.grad` that was None may take the buffer itself (autograd steals a gradient nobody else holds),
so the next replay would overwrite it: accumulating plain `.grad`s over several graphed micro-batches is not safe
(as with torch's own graphed callables); one graphed backward per `zero_grad(set_to_none=True)` is.
"""

from __future__ import annotations

import gc
import logging
import math
import weakref
from dataclasses import dataclass
from typing import Any, Callable

import torch
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.utils import make_viewless_tensor
from torch import Tensor

logger = logging.getLogger(__name__)

# Keyword arguments of TransformerBlock.forward that must be empty for a call to be graphed.
_MUST_BE_EMPTY = (
    "context", "context_mask", "rotary_pos_cos", "rotary_pos_sin", "rotary_pos_cos_sin", "attention_bias",
    "inference_context", "packed_seq_params", "sequence_len_offset", "padding_mask", "extract_layer_indices",
    "inference_params", "dynamic_inference_decode_only",
)


@dataclass(frozen=True)
class GraphKey:
    """What a captured graph is specialised to: the padded input shapes and dtypes, and the trained parameters."""

    hidden_shape: tuple[int, ...]  # [padded seq, batch, hidden]
    rotary_shape: tuple[int, ...]  # [padded seq, batch, 1, head_dim]
    dtype: torch.dtype
    rotary_dtype: torch.dtype
    num_trained_params: int  # freezing a parameter after a capture needs another graph (it is a graph input)


def block_refuses_graphs(block: TransformerBlock) -> str:
    """Why this block's configuration can never be graphed ('' when it can)."""
    config = block.config
    if not block.pre_process:
        return "a later pipeline stage (its input comes through set_input_tensor)"
    if config.recompute_granularity == "full":
        return "full recompute"
    if config.hidden_dropout or config.attention_dropout:
        return f"dropout (hidden {config.hidden_dropout}, attention {config.attention_dropout})"
    if config.fp8 or config.fp4:
        return "fp8 / fp4"
    if config.cpu_offloading:
        return "cpu_offloading"
    if config.sequence_parallel:
        return "sequence parallelism (the block forks Megatron's RNG tracker, which is not graph-safe)"
    return ""


class DecoderGraphs:
    """Per-shape CUDA graphs of one `TransformerBlock`'s training forward and backward (see the module docstring)."""

    def __init__(self, block: TransformerBlock, max_graphs: int, bucket_tokens: int,
                 before_forward: Callable[[], None] = lambda: None) -> None:
        if max_graphs < 1:
            raise ValueError(f"max_graphs must be >= 1, got {max_graphs}")
        if bucket_tokens < 1:
            raise ValueError(f"bucket_tokens must be >= 1, got {bucket_tokens}")
        self.block = block
        self.max_graphs = max_graphs
        self.bucket_tokens = bucket_tokens
        self.enabled = True
        self.refused = block_refuses_graphs(block)
        self._eager_forward = block.forward  # the class's forward, bound: what every eager call runs
        self._before_forward = before_forward  # e.g. dropping per-forward caches so a capture computes them
        self._graphs: dict[GraphKey, Callable[..., Tensor]] = {}
        self._in_capture = False  # functional_forward's own call of the block runs its eager forward
        self._failed: set[GraphKey] = set()
        self._pool: Any = None
        self._pending: weakref.ref[Tensor] | None = None  # the output of a graphed forward awaiting its backward
        self.num_replays = 0
        self.num_eager = 0

    @classmethod
    def attach(cls, block: TransformerBlock, max_graphs: int = 4, bucket_tokens: int = 256,
               before_forward: Callable[[], None] = lambda: None) -> "DecoderGraphs":
        """Route `block`'s forward through a new `DecoderGraphs` (its parameters and state dict are unchanged)."""
        graphs = cls(block, max_graphs, bucket_tokens, before_forward)
        block.forward = graphs.forward  # an instance attribute, as make_graphed_callables itself does for modules
        return graphs

    @property
    def num_graphs(self) -> int:
        return len(self._graphs)

    # ------------------------------------------------------------------------------------------ the call

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None, *args: Any, **kwargs: Any):
        if self._in_capture:
            return self._eager_forward(hidden_states, attention_mask, *args, **kwargs)
        graphed = None
        if not args and self.graphable(hidden_states, attention_mask, kwargs):
            rotary, params = kwargs["rotary_pos_emb"], self._trained_params()
            key = self._key(hidden_states, rotary, len(params))
            graphed = self._graph_for(key, hidden_states, rotary, params)
        if graphed is None:
            self.num_eager += 1
            return self._eager_forward(hidden_states, attention_mask, *args, **kwargs)
        seq = hidden_states.size(0)
        out = graphed(_pad_rows(hidden_states, key.hidden_shape[0]), _pad_rows(rotary, key.rotary_shape[0]), *params)
        self.num_replays += 1
        if seq != key.hidden_shape[0]:
            out = make_viewless_tensor(out[:seq], requires_grad=True, keep_graph=True)
        self._await_backward(out)
        return out

    def graphable(self, hidden_states: Tensor, attention_mask: Tensor | None, kwargs: dict[str, Any]) -> bool:
        """Whether this call (the block's keyword arguments besides the two named) can replay a graph."""
        rotary = kwargs.get("rotary_pos_emb")
        return (
            self.enabled
            and not self.refused
            and hidden_states.is_cuda
            and hidden_states.requires_grad
            and self.block.training
            and torch.is_grad_enabled()
            and attention_mask is None
            and isinstance(rotary, Tensor)
            and rotary.size(0) == hidden_states.size(0)
            and all(_is_empty(kwargs.get(name)) for name in _MUST_BE_EMPTY)
            and not set(kwargs) - set(_MUST_BE_EMPTY) - {"rotary_pos_emb"}
            and not self._backward_pending()
        )

    def _key(self, hidden_states: Tensor, rotary: Tensor, num_trained_params: int) -> GraphKey:
        padded = self.padded_length(hidden_states.size(0))
        return GraphKey((padded, *hidden_states.shape[1:]), (padded, *rotary.shape[1:]), hidden_states.dtype,
                        rotary.dtype, num_trained_params)

    def padded_length(self, seq: int) -> int:
        return math.ceil(seq / self.bucket_tokens) * self.bucket_tokens

    # ------------------------------------------------------------------------------------------ bookkeeping

    def _backward_pending(self) -> bool:
        return self._pending is not None and self._pending() is not None

    def _await_backward(self, out: Tensor) -> None:
        """Mark a graphed forward in flight until the gradient of its output arrives (or the output is freed)."""
        self._pending = weakref.ref(out)

        def backward_starts(grad: Tensor) -> None:
            self._pending = None

        out.register_hook(backward_starts)

    def functional_forward(self, hidden_states: Tensor, rotary_pos_emb: Tensor, *params: Tensor) -> Tensor:
        """The block's eager forward with `params` in place of its trained parameters (in `named_parameters`
        order): what a capture records. Gradients go to `params`, not to the block's own parameters."""
        names = [name for name, _ in self._trained_named_params()]
        assert len(names) == len(params), f"{len(params)} tensors for {len(names)} trained parameters"
        self._before_forward()
        outer, self._in_capture = self._in_capture, True
        try:
            return torch.func.functional_call(self.block, dict(zip(names, params)), (),
                                              dict(hidden_states=hidden_states, attention_mask=None,
                                                   rotary_pos_emb=rotary_pos_emb))
        finally:
            self._in_capture = outer

    def _trained_params(self) -> tuple[Tensor, ...]:
        return tuple(p for _, p in self._trained_named_params())

    def _trained_named_params(self) -> list[tuple[str, Tensor]]:
        return [(name, p) for name, p in self.block.named_parameters() if p.requires_grad]

    def _graph_for(self, key: GraphKey, hidden_states: Tensor, rotary: Tensor,
                   params: tuple[Tensor, ...]) -> Callable[..., Tensor] | None:
        graphed = self._graphs.get(key)
        if graphed is not None or key in self._failed or len(self._graphs) >= self.max_graphs:
            return graphed
        # Sample inputs of the captured shapes, with row-major strides whatever the caller's layout (compiled
        # bodies guard on strides, even of size-1 dims); their values only feed the warm-up iterations.
        sample_hidden = _canonical(_pad_rows(hidden_states.detach(), key.hidden_shape[0])).requires_grad_(True)
        sample_rotary = _canonical(_pad_rows(rotary.detach(), key.rotary_shape[0]))
        # The capture runs on fresh leaves aliasing the parameters (same storage, so a replay reads the weights as
        # they are then). Autograd keeps each leaf's AccumulateGrad node, with the stream it was made on, for as long
        # as any graph references it: a caller still holding an earlier step's output keeps the parameters' nodes,
        # made on the default stream, and a backward captured into them would make the legacy stream wait on the
        # capture ("operation would make the legacy stream depend on a capturing blocking stream": bench/
        # model_step.py on the H200). The real parameters are the graphed function's inputs instead, so their
        # gradients reach them (and Megatron's DDP hooks) through autograd as usual.
        leaves = tuple(p.detach().requires_grad_(True) for p in params)

        # Defensive, as torch.cuda.graph itself once did: garbage is collected now rather than during the capture
        # (a finaliser must not run CUDA work then), and the default stream's cached blocks are handed back (the
        # warm-up's side stream and the capture's private pool cannot reuse them).
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        collecting = gc.isenabled()
        gc.disable()
        try:
            graphed = torch.cuda.make_graphed_callables(self.functional_forward, (sample_hidden, sample_rotary, *leaves),
                                                        num_warmup_iters=2, pool=self._pool)
        except Exception as exc:
            # An aborted capture leaves the CUDA generator and the pool in a state later work trips over, so this
            # is not papered over with an eager fallback.
            self._failed.add(key)
            raise RuntimeError(
                f"CUDA graph capture of the decoder for {key} failed: {exc}. Build the model with "
                "cuda_graphs=False (config: model.cuda_graphs=false) to run it eagerly."
            ) from exc
        finally:
            if collecting:
                gc.enable()
        logger.info("captured CUDA graphs of the decoder for %s (%d of at most %d)", key, len(self._graphs) + 1,
                    self.max_graphs)
        self._graphs[key] = graphed
        return graphed


def _is_empty(value: Any) -> bool:
    """None, False or an empty container: an argument that asks for nothing (a tensor never is)."""
    return value is None or value is False or (isinstance(value, (set, list, tuple, dict)) and not value)


def _pad_rows(x: Tensor, rows: int) -> Tensor:
    """`x` with zero rows appended along dim 0 up to `rows` (itself when it has that many)."""
    if x.size(0) == rows:
        return x
    return torch.cat((x, x.new_zeros(rows - x.size(0), *x.shape[1:])))


def _canonical(x: Tensor) -> Tensor:
    """A copy of `x` with row-major strides (`clone` would keep a transposed layout's strides)."""
    return torch.empty(x.shape, dtype=x.dtype, device=x.device).copy_(x)

"""Per-token log-probs and entropy from vocabulary-parallel logits, without gathering the vocabulary.

Each tensor-parallel rank holds the logits of a contiguous slice of the padded vocabulary. The log-partition
function needs a max and a sum of exponentials over the whole vocabulary, so both are all-reduced over the TP
group; the label's logit lives on one rank and is all-reduced with the sum.

Masked columns get no probability: the padding rows (added so the output layer splits evenly over TP; their
logits are whatever those rows give) and tokens the rollout engines never sample (so that these log-probs are
those of the distribution the engines sample from). They are set to `MASKED_LOGIT` (-1e30) after the temperature,
in fp32: exp() of it underflows to exactly 0, so they change no log-prob and get no gradient; unlike -inf,
0 * -1e30 is 0, so the entropy's sum of p * log p needs no guard against NaN.

    log_probs, entropy = vocab_parallel_log_probs(logits, labels, vocab_size, tp_group, with_entropy=True)
    full = gather_vocab_parallel_logits(logits, vocab_size, tp_group)   # [..., vocab_size] on every rank

`tp_group=None` (or a group of one) means the logits hold the whole padded vocabulary.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup

from lmmrl_megatron.maybe_compiled import MaybeCompiled

MASKED_LOGIT = -1e30

# Rows per piece of the log-prob kernels: bounds the fp32 temporaries of the eager bodies (CPU, or a GPU without
# Triton) to a few x 2**25 elements, whatever the micro-batch; the compiled bodies never materialise them.
_PIECE_ELEMENTS = 2**25


def _shard_stats(x: Tensor, masked: Tensor | None, index: Tensor, in_shard: Tensor, temperature: float,
                 with_entropy: bool) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
    """Per row of this shard, z = x / temperature in fp32 (masked columns at MASKED_LOGIT): max m,
    sum exp(z - m), sum exp(z - m) (z - m) (with entropy), and z at the label (0 where the label is elsewhere)."""
    z = x.float() / temperature
    if masked is not None:
        z = z.masked_fill(masked, MASKED_LOGIT)
    row_max = z.amax(dim=-1)
    shifted = z - row_max.unsqueeze(-1)
    exp = shifted.exp()
    sum_exp = exp.sum(dim=-1)
    # masked columns: exp is exactly 0, so 0 * (-1e30) adds nothing
    weighted = (exp * shifted).sum(dim=-1) if with_entropy else None
    label_logit = z.gather(-1, index).squeeze(-1).masked_fill(~in_shard, 0.0)
    return row_max, sum_exp, weighted, label_logit


def _shard_grad(x: Tensor, masked: Tensor | None, index: Tensor, in_shard: Tensor, log_z: Tensor,
                entropy: Tensor | None, grad_log_probs: Tensor | None, grad_entropy: Tensor | None,
                temperature: float) -> Tensor:
    """d loss / d x for this shard, in x's dtype: d log p(label)/dz_j = 1[j = label] - p_j,
    d H/dz_j = -p_j (log p_j + H), both divided by the temperature."""
    z = x.float() / temperature
    if masked is not None:
        z = z.masked_fill(masked, MASKED_LOGIT)
    log_p = z - log_z.unsqueeze(-1)
    probs = log_p.exp()
    grad = torch.zeros_like(z)
    if grad_entropy is not None:
        # p (log p + H) before the scale: at masked columns p = 0 times a finite log p, so no inf * 0
        grad = grad - probs * (log_p + entropy.unsqueeze(-1)) * grad_entropy.unsqueeze(-1)
    if grad_log_probs is not None:
        columns = torch.arange(z.shape[-1], device=z.device)
        is_label = (columns == index) & in_shard.unsqueeze(-1)
        grad = grad + (is_label.to(z.dtype) - probs) * grad_log_probs.unsqueeze(-1)
    return (grad / temperature).to(x.dtype)


_shard_stats_kernel = MaybeCompiled(_shard_stats)
_shard_grad_kernel = MaybeCompiled(_shard_grad)


class _VocabParallelLogProbs(torch.autograd.Function):
    """log p(label) and entropy for logits sharded on the last dim; exact gradients for both.

    Saves only the logits as they came (no fp32 copy) and per-row statistics; the backward recomputes the
    probabilities from them. On CUDA each pass is one fused kernel per piece of rows: the forward reads the
    logits once, the backward reads them once and writes the gradient in their dtype.
    """

    @staticmethod
    def forward(ctx, logits, labels, vocab_start, masked, group, temperature, with_entropy):
        ctx.set_materialize_grads(False)
        columns = logits.shape[-1]
        x = logits.reshape(-1, columns)
        local_labels = labels.reshape(-1) - vocab_start  # labels < 0 (ignored) fall outside every shard
        in_shard = (local_labels >= 0) & (local_labels < columns)
        index = local_labels.clamp(0, columns - 1).unsqueeze(-1)
        pieces = [
            _shard_stats_kernel(x[rows], masked, index[rows], in_shard[rows], temperature, with_entropy)
            for rows in _row_pieces(x, _shard_stats_kernel)
        ]
        row_max, sum_exp, weighted, label_logit = (
            torch.cat(parts) if parts[0] is not None else None for parts in zip(*pieces)
        )
        if group is not None:  # rescale each shard's sums to the global max before adding them up
            global_max = row_max.clone()
            dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
            scale = (row_max - global_max).exp()
            if with_entropy:  # sum e^(z - M) (z - M) = e^(m - M) (sum e^(z - m) (z - m) + (m - M) sum e^(z - m))
                weighted = (weighted + (row_max - global_max) * sum_exp) * scale
            sum_exp = sum_exp * scale
            row_max = global_max
            stacked = torch.stack([sum_exp, label_logit] + ([weighted] if with_entropy else []))
            dist.all_reduce(stacked, group=group)
            sum_exp, label_logit = stacked[0], stacked[1]
            weighted = stacked[2] if with_entropy else None
        log_sum = sum_exp.log()
        log_probs = (label_logit - row_max) - log_sum
        entropy = log_sum - weighted / sum_exp if with_entropy else None
        log_z = row_max + log_sum
        ctx.temperature = temperature
        ctx.masked = masked
        ctx.save_for_backward(logits, index, in_shard, log_z, entropy)
        shape = labels.shape
        return log_probs.view(shape), entropy.view(shape) if with_entropy else None

    @staticmethod
    def backward(ctx, grad_log_probs, grad_entropy):
        logits, index, in_shard, log_z, entropy = ctx.saved_tensors
        x = logits.reshape(-1, logits.shape[-1])
        g_lp = grad_log_probs.reshape(-1) if grad_log_probs is not None else None
        g_h = grad_entropy.reshape(-1) if grad_entropy is not None else None
        pieces = [
            _shard_grad_kernel(
                x[rows], ctx.masked, index[rows], in_shard[rows], log_z[rows],
                entropy[rows] if g_h is not None else None,
                g_lp[rows] if g_lp is not None else None, g_h[rows] if g_h is not None else None, ctx.temperature,
            )
            for rows in _row_pieces(x, _shard_grad_kernel)
        ]
        grad = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        return grad.view_as(logits), None, None, None, None, None, None


def _row_pieces(x: Tensor, kernel: MaybeCompiled) -> list[slice]:
    """Row ranges to run `kernel` on: all rows at once when it is compiled (its temporaries stay in registers),
    pieces of about _PIECE_ELEMENTS elements when it runs eagerly."""
    num_rows, columns = x.shape
    step = num_rows if kernel.compiles_for(x) else max(1, _PIECE_ELEMENTS // max(1, columns))
    return [slice(start, min(start + step, num_rows)) for start in range(0, max(num_rows, 1), max(step, 1))]


def _tp_rank_and_group(tp_group: ProcessGroup | None) -> tuple[int, ProcessGroup | None]:
    """This rank in the TP group, and the group to all-reduce over (None when it has one rank)."""
    if tp_group is None or dist.get_world_size(tp_group) == 1:
        return 0, None
    return dist.get_rank(tp_group), tp_group


def _masked_columns(
    columns: int, vocab_start: int, vocab_size: int, excluded_token_ids: tuple[int, ...], device: torch.device
) -> Tensor | None:
    """Which of this shard's columns get no probability (padding, excluded tokens); None when none does.

    Decided on the host, so that a shard with nothing to mask costs no device sync."""
    vocab_end = vocab_start + columns
    excluded = [token - vocab_start for token in excluded_token_ids if vocab_start <= token < vocab_end]
    if vocab_end <= vocab_size and not excluded:
        return None
    masked = torch.arange(vocab_start, vocab_end, device=device) >= vocab_size
    masked[excluded] = True
    return masked


def vocab_parallel_log_probs(
    logits: Tensor,
    labels: Tensor,
    vocab_size: int,
    tp_group: ProcessGroup | None = None,
    temperature: float = 1.0,
    excluded_token_ids: tuple[int, ...] = (),
    with_entropy: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """(log p(label), entropy or None) of `softmax(logits / temperature)`, fp32, both shaped like `labels`.

    `logits` is [..., padded_vocab / tp], this rank's slice of the vocabulary; columns at or past `vocab_size`
    and `excluded_token_ids` get no probability. Labels < 0 (ignore index) give log-prob 0. The entropy (with
    `with_entropy`) is that of the whole masked distribution. Both have exact gradients. `logits` are never
    modified, and are what the backward keeps (no fp32 copy of them is saved).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    tp_rank, group = _tp_rank_and_group(tp_group)
    vocab_start = tp_rank * logits.shape[-1]
    masked = _masked_columns(logits.shape[-1], vocab_start, vocab_size, excluded_token_ids, logits.device)
    log_probs, entropy = _VocabParallelLogProbs.apply(
        logits, labels, vocab_start, masked, group, temperature, with_entropy
    )
    return log_probs.masked_fill(labels < 0, 0.0), entropy


def gather_vocab_parallel_logits(logits: Tensor, vocab_size: int, tp_group: ProcessGroup | None = None) -> Tensor:
    """All TP ranks' vocab slices concatenated, padding columns dropped: [..., vocab_size] (no autograd)."""
    _, group = _tp_rank_and_group(tp_group)
    if group is None:
        return logits[..., :vocab_size]
    parts = [torch.empty_like(logits) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, logits.contiguous(), group=group)
    return torch.cat(parts, dim=-1)[..., :vocab_size]

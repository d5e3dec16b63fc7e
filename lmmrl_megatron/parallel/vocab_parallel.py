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

MASKED_LOGIT = -1e30


class _VocabParallelLogProbs(torch.autograd.Function):
    """log p(label) and entropy for fp32 logits sharded on the last dim; exact gradients for both.

    Memory-light like Megatron's vocab-parallel cross entropy: one fp32 working copy of the logits (or the
    caller's fp32 logits themselves) is shifted, turned into log p in place and saved; the backward overwrites it
    with the gradient, so the graph can be run backward once.
    """

    @staticmethod
    def forward(ctx, logits, labels, vocab_start, masked, group, temperature, with_entropy, keep_logits):
        ctx.set_materialize_grads(False)
        shifted = _fp32_working_copy(logits, keep_logits)
        if temperature != 1.0:
            shifted.div_(temperature)
        if masked is not None:
            shifted.masked_fill_(masked, MASKED_LOGIT)
        logits_max = shifted.max(dim=-1).values
        if group is not None:
            dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
        shifted.sub_(logits_max.unsqueeze(-1))
        columns = shifted.shape[-1]
        local_labels = labels - vocab_start  # labels < 0 (ignored) fall outside every shard
        in_shard = (local_labels >= 0) & (local_labels < columns)
        index = local_labels.clamp(0, columns - 1).unsqueeze(-1)
        label_logit = shifted.gather(-1, index).squeeze(-1).masked_fill(~in_shard, 0.0)
        exp = shifted.exp()
        sums = [exp.sum(dim=-1)]
        if with_entropy:  # sum exp * shifted-logit, for the entropy H = log Z - E_p[shifted logit]
            sums.append(exp.mul_(shifted).sum(dim=-1))
        del exp
        stacked = torch.stack([*sums, label_logit])
        if group is not None:
            dist.all_reduce(stacked, group=group)
        sum_exp, label_logit = stacked[0], stacked[-1]
        log_z = sum_exp.log()
        log_probs = label_logit - log_z
        entropy = log_z - stacked[1] / sum_exp if with_entropy else None
        log_p = shifted.sub_(log_z.unsqueeze(-1))
        ctx.temperature = temperature
        ctx.save_for_backward(log_p, index, in_shard, entropy)
        return log_probs, entropy

    @staticmethod
    def backward(ctx, grad_log_probs, grad_entropy):
        log_p, index, in_shard, entropy = ctx.saved_tensors
        # d log p(label) / d z_j = 1[j = label] - p_j ;  d H / d z_j = -p_j (log p_j + H)
        if grad_entropy is None:
            assert grad_log_probs is not None  # autograd calls backward only when an output has a gradient
            grad = log_p.exp_().mul_(-grad_log_probs.unsqueeze(-1))  # -p g, in the saved buffer
        else:
            probs = log_p.exp()
            # p (log p + H) before the scale: at masked columns p = 0 times a finite log p, so no inf * 0
            grad = log_p.add_(entropy.unsqueeze(-1)).mul_(probs).mul_(grad_entropy.unsqueeze(-1))
            if grad_log_probs is not None:
                grad.addcmul_(probs, grad_log_probs.unsqueeze(-1))
            del probs
            grad.neg_()
        if grad_log_probs is not None:
            grad.scatter_add_(-1, index, (grad_log_probs * in_shard).unsqueeze(-1))
        if ctx.temperature != 1.0:
            grad.div_(ctx.temperature)
        return grad, None, None, None, None, None, None, None


def _fp32_working_copy(logits: Tensor, keep_logits: bool) -> Tensor:
    """fp32 logits the forward may overwrite: a copy, or the caller's own fp32 tensor when it is not kept."""
    if logits.dtype != torch.float32:
        return logits.float()
    return logits.clone() if keep_logits else logits.detach()


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
    keep_logits: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """(log p(label), entropy or None) of `softmax(logits / temperature)`, fp32, both shaped like `labels`.

    `logits` is [..., padded_vocab / tp], this rank's slice of the vocabulary; columns at or past `vocab_size`
    and `excluded_token_ids` get no probability. Labels < 0 (ignore index) give log-prob 0. The entropy (with
    `with_entropy`) is that of the whole masked distribution. Both have exact gradients. fp32 `logits` are
    overwritten when `keep_logits=False` (saves a copy; the caller must not read them afterwards).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    tp_rank, group = _tp_rank_and_group(tp_group)
    vocab_start = tp_rank * logits.shape[-1]
    masked = _masked_columns(logits.shape[-1], vocab_start, vocab_size, excluded_token_ids, logits.device)
    log_probs, entropy = _VocabParallelLogProbs.apply(
        logits, labels, vocab_start, masked, group, temperature, with_entropy, keep_logits
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

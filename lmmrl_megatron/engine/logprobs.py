"""Per-token log-probs and entropy from vocabulary-parallel logits, without gathering the vocabulary.

Each tensor-parallel rank holds logits for a contiguous slice of the (padded) vocabulary. The log-partition
function needs a max and a sum of exponentials over the whole vocabulary, so both are all-reduced over the TP
group; the label's logit lives on one rank and is all-reduced too. Vocabulary padding (rows added so the table
splits evenly over TP) is masked to -inf: a padded row has logit 0, which would otherwise take probability mass.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


class _VocabParallelLogProbs(torch.autograd.Function):
    """log p(label) and entropy for logits sharded on the last dim; exact gradients for both."""

    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor, vocab_start: int, group: dist.ProcessGroup | None):
        logits = logits.float()
        local_max = logits.max(dim=-1).values
        global_max = local_max.clone()
        if group is not None:
            dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - global_max.unsqueeze(-1)
        exp = shifted.exp()
        sum_exp = exp.sum(dim=-1)
        # sum p * shifted-logit, for the entropy H = log Z - E_p[logit]
        sum_exp_logit = (exp * torch.where(exp > 0, shifted, torch.zeros_like(shifted))).sum(dim=-1)
        local_labels = labels - vocab_start
        in_shard = (local_labels >= 0) & (local_labels < logits.shape[-1])
        label_logit = shifted.gather(-1, local_labels.clamp(0, logits.shape[-1] - 1).unsqueeze(-1)).squeeze(-1)
        label_logit = torch.where(in_shard, label_logit, torch.zeros_like(label_logit))
        if group is not None:
            stacked = torch.stack([sum_exp, sum_exp_logit, label_logit])
            dist.all_reduce(stacked, group=group)
            sum_exp, sum_exp_logit, label_logit = stacked.unbind(0)
        log_z = sum_exp.log()
        logprobs = label_logit - log_z
        entropy = log_z - sum_exp_logit / sum_exp
        probs = exp / sum_exp.unsqueeze(-1)
        ctx.save_for_backward(probs, shifted, local_labels, in_shard, log_z, entropy)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs: Tensor, grad_entropy: Tensor):
        probs, shifted, local_labels, in_shard, log_z, entropy = ctx.saved_tensors
        # d logp / d z_j = 1[j = label] - p_j ;  d H / d z_j = -p_j * (log p_j + H)
        grad = -probs * grad_logprobs.unsqueeze(-1)
        one_hot = torch.zeros_like(probs).scatter_(-1, local_labels.clamp(0, probs.shape[-1] - 1).unsqueeze(-1), 1.0)
        grad = grad + one_hot * (in_shard.to(probs.dtype) * grad_logprobs).unsqueeze(-1)
        log_p = shifted - log_z.unsqueeze(-1)
        grad = grad - probs * (torch.where(probs > 0, log_p, torch.zeros_like(log_p)) + entropy.unsqueeze(-1)) * grad_entropy.unsqueeze(-1)
        return grad, None, None, None


def vocab_parallel_logprobs(
    logits: Tensor,
    labels: Tensor,
    num_real_vocab: int,
    tp_rank: int = 0,
    tp_group: dist.ProcessGroup | None = None,
    temperature: float = 1.0,
    excluded_token_ids: tuple[int, ...] = (),
) -> tuple[Tensor, Tensor]:
    """Return (log-prob of each label, entropy) of `logits / temperature`, both shaped like `labels`.

    `logits` is [..., vocab_shard] for this TP rank (shard `tp_rank` of the padded vocabulary); columns at or
    beyond `num_real_vocab` are padding and get no probability, nor do `excluded_token_ids` (tokens the rollout
    engines never sample, so that these log-probs are those of the distribution the engines sample from).
    """
    shard = logits.shape[-1]
    vocab_start = tp_rank * shard
    if temperature != 1.0:
        logits = logits / temperature
    global_col = vocab_start + torch.arange(shard, device=logits.device)
    excluded = global_col >= num_real_vocab
    if excluded_token_ids:
        excluded = excluded | torch.isin(global_col, torch.tensor(excluded_token_ids, device=logits.device))
    if bool(excluded.any()):
        logits = logits.masked_fill(excluded, float("-inf"))
    group = tp_group if tp_group is not None and dist.get_world_size(tp_group) > 1 else None
    return _VocabParallelLogProbs.apply(logits, labels, vocab_start, group)

"""The critic: the policy's architecture with its vocabulary projection replaced by a scalar value head.

The critic starts from the same Hugging Face checkpoint as the actor (as OpenRLHF and verl start it from the
policy or a reward model), so every layer loads through the shared mapping; on the last pipeline stage the output
layer is then swapped for `ValueHead`, which Megatron's GPT model calls exactly as it calls the output layer. The
head is replicated over tensor-parallel ranks: its input, the final-norm hidden states, is the same on all of them,
so its gradients are too.
"""

from __future__ import annotations

import torch
from torch import Tensor


class ValueHead(torch.nn.Module):
    """hidden [S, B, H] -> values [S, B, 1], with the (output, bias) return of Megatron's output layer.

    Its parameters are named `weight` and `bias` like the output layer it replaces: Megatron's checkpointing
    looks up `output_layer.weight` on the last stage.
    """

    def __init__(self, hidden_size: int, dtype: torch.dtype) -> None:
        super().__init__()
        # Zero-initialised: V = 0 everywhere at step 1, so the critic adds no spurious advantages.
        self.weight = torch.nn.Parameter(torch.zeros(1, hidden_size, dtype=dtype))
        self.bias = torch.nn.Parameter(torch.zeros(1, dtype=dtype))

    def forward(self, hidden_states: Tensor, weight: Tensor | None = None, runtime_gather_output: bool | None = None):
        return torch.nn.functional.linear(hidden_states, self.weight, self.bias), None


def attach_value_head(chunk: torch.nn.Module) -> None:
    """Turn a loaded Qwen-VL chunk into a critic chunk (only the last stage changes)."""
    language_model = chunk.language_model
    if not language_model.post_process:
        return
    if language_model.share_embeddings_and_output_weights and chunk.options.layout.pp > 1:
        raise ValueError("a critic of a tied-embedding model under pipeline parallelism is not supported; set parallel.pp=1")
    hidden = language_model.config.hidden_size
    head = ValueHead(hidden, language_model.config.params_dtype).to(next(chunk.parameters()).device)
    language_model.output_layer = head
    language_model.share_embeddings_and_output_weights = False

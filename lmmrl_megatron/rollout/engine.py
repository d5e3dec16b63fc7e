"""The rollout engine interface, shaped after vLLM's so a vLLM backend drops in beside the Hugging Face one.

An engine takes already-processed multimodal prompts (token ids plus the processor's pixel values and image grid,
so images are processed once per prompt and reused for training), samples `n` responses per prompt, and returns
each response's token ids with the log-prob of every sampled token. Log-probs are those of the tempered
distribution, `log_softmax(logits / temperature)`, before top-p/top-k truncation: the trainer computes the same
quantity, so the two agree up to numerics when their weights agree. Engines never sample the vision placeholder
tokens (`<|image_pad|>`, `<|video_pad|>`, `<|vision_start|>`, `<|vision_end|>`): in a response they would be
taken for image positions when the sequence is trained on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Literal, Protocol, Sequence

import torch


@dataclass
class MultimodalPrompt:
    """One prompt as the processor produced it."""

    prompt_ids: torch.Tensor  # [prompt_len] long
    pixel_values: torch.Tensor | None = None  # [num_patches, channels * temporal_patch * patch * patch]
    image_grid_thw: torch.Tensor | None = None  # [num_images, 3]
    # The decoded images (PIL) behind pixel_values: engines that run their own image processor (vLLM) take these.
    images: Sequence[Any] | None = None

    @classmethod
    def from_encoded(cls, encoded: Any) -> "MultimodalPrompt":
        """The engines' view of a `data.encode.EncodedPrompt`: its ids, processed images and the images."""
        return cls(encoded.input_ids, encoded.pixel_values, encoded.image_grid_thw, encoded.images)

    def __post_init__(self) -> None:
        assert self.prompt_ids.dim() == 1, "prompt_ids must be a 1-D tensor of token ids"
        assert (self.pixel_values is None) == (self.image_grid_thw is None), "pixel_values and image_grid_thw go together"


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = -1  # -1: off
    max_new_tokens: int = 256
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.n < 1 or self.max_new_tokens < 1:
            raise ValueError(f"n and max_new_tokens must be >= 1, got n={self.n}, max_new_tokens={self.max_new_tokens}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"bad sampling params: temperature={self.temperature}, top_p={self.top_p}")


@dataclass
class GenerationOutput:
    response_ids: torch.Tensor  # [response_len] long, ends with a stop token unless truncated
    logprobs: torch.Tensor  # [response_len] float32, log-prob of each sampled token
    finish_reason: Literal["stop", "length"]


class RolloutEngine(Protocol):
    """What the controller needs from a rollout engine (a vLLM LLM, or the Hugging Face engine)."""

    def generate(self, prompts: Sequence[MultimodalPrompt], params: SamplingParams) -> list[list[GenerationOutput]]:
        """`params.n` outputs for each prompt, in prompt order."""
        ...

    def begin_weight_update(self, manifest: list[str]) -> None:
        """Start a sync that will deliver exactly the tensors named in `manifest` (Hugging Face names)."""
        ...

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Load one bucket of (hf_name, tensor) pairs into the live model; return how many tensors were loaded."""
        ...

    def finish_weight_update(self) -> int:
        """End the sync: every manifest name arrived (else ValueError); caches built on the old weights dropped."""
        ...

    def sleep(self) -> None:
        """Free accelerator memory (weights and cache) while another role uses the GPUs."""
        ...

    def wake_up(self) -> None:
        """Take the memory back; must be called before the next generate or update_weights."""
        ...

    def wake_up_weights(self) -> None:
        """Take back the weights' memory only (for a sync); `wake_up_kv_cache` completes the wake-up."""
        ...

    def wake_up_kv_cache(self) -> None:
        ...

"""The `data` section of the run configuration: where prompts come from and how they become model inputs."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

BadInputPolicy = Literal["error", "skip"]
ImageCheck = Literal["none", "exists", "verify"]
MixStrategy = Literal["first_exhausted", "all_exhausted"]


@dataclass
class DataConfig:
    """Prompt data in LMM-R1's format (a stringified OpenAI-style `message` list and an `answer` per record).

    prompt_data: sources, each a `.jsonl`, `.json` or `.parquet` file, `json@DIR` / `parquet@DIR` (split files
        such as `DIR/train.jsonl`, `DIR/test.jsonl`), or a directory written by `datasets.save_to_disk`.
    prompt_data_probs: mixing probabilities, one per source, summing to 1; None: sources in proportion to their sizes.
    mix_strategy: `first_exhausted` (OpenRLHF's default) makes the pool as large as possible without repeating a
        record; `all_exhausted` uses every record, repeating the smaller sources to keep the proportions.
    split: which split `json@DIR`, `parquet@DIR` and `datasets` dicts are read from.
    max_samples: at most this many prompts in the mixed pool (None: as many as the mix allows).
    system_prompt: when set, a system turn put before each prompt's messages (replacing one already there).
    min_pixels / max_pixels: image resize bounds for the processor; None keeps the processor's own.
    max_prompt_length: prompts longer than this many tokens (image tokens included) are bad input; None: no limit.
    require_answer: an empty or missing answer is bad input (rule-based rewards need one).
    bad_input: `error` stops with file, line and reason; `skip` drops the record and counts it by reason.
    image_check: at load time check local images `exists` (cheap), `verify` them with PIL, or check `none`;
        images are decoded only when a prompt is encoded either way.
    image_timeout_s: timeout for fetching an `http(s)` image.
    seed / shuffle: the sampler's epoch order (and the choice of records when mixing).
    """

    prompt_data: list[str] = field(default_factory=list)
    prompt_data_probs: list[float] | None = None
    mix_strategy: MixStrategy = "first_exhausted"
    split: str = "train"
    input_key: str = "message"
    label_key: str = "answer"
    max_samples: int | None = None
    system_prompt: str | None = None
    min_pixels: int | None = None
    max_pixels: int | None = None
    max_prompt_length: int | None = None
    require_answer: bool = True
    bad_input: BadInputPolicy = "error"
    image_check: ImageCheck = "exists"
    image_timeout_s: float = 10.0
    seed: int = 42
    shuffle: bool = True

    def __post_init__(self) -> None:
        for index, source in enumerate(self.prompt_data):
            if not source.strip():
                raise ValueError(f"data.prompt_data[{index}] is empty")
        if self.prompt_data_probs is not None:
            self._check_probs(self.prompt_data_probs)
        if self.mix_strategy not in ("first_exhausted", "all_exhausted"):
            raise ValueError(
                f"data.mix_strategy must be 'first_exhausted' or 'all_exhausted', got {self.mix_strategy!r}"
            )
        if not self.input_key:
            raise ValueError("data.input_key must not be empty")
        if not self.label_key:
            raise ValueError("data.label_key must not be empty")
        if not self.split:
            raise ValueError("data.split must not be empty")
        if self.max_samples is not None and self.max_samples < 1:
            raise ValueError(f"data.max_samples must be >= 1 or null, got {self.max_samples}")
        for name in ("min_pixels", "max_pixels", "max_prompt_length"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"data.{name} must be >= 1 or null, got {value}")
        if self.min_pixels is not None and self.max_pixels is not None and self.min_pixels > self.max_pixels:
            raise ValueError(f"data.min_pixels ({self.min_pixels}) must be <= data.max_pixels ({self.max_pixels})")
        if self.bad_input not in ("error", "skip"):
            raise ValueError(f"data.bad_input must be 'error' or 'skip', got {self.bad_input!r}")
        if self.image_check not in ("none", "exists", "verify"):
            raise ValueError(f"data.image_check must be 'none', 'exists' or 'verify', got {self.image_check!r}")
        if not self.image_timeout_s > 0:
            raise ValueError(f"data.image_timeout_s must be > 0, got {self.image_timeout_s}")

    def _check_probs(self, probs: list[float]) -> None:
        if len(probs) != len(self.prompt_data):
            raise ValueError(
                f"data.prompt_data_probs has {len(probs)} entries but data.prompt_data has {len(self.prompt_data)}"
            )
        for index, prob in enumerate(probs):
            if not (math.isfinite(prob) and prob > 0):
                raise ValueError(f"data.prompt_data_probs[{index}] must be a positive number, got {prob}")
        # A sum far from 1 is almost always a typo (0.3, 0.6), so it is an error rather than silently renormalised.
        if abs(sum(probs) - 1.0) > 1e-3:
            raise ValueError(f"data.prompt_data_probs must sum to 1, got {sum(probs)} from {probs}")

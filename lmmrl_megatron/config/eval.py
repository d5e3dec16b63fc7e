"""The `eval` section of the run configuration: test sets, when to evaluate, and how to sample and score."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from lmmrl_megatron.reward.config import RewardConfig, RewardFunctionConfig

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclass
class EvalSetConfig:
    """One test set in LMM-R1's format, read like `data.prompt_data` (same keys, image bounds, bad-input policy).

    name: the metric prefix, `eval/<name>/accuracy`; letters, digits, `_`, `-`, `.`.
    data: one source as `data.prompt_data` takes it: a `.jsonl` / `.json` / `.parquet` file, `json@DIR` /
        `parquet@DIR`, or a `datasets` folder.
    split: the split `json@DIR`, `parquet@DIR` and `datasets` dicts are read from.
    max_samples: evaluate at most the first this many prompts (None: all).
    """

    name: str = ""
    data: str = ""
    split: str = "test"
    max_samples: int | None = None

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.name):
            raise ValueError(f"eval set name {self.name!r} must be letters, digits, '_', '-' or '.' (it names metrics)")
        if not self.data.strip():
            raise ValueError(f"eval set {self.name!r} has no data")
        if not self.split:
            raise ValueError(f"eval set {self.name!r}: split must not be empty")
        if self.max_samples is not None and self.max_samples < 1:
            raise ValueError(f"eval set {self.name!r}: max_samples must be >= 1 or null, got {self.max_samples}")


@dataclass
class EvalConfig:
    """Evaluation of the policy on held-out test sets, during training and with `lmmrl-eval`.

    sets: the test sets; empty turns evaluation off.
    eval_before_train: evaluate the initial model at step 0 (the "before" of the before/after table).
    eval_steps: also evaluate every this many steps; 0: only before training and after the last step (a run
        always evaluates after its last step when `sets` is not empty).
    n_samples_per_prompt: responses per prompt. accuracy is their mean (pass@1); with n > 1 also pass@k for k = 2,
        4, ... below n and k = n (unbiased estimates from the n samples; pass@n is the share of prompts with at
        least one correct response).
    temperature / top_p: 0 is greedy decoding (n must then be 1); otherwise sampled with the run's seed.
    max_new_tokens: response budget; None: `rollout.max_new_tokens`.
    batch_size: prompts per generation call (spread over the rollout engines).
    accuracy_function / format_function: the reward functions whose scores are `accuracy` and `format` (the
        built-ins `accuracy` and `format`, or a user function `path/file.py:name`), run by the reward scorer with
        `reward.format_kind`, `reward.timeout_s` and `reward.num_workers`, in process even when training scores
        with `reward.remote_rm_url`. A response counts as correct for pass@k when its accuracy score is >= 0.5.
        `format_function: null` logs no format figure.
    save_samples: write every prompt, response and score to `<save_path>/eval/step_<step>.jsonl`.
    """

    sets: list[EvalSetConfig] = field(default_factory=list)
    eval_before_train: bool = True
    eval_steps: int = 0
    n_samples_per_prompt: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int | None = None
    batch_size: int = 64
    accuracy_function: str = "accuracy"
    format_function: str | None = "format"
    save_samples: bool = True

    def __post_init__(self) -> None:
        names = [s.name for s in self.sets]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"eval.sets names {duplicates} more than once; each set needs its own name")
        if self.eval_steps < 0:
            raise ValueError(f"eval.eval_steps must be >= 0, got {self.eval_steps}")
        if self.n_samples_per_prompt < 1:
            raise ValueError(f"eval.n_samples_per_prompt must be >= 1, got {self.n_samples_per_prompt}")
        if self.temperature < 0:
            raise ValueError(f"eval.temperature must be >= 0, got {self.temperature}")
        if self.temperature == 0 and self.n_samples_per_prompt > 1:
            raise ValueError(
                f"eval.n_samples_per_prompt={self.n_samples_per_prompt} with temperature 0: greedy decoding gives "
                "the same response every time; sample (temperature > 0) or set n_samples_per_prompt: 1"
            )
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"eval.top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"eval.max_new_tokens must be >= 1 or null, got {self.max_new_tokens}")
        if self.batch_size < 1:
            raise ValueError(f"eval.batch_size must be >= 1, got {self.batch_size}")
        if self.format_function is not None and self.format_function == self.accuracy_function:
            raise ValueError(f"eval.format_function and eval.accuracy_function are both {self.accuracy_function!r}")

    @property
    def enabled(self) -> bool:
        return bool(self.sets)

    def scorer_config(self, reward: RewardConfig) -> RewardConfig:
        """The eval scorer's configuration: the accuracy (and format) function, weight 1 each, on the run's
        reward knobs (format kind, timeout, workers)."""
        functions = [RewardFunctionConfig(self.accuracy_function, 1.0)]
        if self.format_function is not None:
            functions.append(RewardFunctionConfig(self.format_function, 1.0))
        return RewardConfig(
            functions=functions, format_kind=reward.format_kind, timeout_s=reward.timeout_s, num_workers=reward.num_workers
        )

    def is_due(self, step: int, max_steps: int) -> bool:
        """Whether to evaluate after `step` RL steps (step 0: before training)."""
        if not self.sets:
            return False
        if step == 0:
            return self.eval_before_train
        return step == max_steps or (self.eval_steps > 0 and step % self.eval_steps == 0)

"""The `reward` section of the training config: which reward functions, their weights, and how they run."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Literal

# Names of the reward functions that ship with the package; anything else must be `path/to/file.py:function`.
BUILTIN_REWARD_FUNCTIONS = ("accuracy", "format")

FormatKind = Literal["think_answer", "boxed"]


@dataclass
class RewardFunctionConfig:
    """One term of the reward: `weight * function(response, label, prompt)`.

    `name` is `accuracy`, `format`, or a user function given as `path/to/file.py:function_name`
    (see `lmmrl_megatron.reward.user_functions` for the signature it must have).
    """

    name: str = "accuracy"
    weight: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"reward.functions: name must be a non-empty string, got {self.name!r}")
        if self.name not in BUILTIN_REWARD_FUNCTIONS:
            path, separator, function_name = self.name.rpartition(":")
            if not separator or not path.endswith(".py") or not function_name.isidentifier():
                raise ValueError(
                    f"reward.functions: name {self.name!r} is neither a built-in "
                    f"({', '.join(BUILTIN_REWARD_FUNCTIONS)}) nor of the form 'path/to/file.py:function_name'"
                )
        if isinstance(self.weight, bool) or not isinstance(self.weight, (int, float)):
            raise ValueError(f"reward.functions[{self.name}].weight must be a number, got {self.weight!r}")
        if not math.isfinite(self.weight):
            raise ValueError(f"reward.functions[{self.name}].weight must be finite, got {self.weight!r}")
        self.weight = float(self.weight)


def _lmmr1_default_functions() -> list[RewardFunctionConfig]:
    # LMM-R1's math verifier: 0.5 for one well-formed <think>...</think><answer>...</answer>, 1 for a right answer.
    return [RewardFunctionConfig(name="format", weight=0.5), RewardFunctionConfig(name="accuracy", weight=1.0)]


@dataclass
class RewardConfig:
    """How responses are scored, in process or by a remote reward server.

    Fields:
        functions: the weighted terms summed into the reward (default: LMM-R1's 0.5 format + 1.0 accuracy).
        format_kind: what the `format` reward checks, and so what the prompt should ask for:
            `think_answer` = exactly one `<think>...</think>` followed by exactly one `<answer>...</answer>`;
            `boxed` = exactly one `\\boxed{...}` with a non-empty answer.
        remote_rm_url: when set, the trainer asks this server (POST .../get_reward) instead of scoring locally.
        timeout_s: seconds one reward function may spend on one sample before it is killed and scores 0.
        num_workers: verifier processes (sympy runs there, so a hang can be killed without stalling the batch).
        client_timeout_s: seconds the remote client waits for one HTTP reply.
        client_max_retries: retries after a connection error, a timeout or a 5xx reply (never after a 4xx).
        client_backoff_s: wait before the first retry; doubles at each retry up to `client_backoff_max_s`.
        client_backoff_max_s: cap on the wait between retries.
    """

    functions: list[RewardFunctionConfig] = field(default_factory=_lmmr1_default_functions)
    format_kind: FormatKind = "think_answer"
    remote_rm_url: str | None = None
    timeout_s: float = 10.0
    num_workers: int = 4
    client_timeout_s: float = 120.0
    client_max_retries: int = 3
    client_backoff_s: float = 1.0
    client_backoff_max_s: float = 30.0

    def __post_init__(self) -> None:
        self.functions = [_as_function_config(item, index) for index, item in enumerate(self.functions)]
        if not self.functions and self.remote_rm_url is None:
            raise ValueError("reward.functions must name at least one reward function (or set reward.remote_rm_url)")
        names = [function.name for function in self.functions]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"reward.functions lists {duplicates} more than once; merge them into one weight")
        if self.format_kind not in ("think_answer", "boxed"):
            raise ValueError(f"reward.format_kind must be 'think_answer' or 'boxed', got {self.format_kind!r}")
        if self.remote_rm_url is not None and not self.remote_rm_url.startswith(("http://", "https://")):
            raise ValueError(f"reward.remote_rm_url must start with http:// or https://, got {self.remote_rm_url!r}")
        _require_positive("reward.timeout_s", self.timeout_s)
        _require_positive("reward.client_timeout_s", self.client_timeout_s)
        _require_non_negative("reward.client_backoff_s", self.client_backoff_s)
        _require_non_negative("reward.client_backoff_max_s", self.client_backoff_max_s)
        if isinstance(self.num_workers, bool) or not isinstance(self.num_workers, int) or self.num_workers < 1:
            raise ValueError(f"reward.num_workers must be an integer >= 1, got {self.num_workers!r}")
        retries = self.client_max_retries
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ValueError(f"reward.client_max_retries must be an integer >= 0, got {retries!r}")

    @property
    def function_names(self) -> list[str]:
        return [function.name for function in self.functions]

    @property
    def function_weights(self) -> list[float]:
        return [function.weight for function in self.functions]


def _as_function_config(item: object, index: int) -> RewardFunctionConfig:
    # A YAML loader may hand over plain mappings; accept them here so the error names the list index.
    if isinstance(item, RewardFunctionConfig):
        return item
    if isinstance(item, dict):
        known = {f.name for f in fields(RewardFunctionConfig)}
        unknown = sorted(set(item) - known)
        if unknown:
            raise ValueError(f"reward.functions[{index}] has unknown keys {unknown}; expected {sorted(known)}")
        return RewardFunctionConfig(**item)
    raise ValueError(f"reward.functions[{index}] must be a mapping with 'name' and 'weight', got {item!r}")


def _require_positive(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")


def _require_non_negative(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a number >= 0, got {value!r}")

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
            if not is_file_function(self.name):
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
        remote_rm_url: when set, the trainer scores with this instead of `functions`, as OpenRLHF / LMM-R1 take
            `--remote_rm_url`: one reward server (`http://host:port` or `.../get_reward`), several separated by
            commas (each batch is split across them; a server that fails passes its part to the next), or the path
            of a Python file whose `reward_func(queries, prompts, labels)` scores whole batches
            (`path/to/reward_func.py`, or `path/to/file.py:function_name`), run in the verifier processes.
        timeout_s: seconds (real time) one reward function may spend on one sample; past it the call is
            interrupted (its process killed, if it does not return to Python) and scores 0, counted as a timeout.
        math_timeout_s: seconds of CPU time each math-verify step of `accuracy` (parsing the label, parsing the
            answer, comparing them) may use; CPU time, so a busy machine does not turn a right answer into a timeout.
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
    math_timeout_s: float = 3.0
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
        if self.remote_rm_url is not None:
            split_remote_rm_url(self.remote_rm_url)  # raises naming the bad part
        _require_positive("reward.timeout_s", self.timeout_s)
        _require_positive("reward.math_timeout_s", self.math_timeout_s)
        _require_positive("reward.client_timeout_s", self.client_timeout_s)
        _require_non_negative("reward.client_backoff_s", self.client_backoff_s)
        _require_non_negative("reward.client_backoff_max_s", self.client_backoff_max_s)
        if isinstance(self.num_workers, bool) or not isinstance(self.num_workers, int) or self.num_workers < 1:
            raise ValueError(f"reward.num_workers must be an integer >= 1, got {self.num_workers!r}")
        retries = self.client_max_retries
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ValueError(f"reward.client_max_retries must be an integer >= 0, got {retries!r}")

    @property
    def remote_urls(self) -> list[str]:
        """The reward servers of `remote_rm_url` (empty when it names a reward_func file, or is unset)."""
        return [] if self.remote_rm_url is None else split_remote_rm_url(self.remote_rm_url)[0]

    @property
    def remote_function(self) -> str | None:
        """The reward_func file `remote_rm_url` names, if it names one."""
        return None if self.remote_rm_url is None else split_remote_rm_url(self.remote_rm_url)[1]

    @property
    def function_names(self) -> list[str]:
        return [function.name for function in self.functions]

    @property
    def function_weights(self) -> list[float]:
        return [function.weight for function in self.functions]


def is_file_function(text: str) -> bool:
    """Whether `text` is of the form `path/to/file.py:function_name`."""
    path, separator, name = text.rpartition(":")
    return bool(separator) and path.endswith(".py") and name.isidentifier()


def is_function_path(text: str) -> bool:
    """Whether a `remote_rm_url` entry names a Python file (`x.py` or `x.py:function`) rather than a server."""
    return text.endswith(".py") or is_file_function(text)


def split_remote_rm_url(value: str) -> tuple[list[str], str | None]:
    """(server URLs, reward_func file) of a `remote_rm_url`; a ValueError naming the part that is neither."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"reward.remote_rm_url must be a non-empty string, got {value!r}")
    parts = [part.strip() for part in value.split(",")]
    if any(not part for part in parts):
        raise ValueError(f"reward.remote_rm_url {value!r} has an empty entry between commas")
    files = [part for part in parts if is_function_path(part)]
    if files:
        if len(parts) > 1:
            raise ValueError(
                f"reward.remote_rm_url {value!r}: a reward_func file ({files[0]!r}) must be the only entry"
            )
        return [], files[0]
    for part in parts:
        if not part.startswith(("http://", "https://")):
            raise ValueError(
                f"reward.remote_rm_url entry {part!r} must start with http:// or https:// (or name a .py file)"
            )
    return parts, None


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

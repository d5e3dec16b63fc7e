"""What scoring a batch returns, in process or from a remote server: rewards, their parts, and what went wrong."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from lmmrl_megatron.reward.protocol import Outcome

_MAX_KEPT_MESSAGES = 5


def split_batch(length: int, num_parts: int) -> list[tuple[int, int]]:
    """(start, end) of at most `num_parts` contiguous parts of nearly equal size covering `range(length)`
    (one empty part for an empty batch), as OpenRLHF cuts a batch across its reward servers."""
    size = max(1, -(-length // num_parts))
    return [(start, min(start + size, length)) for start in range(0, length, size)] or [(0, 0)]


def check_batch_lengths(queries: list[str], prompts: list[str], labels: list[str] | None) -> None:
    if len(prompts) != len(queries) or (labels is not None and len(labels) != len(queries)):
        raise ValueError(
            f"score: {len(queries)} queries, {len(prompts)} prompts, "
            f"{'no' if labels is None else len(labels)} labels: the lengths must match"
        )


@dataclass
class RewardCounters:
    """Counts over one batch of reward-function calls (one call = one function on one sample, or one call of a
    batch function on part of the batch).

    Every call that did not end in `ok` scored 0 and is counted here, with the first few messages kept for logs.
    `num_rejected` counts answers the pre-check refused to evaluate (power towers, huge factorials, over-long):
    the model's doing, not a failure of the scorer, so they are not in `num_failures`.
    """

    num_samples: int = 0
    num_calls: int = 0
    num_timeouts: int = 0
    num_errors: int = 0
    num_bad_returns: int = 0
    num_crashes: int = 0
    num_rejected: int = 0
    messages: list[str] = field(default_factory=list)

    @property
    def num_failures(self) -> int:
        return self.num_timeouts + self.num_errors + self.num_bad_returns + self.num_crashes

    def record(self, outcome: Outcome, function_name: str) -> None:
        self.num_calls += 1
        if outcome.status == "ok":
            return
        if outcome.status == "timeout":
            self.num_timeouts += 1
        elif outcome.status == "error":
            self.num_errors += 1
        elif outcome.status == "bad_return":
            self.num_bad_returns += 1
        elif outcome.status == "crashed":
            self.num_crashes += 1
        elif outcome.status == "rejected":
            self.num_rejected += 1
        else:
            raise AssertionError(f"unknown outcome status {outcome.status!r}")
        if len(self.messages) < _MAX_KEPT_MESSAGES:
            self.messages.append(f"{function_name}: {outcome.status}: {outcome.detail}")

    def add(self, other: RewardCounters) -> None:
        """Accumulate another batch's counts into this one (e.g. over a training step)."""
        for counter in fields(self):
            if counter.name != "messages":
                setattr(self, counter.name, getattr(self, counter.name) + getattr(other, counter.name))
        self.messages.extend(other.messages[: max(0, _MAX_KEPT_MESSAGES - len(self.messages))])

    def to_json(self) -> dict[str, int | list[str]]:
        return asdict(self)

    def to_metrics(self) -> dict[str, float]:
        """The counts as training metrics: `reward/num_failures`, `reward/num_timeouts`, ... (no messages)."""
        metrics = {"reward/num_failures": float(self.num_failures)}
        for counter in fields(self):
            if counter.name not in ("messages", "num_samples", "num_calls"):
                metrics[f"reward/{counter.name}"] = float(getattr(self, counter.name))
        return metrics

    @classmethod
    def from_json(cls, payload: object) -> RewardCounters:
        """Counters from a server reply; unknown keys are ignored so newer servers stay readable."""
        if not isinstance(payload, dict):
            raise ValueError(f"'counters' must be an object, got {type(payload).__name__}")
        counters = cls()
        for counter in fields(cls):
            if counter.name not in payload:
                continue
            value = payload[counter.name]
            if counter.name == "messages":
                if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
                    raise ValueError("'counters.messages' must be a list of strings")
                counters.messages = list(value)
            elif isinstance(value, int) and not isinstance(value, bool):
                setattr(counters, counter.name, value)
            else:
                raise ValueError(f"'counters.{counter.name}' must be an integer, got {value!r}")
        return counters


@dataclass
class RewardBatchResult:
    """Rewards of a batch, in sample order.

    `components` maps each reward function's name to its weighted contribution per sample, so that
    `rewards[i] == sum(values[i] for values in components.values())`.
    """

    rewards: list[float]
    components: dict[str, list[float]]
    counters: RewardCounters

    def __post_init__(self) -> None:
        for name, values in self.components.items():
            assert len(values) == len(self.rewards), f"component {name!r} has {len(values)} values"

    @classmethod
    def concatenate(cls, parts: list[RewardBatchResult]) -> RewardBatchResult:
        """The results of consecutive parts of one batch as one (components that every part reports)."""
        names = [name for name in parts[0].components if all(name in part.components for part in parts)]
        counters = RewardCounters()
        for part in parts:
            counters.add(part.counters)
        return cls(
            rewards=[reward for part in parts for reward in part.rewards],
            components={name: [value for part in parts for value in part.components[name]] for name in names},
            counters=counters,
        )

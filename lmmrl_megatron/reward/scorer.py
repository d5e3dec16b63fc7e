"""Scoring batches of responses in process: weighted sums of reward functions run in the verifier pool."""

from __future__ import annotations

from lmmrl_megatron.reward.config import BUILTIN_REWARD_FUNCTIONS, RewardConfig
from lmmrl_megatron.reward.pool import VerifierPool
from lmmrl_megatron.reward.protocol import VerifyTask
from lmmrl_megatron.reward.results import RewardBatchResult, RewardCounters
from lmmrl_megatron.reward.user_functions import load_reward_function


class RewardScorer:
    """Computes `sum(weight * function(response, label, prompt))` over the configured reward functions.

    Each function call runs in a verifier process with the `timeout_s` limit; a call that times out, raises, or
    returns a non-number contributes 0 and is counted in the result's `counters`. Thread-safe. Close it (or use
    it as a context manager) to stop the worker processes.
    """

    def __init__(self, config: RewardConfig) -> None:
        if not config.functions:
            raise ValueError("reward.functions is empty: there is nothing to score with locally")
        # Load user functions here too, so a missing file or function fails now with its own message rather
        # than later inside a worker process.
        for name in config.function_names:
            if name not in BUILTIN_REWARD_FUNCTIONS:
                load_reward_function(name)
        self.config = config
        self._pool = VerifierPool(
            function_names=tuple(config.function_names),
            format_kind=config.format_kind,
            num_workers=config.num_workers,
            timeout_s=config.timeout_s,
        )

    @property
    def num_worker_restarts(self) -> int:
        return self._pool.num_restarts

    def score(self, responses: list[str], labels: list[str], prompts: list[str] | None = None) -> RewardBatchResult:
        """Rewards for `responses[i]` against `labels[i]` (and `prompts[i]`, "" when not given)."""
        if len(labels) != len(responses):
            raise ValueError(f"score: {len(responses)} responses but {len(labels)} labels")
        if prompts is None:
            prompts = [""] * len(responses)
        if len(prompts) != len(responses):
            raise ValueError(f"score: {len(responses)} responses but {len(prompts)} prompts")
        names = self.config.function_names
        tasks = [
            VerifyTask(function_index, response, label, prompt)
            for response, label, prompt in zip(responses, labels, prompts)
            for function_index in range(len(names))
        ]
        outcomes = self._pool.map(tasks)
        counters = RewardCounters(num_samples=len(responses))
        components: dict[str, list[float]] = {name: [] for name in names}
        for task, outcome in zip(tasks, outcomes):
            name = names[task.function_index]
            counters.record(outcome, name)
            components[name].append(self.config.functions[task.function_index].weight * outcome.value)
        rewards = [sum(values) for values in zip(*components.values())] if responses else []
        return RewardBatchResult(rewards=rewards, components=components, counters=counters)

    def close(self) -> None:
        self._pool.close()

    def __enter__(self) -> RewardScorer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

"""Scoring batches in process: weighted sums of reward functions, or an OpenRLHF batch function, in the pool."""

from __future__ import annotations

from concurrent.futures import Future

from lmmrl_megatron.reward.config import BUILTIN_REWARD_FUNCTIONS, RewardConfig
from lmmrl_megatron.reward.pool import VerifierPool
from lmmrl_megatron.reward.protocol import BatchTask, Outcome, VerifyTask
from lmmrl_megatron.reward.results import RewardBatchResult, RewardCounters, check_batch_lengths, split_batch
from lmmrl_megatron.reward.user_functions import load_batch_reward_function, load_reward_function


class PendingScores:
    """A batch handed to the pool: its futures (to wait on, or to await with `asyncio.wrap_future`), and
    `combine` to turn their outcomes into the batch's result."""

    def __init__(self, config: RewardConfig, tasks: list[VerifyTask], futures: list[Future[Outcome]]) -> None:
        self._config = config
        self._tasks = tasks
        self.futures = futures

    def result(self) -> RewardBatchResult:
        return self.combine([future.result() for future in self.futures])

    def combine(self, outcomes: list[Outcome]) -> RewardBatchResult:
        names = self._config.function_names
        counters = RewardCounters(num_samples=len(self._tasks) // max(1, len(names)))
        components: dict[str, list[float]] = {name: [] for name in names}
        for task, outcome in zip(self._tasks, outcomes):
            name = names[task.function_index]
            counters.record(outcome, name)
            components[name].append(self._config.functions[task.function_index].weight * outcome.value)
        rewards = [sum(values) for values in zip(*components.values())] if counters.num_samples else []
        return RewardBatchResult(rewards=rewards, components=components, counters=counters)


class RewardScorer:
    """Computes `sum(weight * function(response, label, prompt))` over the configured reward functions.

    Each function call runs in a verifier process within the `timeout_s` limit; a call that times out, raises, or
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
            math_timeout_s=config.math_timeout_s,
        )

    @property
    def num_worker_restarts(self) -> int:
        return self._pool.num_restarts

    def wait_until_ready(self) -> None:
        """Block until the verifier processes have started and warmed up (they start with the scorer)."""
        self._pool.wait_until_ready()

    def submit(self, responses: list[str], labels: list[str], prompts: list[str] | None = None) -> PendingScores:
        """Queue a batch without waiting; see `score`."""
        if len(labels) != len(responses):
            raise ValueError(f"score: {len(responses)} responses but {len(labels)} labels")
        if prompts is None:
            prompts = [""] * len(responses)
        if len(prompts) != len(responses):
            raise ValueError(f"score: {len(responses)} responses but {len(prompts)} prompts")
        tasks = [
            VerifyTask(function_index, response, label, prompt)
            for response, label, prompt in zip(responses, labels, prompts)
            for function_index in range(len(self.config.functions))
        ]
        return PendingScores(self.config, tasks, self._pool.submit_batch(tasks))

    def score(self, responses: list[str], labels: list[str], prompts: list[str] | None = None) -> RewardBatchResult:
        """Rewards for `responses[i]` against `labels[i]` (and `prompts[i]`, "" when not given)."""
        return self.submit(responses, labels, prompts).result()

    def close(self) -> None:
        self._pool.close()

    def __enter__(self) -> RewardScorer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class BatchFunctionScorer:
    """`reward.remote_rm_url` naming a Python file: OpenRLHF's `reward_func(queries, prompts, labels)`.

    Each batch is split into one part per verifier process, and each part is one call of the function in a
    verifier process, limited to `timeout_s` per sample; a part whose call fails scores 0 and is counted. Same
    `score(queries, prompts, labels)` as `RemoteRewardClient`, so the trainer uses either the same way.
    """

    def __init__(self, config: RewardConfig) -> None:
        spec = config.remote_function
        if spec is None:
            raise ValueError("reward.remote_rm_url does not name a reward_func file")
        load_batch_reward_function(spec)  # a missing file or function fails now, with its own message
        self.config = config
        self.spec = spec
        self._pool = VerifierPool(
            function_names=(),
            format_kind=config.format_kind,
            num_workers=config.num_workers,
            timeout_s=config.timeout_s,
            batch_function=spec,
        )

    def score(self, queries: list[str], prompts: list[str], labels: list[str] | None) -> RewardBatchResult:
        check_batch_lengths(queries, prompts, labels)
        labels = labels if labels is not None else [""] * len(queries)
        tasks = [
            BatchTask(tuple(queries[start:end]), tuple(prompts[start:end]), tuple(labels[start:end]))
            for start, end in split_batch(len(queries), self.config.num_workers)
            if end > start
        ]
        counters = RewardCounters(num_samples=len(queries))
        rewards: list[float] = []
        for outcome in self._pool.map(tasks):
            counters.record(outcome, self.spec)
            rewards.extend(outcome.values)
        return RewardBatchResult(rewards=rewards, components={}, counters=counters)

    def close(self) -> None:
        self._pool.close()

    def __enter__(self) -> BatchFunctionScorer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

"""Rule-based rewards: accuracy (math-verify), format, user functions; in process, as a server, or via a client.

Use `RewardScorer(RewardConfig(...)).score(responses, labels, prompts)` in process,
`RemoteRewardClient.from_config(config).score(queries, prompts, labels)` for a `remote_rm_url`, and
`python -m lmmrl_megatron.reward.server` to serve LMM-R1's remote reward API. See docs/rewards.md.
"""

from lmmrl_megatron.reward.client import RemoteRewardClient, RemoteRewardError, RetryPolicy
from lmmrl_megatron.reward.config import RewardConfig, RewardFunctionConfig
from lmmrl_megatron.reward.results import RewardBatchResult, RewardCounters
from lmmrl_megatron.reward.scorer import RewardScorer

__all__ = [
    "RemoteRewardClient",
    "RemoteRewardError",
    "RetryPolicy",
    "RewardBatchResult",
    "RewardConfig",
    "RewardCounters",
    "RewardFunctionConfig",
    "RewardScorer",
]

"""The learner: the training side of the RL step on Megatron-Core (log-probs, a PPO update, the colocated swap, the
step's batch and its micro-batches). "Engine" in this project always means a rollout engine (`rollout/`)."""

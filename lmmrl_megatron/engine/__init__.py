"""Training engines: the backend-neutral operations the controller needs (log-probs, a PPO update, weight export,
checkpoints), implemented on Megatron-Core."""

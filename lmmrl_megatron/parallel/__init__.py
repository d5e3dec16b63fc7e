"""Process groups, platform backends and vocabulary-parallel log-probs for Megatron-Core."""

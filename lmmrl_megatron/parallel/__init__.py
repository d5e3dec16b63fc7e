"""Process groups and platform backends for Megatron-Core."""

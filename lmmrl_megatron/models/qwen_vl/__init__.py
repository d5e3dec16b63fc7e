"""Qwen2-VL / Qwen2.5-VL on Megatron-Core."""

"""lmmrl-megatron: Megatron-Core backed RL for large multimodal models (Qwen2-VL / Qwen2.5-VL)."""

__version__ = "0.1.0"

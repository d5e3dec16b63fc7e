"""Model definitions built on Megatron-Core: shared attention, Qwen-VL vision encoder and decoder."""

"""Hugging Face <-> Megatron-Core checkpoint conversion, resharding and live weight export."""

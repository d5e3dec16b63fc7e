"""The parallel layout (`layout.py`), vocabulary-parallel log-probs (`vocab_parallel.py`), and process groups and
platform backends for Megatron-Core."""

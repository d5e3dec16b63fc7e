"""The parallel layout (`layout.py`), and process groups and platform backends for Megatron-Core."""

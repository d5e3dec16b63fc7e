"""Rollout engines: generate responses with per-token log-probs from multimodal prompts, receive new weights."""

from lmmrl_megatron.rollout.engine import GenerationOutput, MultimodalPrompt, RolloutEngine, SamplingParams

__all__ = ["GenerationOutput", "MultimodalPrompt", "RolloutEngine", "SamplingParams"]

"""Multimodal prompt data in LMM-R1's format: reading, checking, mixing, sampling and encoding prompts.

Entry points:
  records.iter_records(source, input_key, label_key)        -> PromptRecord per record
  loader.build_prompt_loader(DataConfig, processor, batch)   -> PromptLoader: resumable batches of EncodedPrompt
  python -m lmmrl_megatron.data.synthetic                    synthetic image tasks written as real files

This package imports only the light modules (no torch, no transformers), so the reward server and the synthetic
generator start fast; import `lmmrl_megatron.data.encode` / `.loader` for the processor path.
"""

from lmmrl_megatron.data.bad_input import BadInputCounts, BadInputError, BadInputHandler, BadInputReason
from lmmrl_megatron.data.config import DataConfig
from lmmrl_megatron.data.images import ImageError, load_image
from lmmrl_megatron.data.messages import ChatMessage, ImagePart, TextPart, parse_messages
from lmmrl_megatron.data.pool import PromptPool, load_prompt_pool
from lmmrl_megatron.data.records import PromptRecord, iter_records
from lmmrl_megatron.data.sampler import PromptSampler
from lmmrl_megatron.data.sources import RecordOrigin

__all__ = [
    "BadInputCounts",
    "BadInputError",
    "BadInputHandler",
    "BadInputReason",
    "ChatMessage",
    "DataConfig",
    "ImageError",
    "ImagePart",
    "PromptPool",
    "PromptRecord",
    "PromptSampler",
    "RecordOrigin",
    "TextPart",
    "iter_records",
    "load_image",
    "load_prompt_pool",
    "parse_messages",
]

"""Cutting the model's response out of an LMM-R1 `query`: the decoded prompt and response with special tokens."""

from __future__ import annotations

from typing import Literal

PromptTemplate = Literal["chatml", "qwen1", "base", "phi3", "phi4", "gemma3"]

# The text that opens the assistant's turn in each chat template LMM-R1's math verifier knows. phi4 is
# Phi-4-multimodal's `<|assistant|>` (no newline follows it there); LMM-R1 gives phi3 and phi4 the same pattern.
ASSISTANT_PREFIXES: dict[str, str] = {
    "chatml": "<|im_start|>assistant\n",
    "qwen1": "<｜Assistant｜>",
    "base": "Assistant: ",
    "phi3": "<|assistant|>\n",
    "phi4": "<|assistant|>",
    "gemma3": "<start_of_turn>model\n",
}

# End-of-turn, end-of-text and padding tokens that decoding with special tokens leaves in the response.
SPECIAL_TOKENS_TO_STRIP = (
    "<|im_end|>",
    "<|endoftext|>",
    "<｜end▁of▁sentence｜>",
    "<end_of_turn>",
    "<|end|>",
    "<eos>",
    "</s>",
    "<pad>",
    "<|vision_pad|>",
)


def response_from_query(query: str, template: PromptTemplate) -> str:
    """The text after the last assistant turn opener, without special tokens, stripped.

    The *last* opener, because a multi-turn prompt contains earlier assistant turns. A query without any opener
    is taken as a bare response, as LMM-R1 does.
    """
    prefix = ASSISTANT_PREFIXES[template]
    position = query.rfind(prefix)
    response = query[position + len(prefix) :] if position >= 0 else query
    for token in SPECIAL_TOKENS_TO_STRIP:
        response = response.replace(token, "")
    return response.strip()

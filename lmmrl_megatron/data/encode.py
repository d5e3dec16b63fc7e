"""Turning a prompt record into model inputs with the model's own chat template and processor, once per prompt.

The result (`EncodedPrompt`) carries everything later stages need: the token ids with image tokens expanded, the
pixel values and `image_grid_thw`, the templated prompt text and the label. Rollout and training both reuse it,
so images are read, resized and normalised once (LMM-R1 processes them again for training).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from lmmrl_megatron.data.bad_input import BadInputError
from lmmrl_megatron.data.images import ImageError, load_image
from lmmrl_megatron.data.messages import to_template_messages, with_system_prompt
from lmmrl_megatron.data.records import PromptRecord


@dataclass
class EncodedPrompt:
    """A prompt ready for generation and training.

    input_ids: [num_tokens] int64, image placeholders expanded to one token per merged image patch.
    pixel_values: [num_patches, channels * temporal_patch * patch * patch] float, or None without images.
    image_grid_thw: [num_images, 3] int64 (temporal, height, width patches per image), or None without images.
    prompt_text: the chat-templated prompt (one placeholder per image, before expansion), generation prompt included.
    images: the decoded images, for rollout engines that run their own processor on them (vLLM).
    """

    record: PromptRecord
    prompt_text: str
    input_ids: torch.Tensor
    pixel_values: torch.Tensor | None
    image_grid_thw: torch.Tensor | None
    images: list[Image.Image] | None = None

    @property
    def answer(self) -> str:
        return self.record.answer

    @property
    def raw_message(self) -> str:
        return self.record.raw_message

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())

    @property
    def num_images(self) -> int:
        return 0 if self.image_grid_thw is None else int(self.image_grid_thw.shape[0])


class PromptEncoder:
    """Applies the chat template and the processor (`transformers.AutoProcessor` of the model) to records.

    Bad records raise `BadInputError` naming the record's file and line; the caller applies the policy.
    """

    def __init__(
        self,
        processor: Any,
        system_prompt: str | None = None,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        max_prompt_length: int | None = None,
        image_timeout_s: float = 10.0,
    ) -> None:
        self.processor = processor
        self.system_prompt = system_prompt
        self.max_prompt_length = max_prompt_length
        self.image_timeout_s = image_timeout_s
        self._images_kwargs = self._resize_kwargs(min_pixels, max_pixels)

    def _resize_kwargs(self, min_pixels: int | None, max_pixels: int | None) -> dict[str, Any]:
        if min_pixels is None and max_pixels is None:
            return {}
        # Qwen-VL image processors bound the resized area by size.shortest_edge / size.longest_edge (in pixels).
        current = getattr(getattr(self.processor, "image_processor", None), "size", None)
        if current is None or getattr(current, "shortest_edge", None) is None:
            raise ValueError("data.min_pixels/max_pixels need a Qwen-VL style image processor (size.shortest_edge)")
        size = {
            "shortest_edge": min_pixels if min_pixels is not None else current.shortest_edge,
            "longest_edge": max_pixels if max_pixels is not None else current.longest_edge,
        }
        if size["shortest_edge"] > size["longest_edge"]:
            raise ValueError(f"data.min_pixels/max_pixels give an empty range with the processor's size: {size}")
        return {"size": size}

    def prompt_text(self, record: PromptRecord) -> str:
        messages = with_system_prompt(list(record.messages), self.system_prompt)
        return self.processor.apply_chat_template(
            to_template_messages(messages), tokenize=False, add_generation_prompt=True
        )

    def _load_images(self, record: PromptRecord) -> list[Image.Image]:
        images = []
        for part in record.images:
            try:
                images.append(load_image(part.image, record.base_dir, self.image_timeout_s))
            except ImageError as exc:
                raise BadInputError(str(record.origin), exc.reason, exc.detail) from exc
        return images

    def encode(self, record: PromptRecord) -> EncodedPrompt:
        text = self.prompt_text(record)
        images = self._load_images(record)
        kwargs: dict[str, Any] = {"text": [text], "return_tensors": "pt"}
        if images:
            kwargs["images"] = images
            kwargs["images_kwargs"] = self._images_kwargs
        try:
            inputs = self.processor(**kwargs)
        except ValueError as exc:
            # The processor rejects images it cannot resize (e.g. an aspect ratio over 200) with ValueError.
            reason = "corrupt_image" if images else "bad_message"
            raise BadInputError(str(record.origin), reason, f"the processor rejected the prompt: {exc}") from exc
        input_ids = inputs["input_ids"][0]
        if self.max_prompt_length is not None and input_ids.numel() > self.max_prompt_length:
            raise BadInputError(
                str(record.origin),
                "prompt_too_long",
                f"{input_ids.numel()} tokens (images included) > data.max_prompt_length={self.max_prompt_length}",
            )
        return EncodedPrompt(
            record=record,
            prompt_text=text,
            input_ids=input_ids,
            pixel_values=inputs.get("pixel_values") if images else None,
            image_grid_thw=inputs.get("image_grid_thw") if images else None,
            images=images or None,
        )

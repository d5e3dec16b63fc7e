"""Prompts with images for the rollout engine tests, and the log-probs a plain forward pass gives."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from PIL import Image, ImageDraw

from lmmrl_megatron.rollout import MultimodalPrompt


def make_prompts(model_dir: Path) -> list[MultimodalPrompt]:
    """Two prompts with one image each (different sizes) and one text-only prompt, as the processor encodes them."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    prompts = []
    for size, question in [((84, 56), "How many circles?"), ((56, 112), "What color is the shape?"), (None, "Hi")]:
        content = [{"type": "text", "text": question}]
        images = None
        if size is not None:
            image = Image.new("RGB", size, "white")
            ImageDraw.Draw(image).ellipse((5, 5, 30, 30), fill="red")
            content.insert(0, {"type": "image"})
            images = [image]
        text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        inputs = processor(text=[text], images=images, return_tensors="pt")
        prompts.append(
            MultimodalPrompt(inputs["input_ids"][0], inputs.get("pixel_values"), inputs.get("image_grid_thw"), images)
        )
    return prompts


def teacher_forced_logprobs(
    model: torch.nn.Module, prompt: MultimodalPrompt, response: torch.Tensor, temperature: float, excluded: Sequence[int]
) -> torch.Tensor:
    """Score prompt + response in one forward pass of a transformers model, unpadded, with `excluded` tokens
    (the ones engines never sample) out of the distribution."""
    ids = torch.cat([prompt.prompt_ids, response]).unsqueeze(0)
    kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if prompt.pixel_values is not None:
        kwargs.update(pixel_values=prompt.pixel_values, image_grid_thw=prompt.image_grid_thw)
        kwargs["mm_token_type_ids"] = (ids == model.config.image_token_id).long()
    with torch.no_grad():
        logits = model(**kwargs).logits[0].float() / temperature
    logits[:, list(excluded)] = float("-inf")
    start = prompt.prompt_ids.numel()
    logp = torch.log_softmax(logits[start - 1 : -1], dim=-1)
    return logp.gather(-1, response.unsqueeze(-1)).squeeze(-1)

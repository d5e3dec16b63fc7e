"""Load a tiny checkpoint offline and generate from a drawn image: the smoke run of the embedded default."""

from __future__ import annotations

import argparse

import torch
from PIL import Image, ImageDraw


def main(argv: list[str] | None = None) -> None:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True, help="a Hugging Face Qwen-VL directory")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    args = parser.parse_args(argv)

    model = AutoModelForImageTextToText.from_pretrained(args.model)
    processor = AutoProcessor.from_pretrained(args.model)
    image = Image.new("RGB", (84, 56), "white")
    ImageDraw.Draw(image).ellipse((10, 10, 40, 40), fill="red")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many circles?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=[text], images=[image], return_tensors="pt")
    torch.manual_seed(0)
    output = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=True)
    response = processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=False)
    print(f"prompt tokens: {inputs['input_ids'].shape[1]}, image grid: {inputs['image_grid_thw'].tolist()}")
    print(f"response: {response!r}")


if __name__ == "__main__":
    main()

"""Our training step with the decoder eager against replayed from CUDA graphs (models/decoder_graphs.py), one GPU.

    python bench/decoder_graphs.py                # Qwen2.5-VL-3B shapes, bf16, 1 x 4096 tokens (2 images / text)
    python bench/decoder_graphs.py --layers 2     # the 3B widths with 2 decoder layers: a quick check

Nothing else runs in the process (no transformers model: bench/model_step.py compares with that). Weights are random
(normal, std 0.02). Per batch, multimodal first: one eager step, then two graphed steps (the first captures, the
second replays), with the number of graphs and replays printed; both batches have 4096 decoder tokens, so they
share one graph. Then the text step is timed with graphs on, off, on (warm-ups, then the mean of timed steps; a
step is zero grads, forward, label log-probs, -mean, backward, as in bench/model_step.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's package when run as a script

from gpu_timing import Clock, time_steps  # noqa: E402 - bench/ is on sys.path as the script's dir
from model_step import SHAPES, Shape, build_ours, hf_config, init_megatron, make_batch, make_step  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=36, help="decoder layers (the 3B shape has 36)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("CUDA graphs need a GPU")
    from lmmrl_megatron.models.qwen_vl.config import QwenVLConfig

    init_megatron("cuda", seed=0)
    base = SHAPES["3b"]
    shape = Shape(dict(base.text, num_hidden_layers=args.layers), base.vision, base.tied, base.ids, base.seq,
                  base.image_grids, True)
    model = build_ours(QwenVLConfig.from_hf_dict(hf_config(shape).to_dict()), "bf16", "cuda", "none", fused=True,
                       graphs=True)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.02)
    graphs = model.decoder_graphs
    text_step = None
    for label, rows in (("1x4096 mm", [(shape.seq, shape.image_grids)]), ("1x4096 text", [(shape.seq, [])])):
        step = make_step(model, make_batch(shape, rows, "cuda", seed=2), "ours")
        graphs.enabled = False
        step()
        graphs.enabled = True
        step()
        step()
        torch.cuda.synchronize()
        print(f"{label}: {graphs.num_graphs} graph(s), {graphs.num_replays} replays, {graphs.num_eager} eager calls",
              flush=True)
        text_step = step
    print(f"\n{torch.cuda.get_device_name(0)}, torch {torch.__version__}, {args.layers} decoder layers, text 1x4096\n")
    print("| decoder | step ms (mean) | min | max |\n| --- | --- | --- | --- |")
    for enabled in (True, False, True):
        graphs.enabled = enabled
        seconds = time_steps(text_step, Clock("cuda"), args.warmup, args.iters)
        print(f"| {'graphs' if enabled else 'eager'} | {sum(seconds) / len(seconds) * 1e3:.1f} | "
              f"{min(seconds) * 1e3:.1f} | {max(seconds) * 1e3:.1f} |", flush=True)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()

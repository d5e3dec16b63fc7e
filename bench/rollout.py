"""Rollout throughput on one GPU: vLLM as shipped, the project's vLLM engine, the Hugging Face engine, against the
memory-bandwidth limit of decoding, in one run.

    python bench/rollout.py --work /tmp/bench_rollout            # on a GPU machine: 3B-shaped random Qwen2.5-VL
    python bench/rollout.py --only hf,ours --shape tiny          # CPU smoke run of the same code

Cases (prompt tokens are random ids, responses run to max_new_tokens with EOS ignored, so every system does the same
work): 64 and 256 prompts of 512 tokens + 256 new; 32 prompts x n=8; 64 one-image prompts + 256 new. The bound is
what decoding costs when every step reads all weights once from HBM: sequences / (weight bytes / copy rate).
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Case:
    name: str
    num_prompts: int
    prompt_len: int
    new_tokens: int
    n: int = 1
    image: bool = False


CASES = (
    Case("64x(512+256)", 64, 512, 256),
    Case("256x(512+256)", 256, 512, 256),
    Case("32x(512+256) n=8", 32, 512, 256, n=8),
    Case("64 one-image +256", 64, 64, 256, image=True),
)


def copy_rate_gbs() -> float:
    """Device-to-device copy rate (read + write bytes per second) of a 2 GiB buffer."""
    src = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        dst.copy_(src)
    torch.cuda.synchronize()
    rate = 2 * src.numel() * 10 / (time.perf_counter() - start) / 1e9
    del src, dst
    torch.cuda.empty_cache()
    return rate


def make_prompts(model_dir: Path, case: Case, seed: int = 0):
    """MultimodalPrompts (token ids; with images, the processor's expansion) for a case."""
    from PIL import Image
    from transformers import AutoProcessor

    from lmmrl_megatron.rollout import MultimodalPrompt

    processor = AutoProcessor.from_pretrained(model_dir)
    generator = torch.Generator().manual_seed(seed)
    vocab = json.loads((model_dir / "config.json").read_text())["text_config"]["vocab_size"]
    vocab_low, vocab_high = min(1000, vocab // 2), min(100_000, vocab)  # ordinary tokens: no special or vision ids
    prompts = []
    for i in range(case.num_prompts):
        if not case.image:
            prompts.append(MultimodalPrompt(torch.randint(vocab_low, vocab_high, (case.prompt_len,), generator=generator)))
            continue
        image = Image.new("RGB", (224, 224), (37 * i % 255, 90, 160))
        text = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"Describe picture {i}."}]}],
            add_generation_prompt=True,
        )
        inputs = processor(text=[text], images=[image], return_tensors="pt")
        prompts.append(MultimodalPrompt(inputs["input_ids"][0], inputs["pixel_values"], inputs["image_grid_thw"], [image]))
    return prompts


def vllm_as_shipped(model_dir: Path, cases, memory: float) -> dict[str, float]:
    """vLLM's LLM with its defaults (multiprocess engine core, CUDA graphs), token-id prompts."""
    from vllm import LLM, SamplingParams

    from lmmrl_megatron.rollout.vllm_engine import collapse_image_placeholders

    start = time.perf_counter()
    llm = LLM(model=str(model_dir), dtype="bfloat16", gpu_memory_utilization=memory, max_model_len=2048, seed=0)
    print(f"vLLM (as shipped) up in {time.perf_counter() - start:.1f}s", flush=True)
    image_token = llm.llm_engine.model_config.hf_config.image_token_id
    rates = {}
    for case in cases:
        requests = []
        for p in make_prompts(model_dir, case):
            if p.images is None:
                requests.append({"prompt_token_ids": p.prompt_ids.tolist()})
            else:
                ids = collapse_image_placeholders(p.prompt_ids, image_token)
                requests.append({"prompt_token_ids": ids, "multi_modal_data": {"image": list(p.images)}})
        params = SamplingParams(n=case.n, max_tokens=case.new_tokens, ignore_eos=True, temperature=1.0, logprobs=0, seed=1)
        llm.generate(requests[:4], params, use_tqdm=False)  # warm-up
        start = time.perf_counter()
        outputs = llm.generate(requests, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
        rates[case.name] = tokens / seconds
        print(f"  vLLM as shipped  {case.name:22s} {tokens} tokens in {seconds:.2f}s: {rates[case.name]:.0f} tok/s", flush=True)
    llm.llm_engine.engine_core.shutdown()
    del llm
    return rates


def our_engine(engine, model_dir: Path, cases, label: str) -> dict[str, float]:
    from lmmrl_megatron.rollout import SamplingParams

    rates = {}
    for case in cases:
        prompts = make_prompts(model_dir, case)
        params = SamplingParams(n=case.n, max_new_tokens=case.new_tokens, temperature=1.0, seed=1)
        engine.generate(prompts[:2], SamplingParams(n=1, max_new_tokens=4))  # warm-up
        start = time.perf_counter()
        outputs = engine.generate(prompts, params)
        seconds = time.perf_counter() - start
        tokens = sum(o.response_ids.numel() for group in outputs for o in group)
        rates[case.name] = tokens / seconds
        print(f"  {label:16s} {case.name:22s} {tokens} tokens in {seconds:.2f}s: {rates[case.name]:.0f} tok/s", flush=True)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="outputs/bench_rollout")
    parser.add_argument("--shape", default="3b", help="a shape of bench/rl_steps.py")
    parser.add_argument("--only", default="shipped,ours,hf", help="systems to run")
    parser.add_argument("--memory", type=float, default=0.6, help="vLLM gpu_memory_utilization")
    args = parser.parse_args()

    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from rl_steps import SHAPES

    from lmmrl_megatron.testing.make_tiny import make_tiny_checkpoint

    on_gpu = torch.cuda.is_available()
    model_dir = Path(args.work) / f"model_{args.shape}"
    if not (model_dir / "config.json").exists():
        start = time.perf_counter()
        make_tiny_checkpoint("qwen2_5_vl", model_dir, seed=0, overrides=SHAPES[args.shape], dtype="bf16" if on_gpu else "fp32",
                             text_head_dim=None if on_gpu else 32)
        print(f"wrote {args.shape} checkpoint in {time.perf_counter() - start:.1f}s", flush=True)
    weight_bytes = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    systems = args.only.split(",")
    cases = CASES if on_gpu else tuple(Case(c.name, min(c.num_prompts, 4), 32, 8, c.n, c.image) for c in CASES)
    results: dict[str, dict[str, float]] = {}
    bandwidth = copy_rate_gbs() / 2 if on_gpu else float("nan")  # one direction: bytes read per second
    if "shipped" in systems:
        results["vLLM as shipped"] = vllm_as_shipped(model_dir, cases, args.memory)
        gc.collect()
    if "ours" in systems:
        from lmmrl_megatron.rollout.vllm_engine import VLLMEngineOptions, VLLMRolloutEngine

        start = time.perf_counter()
        engine = VLLMRolloutEngine(VLLMEngineOptions(
            model_dir=str(model_dir), dtype="bfloat16" if on_gpu else "float32", gpu_memory_utilization=args.memory,
            max_model_len=2048, enforce_eager=not on_gpu, max_num_seqs=256 if on_gpu else 16,
        ))
        print(f"our vLLM engine up in {time.perf_counter() - start:.1f}s", flush=True)
        results["our vLLM engine"] = our_engine(engine, model_dir, cases, "our vLLM engine")
        engine.llm.llm_engine.engine_core.shutdown()
        del engine
        gc.collect()
        torch.cuda.empty_cache() if on_gpu else None
    if "hf" in systems:
        from lmmrl_megatron.rollout.hf_engine import HFRolloutEngine

        engine = HFRolloutEngine(str(model_dir), device="cuda" if on_gpu else "cpu", dtype=torch.bfloat16 if on_gpu else torch.float32)
        results["HF engine"] = our_engine(engine, model_dir, cases[:1], "HF engine")
        del engine
    print(f"\nweights {weight_bytes / 1e9:.2f} GB; HBM read rate (half the D2D copy rate) {bandwidth:.0f} GB/s")
    names = list(results)
    print("| case | " + " | ".join(f"{n} tok/s" for n in names) + " | decode bound tok/s |")
    print("|" + " --- |" * (len(names) + 2))
    for case in cases:
        bound = case.num_prompts * case.n / (weight_bytes / (bandwidth * 1e9))
        cells = [f"{results[n][case.name]:.0f}" if case.name in results[n] else "-" for n in names]
        print(f"| {case.name} | " + " | ".join(cells) + f" | {bound:.0f} |")


if __name__ == "__main__":
    main()

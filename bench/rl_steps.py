"""Phase timings of real RL steps: a random Qwen2.5-VL checkpoint of a given shape, a synthetic image task, the
trainer through Ray (colocated), and a table of seconds per phase for every step.

    python bench/rl_steps.py --shape 3b --steps 4 --gpus 1          # on a GPU machine (bf16)
    python bench/rl_steps.py --shape tiny --steps 4 --gpus 0        # on CPU (fp32), the same code path

The checkpoint is written once under --work (random weights; nothing is downloaded).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

SHAPES: dict[str, list[str]] = {
    "tiny": [],
    # the tiny model at head_dim 32, the smallest vLLM's CPU attention runs (make_tiny's set_text_head_dim)
    "tiny_hd32": [
        "text_config.hidden_size=128",
        "text_config.rope_parameters={rope_type: default, rope_theta: 1000000.0, mrope_section: [4, 6, 6]}",
        "vision_config.out_hidden_size=128",
    ],
    # Qwen2.5-VL-3B-Instruct's published shapes
    "3b": [
        "text_config.hidden_size=2048",
        "text_config.intermediate_size=11008",
        "text_config.num_hidden_layers=36",
        "text_config.num_attention_heads=16",
        "text_config.num_key_value_heads=2",
        "text_config.vocab_size=151936",
        "text_config.max_position_embeddings=32768",
        "text_config.rope_parameters={rope_type: default, rope_theta: 1000000.0, mrope_section: [16, 24, 24]}",
        "tie_word_embeddings=true",
        "vision_config.depth=32",
        "vision_config.hidden_size=1280",
        "vision_config.intermediate_size=3420",
        "vision_config.num_heads=16",
        "vision_config.out_hidden_size=2048",
        "vision_config.fullatt_block_indexes=[7, 15, 23, 31]",
        "vision_config.window_size=112",
    ],
}
PHASES = ("generate", "onload", "reward", "logprob", "train", "offload", "sync")  # onload/offload: the colocated swap


def prepare(work: Path, shape: str, dtype: str) -> tuple[Path, Path]:
    """The random checkpoint of `shape` (seed 0) and the synthetic data under `work`, each written once."""
    model_dir, data_dir = work / f"model_{shape}", work / "data"
    if not (model_dir / "config.json").exists():
        from lmmrl_megatron.testing.make_tiny import make_tiny_checkpoint  # imported only when needed: it is slow

        start = time.perf_counter()
        # on the GPU when the benchmark runs on one: seconds instead of minutes of CPU initialisation
        device = "cuda" if dtype == "bf16" else "cpu"
        make_tiny_checkpoint("qwen2_5_vl", model_dir, seed=0, overrides=SHAPES[shape], dtype=dtype, device=device)
        print(f"wrote {shape} checkpoint in {time.perf_counter() - start:.1f}s")
    if not (data_dir / "train.jsonl").exists():
        from lmmrl_megatron.data.synthetic import main as write_synthetic

        write_synthetic(["--task", "color_of_shape", "--n", "256", "--out", str(data_dir), "--seed", "0"])
    return model_dir, data_dir


def build_config(
    model_dir: Path, data_dir: Path, run_dir: Path, *, dtype: str, gpus: int, steps: int, prompts: int, n: int,
    max_new_tokens: int, overrides: list[str],
):
    """The embedded default's RunConfig on this bench's checkpoint, data and batch (`overrides` win)."""
    from lmmrl_megatron.config import RunConfig, load_config

    return load_config(
        RunConfig,
        Path(__file__).resolve().parents[1] / "configs" / "rloo_tiny.yaml",
        [
            f"model.pretrain={model_dir}",
            f"model.dtype={dtype}",
            f"data.prompt_data=[{data_dir / 'train.jsonl'}]",
            f"checkpoint.save_path={run_dir}",
            "checkpoint.resume=none",
            f"trainer.max_steps={steps}",
            f"trainer.num_gpus_per_node={gpus}",
            f"trainer.actor_world_size={max(1, gpus)}",
            f"parallel.tp={max(1, gpus)}",
            f"rollout.rollout_batch_size={prompts}",
            f"rollout.n_samples_per_prompt={n}",
            f"rollout.max_new_tokens={max_new_tokens}",
            f"trainer.train_batch_size={prompts * n}",
            "trainer.actor.lr=1e-6",
            "logging.progress_bar=false",
            "eval.sets=[]",  # the embedded default's eval data is not written here, and steps alone are timed
            *overrides,
        ],
    )


def run_steps(config, steps: int) -> list[dict]:
    """`steps` RL steps through the real trainer (Ray, colocated); each record holds the step's metrics and
    `wall_s`, its wall-clock time. No checkpoint is written."""
    import ray

    from lmmrl_megatron.trainer.controller import RLTrainer

    start = time.perf_counter()
    trainer = RLTrainer(config)
    print(f"trainer up in {time.perf_counter() - start:.1f}s")
    records = []
    try:
        for step in range(1, steps + 1):
            start = time.perf_counter()
            record = trainer.rl_step()
            records.append({"step": step, "wall_s": time.perf_counter() - start, **record})
            trainer.step = step
            print(json.dumps(records[-1]))
    finally:
        trainer.close()
        ray.shutdown()
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--gpus", type=int, default=0, help="GPUs on this node (0: CPU)")
    parser.add_argument("--work", default="outputs/bench_rl")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=16, help="prompts per step")
    parser.add_argument("--n", type=int, default=4, help="responses per prompt")
    args, overrides = parser.parse_known_args()

    work = Path(args.work)
    dtype = "bf16" if args.gpus else "fp32"
    model_dir, data_dir = prepare(work, args.shape, dtype)
    config = build_config(
        model_dir, data_dir, work / f"run_{args.shape}_{int(time.time())}", dtype=dtype, gpus=args.gpus,
        steps=args.steps, prompts=args.prompts, n=args.n, max_new_tokens=args.max_new_tokens, overrides=overrides,
    )
    records = run_steps(config, args.steps)
    print(f"\nshape={args.shape} gpus={args.gpus} prompts={args.prompts} n={args.n} max_new_tokens={args.max_new_tokens}")
    print("| step | " + " | ".join(f"{p} s" for p in PHASES) + " | total s | response tokens | sync GB | sync GB/s |")
    print("|" + " --- |" * (len(PHASES) + 5))
    for r in records:
        times = [r.get(f"time/{p}", 0.0) for p in PHASES]
        num_tokens = r["response_length/mean"] * args.prompts * args.n
        print(
            f"| {r['step']} | " + " | ".join(f"{t:.2f}" for t in times)
            + f" | {sum(times):.2f} | {num_tokens:.0f} | {r['sync/bytes'] / 1e9:.2f}"
            + f" | {r['sync/bytes'] / 1e9 / max(r.get('time/sync', 0.0), 1e-9):.1f} |"
        )


if __name__ == "__main__":
    main()

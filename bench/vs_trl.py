"""Seconds per RL step: our trainer against TRL's GRPOTrainer on the same work, side by side in one run.

    PYTHONPATH=$PWD:/tmp/trl-site python bench/vs_trl.py --shape 3b --device cuda --work /tmp/bench_vs_trl
    PYTHONPATH=$PWD:/tmp/trl-site python bench/vs_trl.py --shape tiny --device cpu --prompts 2 --n 2 \\
        --max-new-tokens 8 --work outputs/bench_vs_trl                    # the same code path on CPU

One random Qwen2.5-VL checkpoint (seed 0, written by bench/rl_steps.py's `prepare`), the colour-of-shape image
prompts, the same group size (`--n`: TRL's num_generations, our n_samples_per_prompt), response length, prompts
per step, optimizer steps (one per RL step), GRPO advantages, no KL term, the same rule reward
(configs/rewards/short_answer.py), bf16 on one GPU (fp32 on CPU). Systems, each in its own subprocess, one after
another, so every one starts with the GPU to itself:
  ours      lmmrl-train's trainer as bench/rl_steps.py runs it (Ray, colocated; `--ours-backend`, vllm on a GPU)
  trl       TRL's GRPOTrainer with its own transformers generation
  trl_vllm  TRL's GRPOTrainer with `use_vllm=True, vllm_mode="colocate"`
The first `--warmup` steps of each are not timed. A system that fails or passes `--timeout` is reported as such
and the others still run. TRL without `datasets`/`pyarrow`/`pandas` installed runs on bench/trl_shim.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from rl_steps import SHAPES, build_config, prepare, run_steps  # noqa: E402

SYSTEMS = ("ours", "trl", "trl_vllm")
REWARD_FILE = BENCH.parent / "configs" / "rewards" / "short_answer.py"
SEED = 42


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated, of {', '.join(SYSTEMS)}")
    parser.add_argument("--prompts", type=int, default=16, help="prompts per step")
    parser.add_argument("--n", type=int, default=4, help="responses per prompt (the group)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--steps", type=int, default=2, help="timed steps")
    parser.add_argument("--timeout", type=float, default=380.0, help="seconds per system, start-up included")
    parser.add_argument("--budget", type=float, default=570.0, help="seconds for the whole run; a system gets at most what is left")
    parser.add_argument("--work", default="outputs/bench_vs_trl")
    parser.add_argument("--out", help="also write the table here: .json, else markdown")
    parser.add_argument("--ours-backend", choices=("vllm", "hf"), help="our rollout engine (default: vllm on cuda, hf on cpu)")
    parser.add_argument("--ours-micro-batch-tokens", type=int,
                        help="our trainer.max_tokens_per_micro_batch (default: 8192 on cuda, the tiny config's on cpu)")
    parser.add_argument("--trl-micro-batch", type=int, default=16, help="TRL's per_device_train_batch_size (completions)")
    parser.add_argument("--trl-gradient-checkpointing", action="store_true", help="TRL's default; off here as in ours")
    parser.add_argument("--trl-vllm-memory", type=float, default=0.3, help="TRL's vllm_gpu_memory_utilization")
    parser.add_argument("--trl-shim", choices=("auto", "on", "off"), default="auto", help="bench/trl_shim for datasets")
    parser.add_argument("--child", choices=SYSTEMS, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    args, overrides = parser.parse_known_args(argv)  # the rest: our trainer's config overrides, key=value
    if args.prompts * args.n % min(args.trl_micro_batch, args.prompts * args.n):
        raise ValueError(f"--trl-micro-batch {args.trl_micro_batch} must divide --prompts x --n = {args.prompts * args.n}")
    for name in args.systems.split(","):
        if name not in SYSTEMS:
            raise ValueError(f"--systems: {name!r} is not one of {', '.join(SYSTEMS)}")
    return args, overrides


def dtype_of(args: argparse.Namespace) -> str:
    return "bf16" if args.device == "cuda" else "fp32"


def step_summary(step_seconds: list[float], step_tokens: list[float], warmup: int) -> dict:
    """Seconds and tokens per timed step (the steps after the warm-up)."""
    timed, tokens = step_seconds[warmup:], step_tokens[warmup:]
    assert timed, f"no timed step: {len(step_seconds)} steps ran, {warmup} of them warm-up"
    return {
        "s_per_step": sum(timed) / len(timed),
        "tokens_per_step": sum(tokens) / len(tokens),
        "warmup_s": sum(step_seconds[:warmup]),
        "step_s": step_seconds,
    }


# ---- ours -------------------------------------------------------------------------------------------------------


def run_ours(args: argparse.Namespace, overrides: list[str]) -> dict:
    from lmmrl_megatron.plan.memory import swaps  # the trainer's own test: its RL step swaps exactly then

    work = Path(args.work)
    model_dir, data_dir = prepare(work, args.shape, dtype_of(args))
    backend = args.ours_backend or ("vllm" if args.device == "cuda" else "hf")
    num_steps = args.warmup + args.steps
    micro_tokens = args.ours_micro_batch_tokens or (8192 if args.device == "cuda" else None)
    config = build_config(
        model_dir, data_dir, work / f"run_ours_{int(time.time())}", dtype=dtype_of(args),
        gpus=1 if args.device == "cuda" else 0, steps=num_steps, prompts=args.prompts, n=args.n,
        max_new_tokens=args.max_new_tokens,
        overrides=[
            f"rollout.backend={backend}",
            "algorithm.advantage_estimator=grpo",  # TRL's estimator; kl_coef is 0 in both
            f"trainer.seed={SEED}",
            # the embedded default's 2048-token micro-batches are for CPU; on a GPU, about TRL's 16 completions
            *([f"trainer.max_tokens_per_micro_batch={micro_tokens}"] if micro_tokens else []),
            *overrides,
        ],
    )
    records = run_steps(config, num_steps)
    result = step_summary(
        [r["wall_s"] for r in records], [r["response_length/mean"] * args.prompts * args.n for r in records],
        args.warmup,
    )
    phases = sorted({key for r in records for key in r if key.startswith("time/")})
    result["phases_s"] = {key: sum(r.get(key, 0.0) for r in records[args.warmup:]) / args.steps for key in phases}
    result["detail"] = ", ".join([
        f"rollout.backend={backend}", f"micro-batch {config.trainer.max_tokens_per_micro_batch} tokens",
        "swap on" if swaps(config) else "no swap",
        *overrides,
    ])
    return result


# ---- TRL --------------------------------------------------------------------------------------------------------


def use_trl_shim(mode: str) -> bool:
    """Put bench/trl_shim first on the path where TRL's imports would otherwise fail (or when asked)."""
    missing = [name for name in ("datasets", "pyarrow", "pandas") if importlib.util.find_spec(name) is None]
    if mode == "on" or (mode == "auto" and missing):
        sys.path.insert(0, str(BENCH / "trl_shim"))
        return True
    if missing:
        raise ValueError(f"--trl-shim off, but {', '.join(missing)} cannot be imported")
    return False


def load_reward():
    spec = importlib.util.spec_from_file_location("short_answer", REWARD_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.commits_to_label


def trl_rows(data_file: Path, num_rows: int) -> list[dict]:
    """TRL's multimodal rows from our prompt records: the chat with an image placeholder, the image, the label."""
    from PIL import Image

    rows = []
    for line in data_file.read_text().splitlines()[:num_rows]:
        record = json.loads(line)
        (message,) = json.loads(record["message"])
        texts = [part["text"] for part in message["content"] if part["type"] == "text"]
        (image_path,) = [part["image"] for part in message["content"] if part["type"] == "image"]
        image = Image.open(data_file.parent / image_path).convert("RGB")
        content = [{"type": "image"}, {"type": "text", "text": " ".join(texts)}]
        rows.append({"prompt": [{"role": "user", "content": content}], "image": image, "answer": record["answer"]})
    assert len(rows) == num_rows, f"{data_file} has {len(rows)} prompts, the run needs {num_rows}"
    return rows


def engine_args_as_ours(device: str) -> None:
    """TRL's colocated `vllm.LLM` leaves `limit_mm_per_prompt` at vLLM's default, so vLLM 0.26 profiles a video
    prompt too (`<|video_pad|>` with no video), which the Qwen2.5-VL processor of transformers >= 5.18 refuses
    at start-up; on CPU the same holds for its image profile. Our engine (rollout/vllm_engine.py) turns video off
    and skips the multimodal profile on CPU; TRL's engine gets the same arguments, and nothing else changes."""
    import functools

    from trl.generation import vllm_generation

    extra = {"limit_mm_per_prompt": {"image": 1, "video": 0}}
    if device == "cpu":
        extra["skip_mm_profiling"] = True
    vllm_generation.LLM = functools.partial(vllm_generation.LLM, **extra)


def vllm_suppressed_vision_tokens(model_dir: Path) -> dict:
    """TRL 1.16 suppresses the image placeholder only in its transformers path (`suppress_tokens`); its vLLM path
    samples it, and a sampled `<|image_pad|>` in a completion fails TRL's own training forward ("Image features and
    image tokens do not match", seen on the H200 with random weights). Give its vLLM path the same suppression as
    a logit bias (the video placeholder too, as our engines ban every vision token)."""
    config = json.loads((model_dir / "config.json").read_text())
    ids = [config[key] for key in ("image_token_id", "video_token_id") if key in config]
    return {"logit_bias": {token_id: -100.0 for token_id in ids}}


def run_trl(args: argparse.Namespace, use_vllm: bool) -> dict:
    shimmed = use_trl_shim(args.trl_shim)
    if args.device == "cpu":
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache, as our engine on CPU
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    if use_vllm:
        engine_args_as_ours(args.device)
    work = Path(args.work)
    model_dir, data_dir = prepare(work, args.shape, dtype_of(args))
    num_steps, batch = args.warmup + args.steps, args.prompts * args.n
    micro = min(args.trl_micro_batch, batch)
    commits_to_label = load_reward()

    def accuracy(completions, answer, **_) -> list[float]:
        return [commits_to_label(c[0]["content"], label, "") for c, label in zip(completions, answer)]

    config = GRPOConfig(
        output_dir=str(work / f"run_{'trl_vllm' if use_vllm else 'trl'}"),
        generation_kwargs=vllm_suppressed_vision_tokens(model_dir) if use_vllm else None,
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=batch // micro,  # one optimizer step per generation of `batch` completions
        num_generations=args.n,
        max_completion_length=args.max_new_tokens,
        temperature=1.0,
        beta=0.0,
        num_iterations=1,
        learning_rate=1e-6,  # as ours in bench/rl_steps.py, constant
        lr_scheduler_type="constant",
        max_grad_norm=1.0,
        max_steps=num_steps,
        bf16=args.device == "cuda",
        use_cpu=args.device == "cpu",
        gradient_checkpointing=args.trl_gradient_checkpointing,
        use_vllm=use_vllm,
        vllm_mode="colocate",
        vllm_gpu_memory_utilization=args.trl_vllm_memory,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=SEED,
    )
    times: list[float] = []
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)

    class StepTimer(TrainerCallback):  # wall time between optimizer steps: generation, reward, loss, update
        def on_train_begin(self, *_, **__):
            sync()
            times.append(time.perf_counter())

        def on_step_end(self, *_, **__):
            sync()
            times.append(time.perf_counter())

    start = time.perf_counter()
    trainer = GRPOTrainer(
        model=str(model_dir), reward_funcs=[accuracy], args=config,
        train_dataset=Dataset.from_list(trl_rows(data_dir / "train.jsonl", args.prompts * num_steps)),
        callbacks=[StepTimer()],
    )
    import transformers
    import trl

    versions = f"trl {trl.__version__}, transformers {transformers.__version__}, shim {shimmed}"
    print(f"TRL trainer up in {time.perf_counter() - start:.1f}s ({versions})", flush=True)
    trainer.train()
    seconds = [b - a for a, b in zip(times, times[1:])]
    lengths = [log["completions/mean_length"] for log in trainer.state.log_history if "completions/mean_length" in log]
    assert len(seconds) == num_steps == len(lengths), (len(seconds), num_steps, len(lengths))
    result = step_summary(seconds, [length * batch for length in lengths], args.warmup)
    result["detail"] = f"{versions}, micro-batch {micro}, grad checkpointing {args.trl_gradient_checkpointing}" + (
        f", vLLM colocate at {args.trl_vllm_memory}" if use_vllm else ", transformers generate"
    )
    return result


# ---- the run ----------------------------------------------------------------------------------------------------


def run_child(name: str, argv: list[str], args: argparse.Namespace, timeout: float) -> dict:
    """One system in its own process group (so a timeout ends the engines it started too)."""
    out = Path(args.work) / f"result_{name}.json"
    out.unlink(missing_ok=True)
    if timeout < 30:
        return {"status": f"skipped: {timeout:.0f}s of --budget left"}
    command = [sys.executable, __file__, *argv, "--child", name, "--child-out", str(out)]
    print(f"\n=== {name}: {' '.join(command)}", flush=True)
    start = time.perf_counter()
    # Offline and quiet: the GPU machine has no network, and TRL's trainers ping the Hub's telemetry otherwise.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false"}
    process = subprocess.Popen(command, start_new_session=True, env=env)
    try:
        rc = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        return {"status": f"timed out after {timeout:.0f}s"}
    finally:
        if process.poll() is not None:
            try:  # what the child left running (engines, Ray workers in its group)
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    if rc != 0 or not out.exists():
        return {"status": f"failed (exit {rc}; its log is above)"}
    return {"status": "ok", "total_s": time.perf_counter() - start, **json.loads(out.read_text())}


def table(args: argparse.Namespace, results: dict[str, dict]) -> str:
    ours = results.get("ours", {}).get("s_per_step")
    lines = [
        f"shape={args.shape} device={args.device} prompts={args.prompts} n={args.n} "
        f"max_new_tokens={args.max_new_tokens} warm-up={args.warmup} timed steps={args.steps}",
        "",
        "| system | s / RL step | tokens / step | tokens / s | ours faster by | warm-up s | process s | status | detail |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in results.items():
        if "s_per_step" not in r:
            lines.append(f"| {name} | - | - | - | - | - | - | {r['status']} | |")
            continue
        ratio = f"{r['s_per_step'] / ours:.2f}x" if ours else "-"
        lines.append(
            f"| {name} | {r['s_per_step']:.2f} | {r['tokens_per_step']:.0f} | {r['tokens_per_step'] / r['s_per_step']:.0f}"
            f" | {ratio} | {r['warmup_s']:.1f} | {r['total_s']:.0f} | {r['status']} | {r['detail']} |"
        )
    if "phases_s" in results.get("ours", {}):
        phases = results["ours"]["phases_s"]
        lines += ["", "ours per timed step: " + ", ".join(f"{k[5:]} {v:.2f}s" for k, v in phases.items())]
    return "\n".join(lines)


def main() -> None:
    argv = sys.argv[1:]
    args, overrides = parse_args(argv)
    if args.child:
        result = run_ours(args, overrides) if args.child == "ours" else run_trl(args, args.child == "trl_vllm")
        Path(args.child_out).write_text(json.dumps(result))
        return
    Path(args.work).mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    prepare(Path(args.work), args.shape, dtype_of(args))  # once, before the systems' clocks start
    print(f"checkpoint and data ready in {time.perf_counter() - start:.1f}s", flush=True)
    results: dict[str, dict] = {}
    for name in args.systems.split(","):  # the table after every system, so a cut-off run still shows the rest
        left = args.budget - (time.perf_counter() - start)
        results[name] = run_child(name, argv, args, min(args.timeout, left - 10))
        text = table(args, results)
        print("\n" + text, flush=True)
        if args.out:
            payload = json.dumps({"args": vars(args), "results": results}, indent=1) if args.out.endswith(".json") else text
            Path(args.out).write_text(payload + "\n")


if __name__ == "__main__":
    main()

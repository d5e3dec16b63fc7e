"""lmmrl-plan's memory model against measurement: predicted vs torch.cuda.max_memory_allocated per phase, on one GPU.

    python bench/plan_check.py --out docs/plan_check.md         # GPU: 3B and 7B shapes, two settings each (~2-4 min)
    python bench/plan_check.py --device cpu --shape tiny        # CPU: the same code path, no measurement

Our policy is built as the trainer builds it (`models/qwen_vl/policy.build_chunks`, `MegatronLearner` with Megatron
DDP and the distributed optimizer, TP=1, world size 1), from a random init on the device: no checkpoint, no Ray,
no vLLM. One colocated step's phases run in the trainer's order: onload, logprob (forward only), train (forward,
backward, Adam step), offload (grads freed, optimizer state to the host), sync (the HF export in buckets, two
alive at a time as the cuda_ipc transport holds them). The cycle runs twice and the second is measured (Adam's
state exists from the first step on, as in every step after the first). The peak is reset before each phase.

Measured is PyTorch's allocator of this process (`max_memory_allocated`): the planner's allocator terms are
compared (weights, grads, optimizer, activations, logits, adam temp, buckets), not the CUDA context or vLLM's share.
"generate" is what the policy keeps resident while the engines would generate (memory_allocated after offload).
Batches are text only (the vision tower's activations are not modelled): rows of max_tokens / 4 tokens, two
micro-batches per train step.

Shapes (bench/model_step.py): 3b = Qwen2.5-VL-3B; 7b-half = Qwen2.5-VL-7B's layer, vocabulary and vision shapes at
14 of its 28 decoder layers with the vision tower frozen: the whole 7B with fp32 Adam at DP=1 needs ~150 GB of
weights, grads and optimizer state and does not fit one H200 (the bench prints the planner's verdict for it).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's package when run as a script

from model_step import SHAPES, hf_config  # noqa: E402 - bench/ is on sys.path as the script's dir

GiB = 1024**3
# (shape, decoder layers or None for the shape's own, freeze_vision, [(recompute, max_tokens_per_micro_batch)])
RUNS = {
    "3b": ("3b", None, False, [("none", 4096), ("full", 8192)]),
    "7b-half": ("7b", 14, True, [("none", 4096), ("full", 8192)]),
    "tiny": ("tiny", None, False, [("none", 256), ("full", 512)]),
}
PHASES = ("logprob", "train", "generate", "sync")


def qwen_config_of(shape_name: str, layers: int | None):
    from lmmrl_megatron.models.qwen_vl.config import QwenVLConfig

    shape = SHAPES[shape_name]
    if layers is not None:
        shape = dataclasses.replace(shape, text=dict(shape.text, num_hidden_layers=layers))
    return QwenVLConfig.from_hf_dict(hf_config(shape).to_dict(), source=f"bench shape {shape_name}"), shape


def run_config(recompute: str, max_tokens: int, freeze_vision: bool, on_gpu: bool):
    from lmmrl_megatron.config import RunConfig, load_config

    return load_config(RunConfig, None, [
        f"model.dtype={'bf16' if on_gpu else 'fp32'}",
        f"model.recompute={recompute}",
        f"model.freeze_vision={str(freeze_vision).lower()}",
        f"trainer.num_gpus_per_node={1 if on_gpu else 0}",
        "trainer.actor_world_size=1",
        "trainer.colocate_all_models=true",
        f"trainer.max_tokens_per_micro_batch={max_tokens}",
        "rollout.backend=vllm",
        "rollout.weight_sync_bucket_mb=512",
        "algorithm.advantage_estimator=rloo",
        "algorithm.kl_coef=0",  # no reference: the bench builds the actor only
    ])


def init_world(on_gpu: bool) -> None:
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    from lmmrl_megatron.trainer.policy_worker import free_port

    if not torch.distributed.is_initialized():
        if on_gpu:
            torch.cuda.set_device(0)
        else:
            from lmmrl_megatron.parallel.cpu_backend import install_cpu_backend

            install_cpu_backend()
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        torch.distributed.init_process_group("nccl" if on_gpu else "gloo", rank=0, world_size=1)
    ps.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    torch.manual_seed(1234)


def make_batch(config, qwen, max_tokens: int):
    """Eight text-only rows of max_tokens / 4 tokens (a quarter prompt, the rest response), and their two
    micro-batches of four."""
    from lmmrl_megatron.learner.micro_batch import split_by_token_budget
    from lmmrl_megatron.learner.rollout_batch import PromptInputs, RolloutBatch

    gen = torch.Generator().manual_seed(0)
    length = max_tokens // 4
    prompt = length // 4
    top = min(qwen.tokens.vision_start_token_id, qwen.text.vocab_size) - 10  # below every special token
    rows = [torch.randint(0, top, (length,), generator=gen) for _ in range(8)]
    prompts = [PromptInputs(ids[:prompt]) for ids in rows]
    batch = RolloutBatch.from_rows(prompts, list(range(8)), [ids[prompt:] for ids in rows])
    groups = split_by_token_budget(batch.num_tokens(), config.trainer.max_tokens_per_micro_batch)
    assert len(groups) == 2 and all(len(g) == 4 for g in groups), groups
    return batch, groups


class Meter:
    """Peak allocated bytes of one phase (GPU), or nothing on CPU; wall time either way. Bytes still allocated
    before the model was built (a previous setting's leftovers, if any) are subtracted."""

    def __init__(self, on_gpu: bool, baseline: int) -> None:
        self.on_gpu = on_gpu
        self.baseline = baseline

    def start(self) -> None:
        if self.on_gpu:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.t0 = time.perf_counter()

    def stop(self, resident: bool = False) -> tuple[float | None, float]:
        if self.on_gpu:
            torch.cuda.synchronize()
            value = torch.cuda.memory_allocated() if resident else torch.cuda.max_memory_allocated()
            return value - self.baseline, time.perf_counter() - self.t0
        return None, time.perf_counter() - self.t0


def measure(config, qwen, on_gpu: bool) -> dict[str, tuple[float | None, float]]:
    """One cycle as warm-up, then the measured cycle: {phase: (bytes or None, seconds)}."""
    from lmmrl_megatron.convert.export import export_hf_weights
    from lmmrl_megatron.learner.megatron_learner import MegatronLearner
    from lmmrl_megatron.learner.micro_batch import collate, response_values
    from lmmrl_megatron.learner.rollout_batch import RowValues
    from lmmrl_megatron.models.qwen_vl.policy import build_chunks
    from lmmrl_megatron.models.qwen_vl.checkpoint_model import qwen_vl_shards_to_hf
    from lmmrl_megatron.models.qwen_vl.policy import qwen_vl_forward
    from lmmrl_megatron.trainer.policy_worker import make_policy_loss

    device = torch.device("cuda", 0) if on_gpu else torch.device("cpu")
    baseline = torch.cuda.memory_allocated() if on_gpu else 0
    if baseline > 2**20:
        print(f"  note: {baseline / GiB:.2f} GiB still allocated before the build (subtracted)", flush=True)
    chunks = build_chunks(qwen, config.model, config.parallel, on_gpu, load=False)
    engine = MegatronLearner(chunks, qwen_vl_forward, qwen.text.vocab_size, config.trainer.actor, 1.0,
                            config.model.dtype == "bf16")
    shards_to_hf = qwen_vl_shards_to_hf(qwen, config.model.transformer_impl)
    batch, groups = make_batch(config, qwen, config.trainer.max_tokens_per_micro_batch)

    def micro_batches():
        return [collate(batch, g).to(device) for g in groups]

    normaliser = float(batch.response_mask.sum())
    loss_fn = make_policy_loss(config.algorithm, normaliser, 0.0)
    meter, out = Meter(on_gpu, baseline), {}
    for _cycle in range(2):
        engine.onload()
        meter.start()
        stats = engine.forward_only(micro_batches())
        out["logprob"] = meter.stop()
        # old log-probs from this forward, advantages of +-1: a real PPO-clip loss
        old = RowValues.merge(
            [RowValues(st.micro_batch.sample_index.cpu(), response_values(st.micro_batch, st.values, batch))
             for st in stats]
        ).values
        signs = (torch.arange(batch.num_rows) % 2 * 2.0 - 1.0)[:, None] * batch.response_mask
        batch = dataclasses.replace(batch, old_logprobs=old, rollout_logprobs=old, advantages=signs)
        meter.start()
        engine.train_step(micro_batches(), loss_fn)
        out["train"] = meter.stop()
        meter.start()
        engine.offload()
        out["generate"] = meter.stop(resident=True)
        meter.start()
        previous = None  # cuda_ipc keeps the previous bucket alive while the next is filled
        for bucket in export_hf_weights(chunks, shards_to_hf, config.rollout.weight_sync_bucket_mb * 2**20):
            previous, _ = bucket, previous
        del previous
        out["sync"] = meter.stop()
    del engine, chunks, stats
    return out


def free_world(on_gpu: bool) -> None:
    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()
    gc.collect()
    if on_gpu:
        torch.cuda.empty_cache()


def predicted(config, qwen, gpu) -> dict[str, int]:
    from lmmrl_megatron.plan.report import make_plan

    plan = make_plan(config, gpu, qwen)
    assert not plan.problems, plan.problems
    return {phase.phase: phase.allocated for phase in plan.memory[0]}


def full_7b_verdict(gpu) -> str:
    from lmmrl_megatron.plan.report import make_plan

    qwen, _ = qwen_config_of("7b", None)
    plan = make_plan(run_config("none", 4096, False, True), gpu, qwen)
    return "fits" if plan.fits else "does not fit: " + plan.verdict[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", default="3b,7b-half", help=f"comma-separated, of {sorted(RUNS)}")
    parser.add_argument("--out", help="also write the table here (.md: markdown; .json: JSON)")
    args = parser.parse_args()
    from lmmrl_megatron.plan.gpus import GPUS, gpu_from_memory

    on_gpu = args.device == "cuda"
    if on_gpu:
        props = torch.cuda.get_device_properties(0)
        gpu = gpu_from_memory(props.total_memory, props.name)
    else:
        gpu = GPUS["H200-141GB"]
    print(f"device: {gpu.name}, {gpu.memory_bytes / GiB:.1f} GiB; torch {torch.__version__}", flush=True)
    print(f"planner on the whole 7B at DP=1 (bf16, fp32 Adam, no recompute, 4096 tokens): {full_7b_verdict(gpu)}")
    rows = []
    for name in args.shape.split(","):
        shape_name, layers, freeze, settings = RUNS[name]
        qwen, _ = qwen_config_of(shape_name, layers)
        for recompute, max_tokens in settings:
            config = run_config(recompute, max_tokens, freeze, on_gpu)
            want = predicted(config, qwen, gpu)
            start = time.perf_counter()
            init_world(on_gpu)
            try:
                got = measure(config, qwen, on_gpu)
            finally:
                free_world(on_gpu)
            setting = f"{name} recompute={recompute} tokens={max_tokens}" + (" freeze_vision" if freeze else "")
            print(f"  {setting}: {time.perf_counter() - start:.1f} s", flush=True)
            for phase in PHASES:
                measured, seconds = got[phase]
                error = None if measured is None else 100.0 * (want[phase] - measured) / measured
                rows.append(dict(setting=setting, phase=phase, predicted_gib=want[phase] / GiB,
                                 measured_gib=None if measured is None else measured / GiB, error_pct=error,
                                 seconds=seconds))
    table = render(rows)
    print(table)
    worst = max((abs(r["error_pct"]) for r in rows if r["error_pct"] is not None), default=None)
    print("worst |error|: " + ("n/a (no GPU measurement)" if worst is None else f"{worst:.1f}%"))
    if args.out:
        path = Path(args.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(rows, indent=2) if path.suffix == ".json" else table + "\n")


def render(rows: list[dict]) -> str:
    lines = ["| setting | phase | predicted GiB | measured GiB | error | phase s |", "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        measured = "n/a" if r["measured_gib"] is None else f"{r['measured_gib']:.2f}"
        error = "n/a" if r["error_pct"] is None else f"{r['error_pct']:+.1f}%"
        lines.append(f"| {r['setting']} | {r['phase']} | {r['predicted_gib']:.2f} | {measured} | {error} | "
                     f"{r['seconds']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
